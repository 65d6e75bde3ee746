"""Train age, gender and ethnicity together: the DLDL-v2 loss plus two cross-entropies.

The CSVs need gender and race (ethnicity) columns. Same flags and config keys as train.py;
see ``python train-mt.py -h``.
"""
from train import fit

if __name__ == "__main__":
    fit("mt")
