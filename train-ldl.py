"""Train with DLDL-v2: Gaussian label distributions over ages 0..100, KL + L1 loss.

Same flags and config keys as train.py; see ``python train-ldl.py -h``.
"""
from train import fit

if __name__ == "__main__":
    fit("ldl")
