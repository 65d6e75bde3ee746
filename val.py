"""Evaluate a checkpoint: MAE, CA(n), errors by age group, year, gender and ethnicity, the multitask
heads' accuracies, worst faces, plots.

    python val.py --data_dir D --dataset NAME --model CKPT|FILE.onnx [--output_dir OUT] [--split valid|test|train]
                  [--tta]

(--resume is the original's name for --model and works too.)

The objective, architecture, image size and expand come from the checkpoint
(or the export's metadata). Faces are scored by estimator.py, through PyTorch
or onnxruntime (scoring.py), and the report is written by evaluation.py, which the
training loop uses too for its best checkpoint on a test CSV.
"""
import argparse
from pathlib import Path

from cli import add_model_argument
from defaults import check_config, merge_opts
from estimator import load_model_file
from evaluation import evaluate
from files import check_output_dir
from records import SPLITS, Records, csv_path
from runtime import setup_runtime, teardown



def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", required=True, help="folder with <dataset>_{train,valid}_align.csv")
    parser.add_argument("--dataset", required=True, help="data set name, the CSV prefix (utkface, morph, megaage, ...)")
    add_model_argument(parser, "model to evaluate: a .pth written by the training scripts, or an .onnx written by "
                               "export.py", required=True)
    parser.add_argument("--output_dir", help="where report.json, errors.csv and the plots go (default: a folder "
                                             "named after the checkpoint)")
    parser.add_argument("--split", default="valid", choices=SPLITS, help="which CSV to score (default: valid)")
    parser.add_argument("--tta", action="store_true",
                        help="average the predicted distributions of each face and its mirror")
    parser.add_argument("--expand", type=float, help="override the crop expand stored in the checkpoint")
    parser.add_argument("--multi_gpu", action="store_true", help="DataParallel over all visible GPUs")
    parser.add_argument("--ldl", action="store_true",
                        help="accepted for old command lines; the objective comes from the checkpoint")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="force a device (default: cuda when available)")
    parser.add_argument("opts", nargs="*", metavar="KEY VALUE",
                        help="config overrides as KEY VALUE pairs, e.g. TEST.BATCH_SIZE 64")
    return parser


def main(argv=None):
    args = build_parser().parse_intermixed_args(argv)
    model_file = load_model_file(args.model)
    cfg = model_file.cfg
    if args.expand is not None:
        cfg.DATA.EXPAND = args.expand
    merge_opts(cfg, args.opts)
    check_config(cfg, keys=args.opts[0::2])  # the overrides only: the model's own values trained it
    path = csv_path(args.data_dir, args.dataset, args.split)
    if not path.is_file():
        raise SystemExit(f"split {args.split!r} does not exist: {path} not found"
                         + (" (preprocessing writes it with --test_ratio or --folds)" if args.split == "test" else ""))
    records = Records(path, args.data_dir)
    runtime = setup_runtime(args.device)
    output_dir = check_output_dir(args.output_dir or Path(args.model).with_suffix(""), "--output_dir")
    report = evaluate(model_file, cfg, records, runtime, output_dir, (args.dataset, args.split),
                      tta=args.tta or cfg.TEST.TTA, multi_gpu=args.multi_gpu)
    teardown(runtime)
    return report


if __name__ == "__main__":
    main()
