"""Calibrate a model's ± sd: fit one scale for its predicted sd on a CSV so that the predicted age ± sd holds the
true age for 68.3% of the faces (a Gaussian's ± 1 sd, the error bar users read in demo.py and on the page), and
write a copy of the checkpoint that carries it.

    python calibrate.py --data_dir data/utkface --dataset utkface --model weights/utkface_multitask.pth \\
        --output runs/utkface_multitask_calibrated.pth --tta

The copy stores the scale as ``sd_scale``, and estimator.calibrated_sd applies it wherever the sd is computed
(val.py, demo.py, app.py, the Python API, and export.py's graph and metadata); a checkpoint without it keeps its
sd. The model's weights are untouched, so ages do not change. The scale is fitted on the faces it is then
reported on, one number over thousands of faces; score the copy on another split for a held-out coverage.
"""
import argparse
import io
from pathlib import Path

import numpy as np
import torch

from cli import add_model_argument
from estimator import SD_SCALE_KEY, load_model_file, make_backend
from files import OutputError, atomic_write
from records import SPLITS, Records, csv_path
from runtime import setup_runtime, teardown
from scoring import HONEST_SD_COVERAGE, age_group_masks, evaluation_loader, score_dataset, sd_coverage


def fit_sd_scale(errors, sds):
    """The smallest scale s with |error| <= s * sd for at least HONEST_SD_COVERAGE of the faces."""
    return float(np.quantile(np.abs(errors) / sds, HONEST_SD_COVERAGE, method="inverted_cdf"))


def check_paths(model, output):
    """A clear error before any scoring: the output is a new .pth file, not the model itself."""
    model, output = Path(model).expanduser(), Path(output).expanduser()
    if output.suffix != ".pth":
        raise OutputError(f"--output {output} must end in .pth: it is a copy of the checkpoint")
    if output.exists() and model.exists() and output.resolve() == model.resolve():
        raise OutputError(f"--output {output} is the model itself; write the calibrated copy under another name")
    if output.is_dir():
        raise OutputError(f"--output {output} is a folder; name the file to write, e.g. {output / 'calibrated.pth'}")
    return output


def coverage_lines(errors, sds, ages, scales):
    """A table of sd coverage, overall and by age group, for each (name, scale) of ``scales``."""
    columns = [(name, sd_coverage(errors, sds * scale, ages)) for name, scale in scales]
    lines = [f"{'faces':<10} {'N':>7}" + "".join(f" {name:>12}" for name, _ in columns),
             f"{'all':<10} {len(errors):>7}" + "".join(f" {overall:>12.1%}" for _, (overall, _) in columns)]
    for label, mask in age_group_masks(ages):
        shares = "".join(f" {groups[label]:>12.1%}" for _, (_, groups) in columns)
        lines.append(f"{label:<10} {int(mask.sum()):>7}" + shares)
    return lines


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", required=True, help="folder with <dataset>_<split>_align.csv")
    parser.add_argument("--dataset", required=True, help="data set name, the CSV prefix")
    add_model_argument(parser, "checkpoint to calibrate (.pth); export the calibrated copy to ONNX afterwards",
                       required=True)
    parser.add_argument("--output", required=True, help="where the calibrated copy of the checkpoint goes (.pth)")
    parser.add_argument("--split", default="valid", choices=SPLITS,
                        help="the CSV the scale is fitted on (default: valid)")
    parser.add_argument("--tta", action="store_true", help="score each face with its mirror, as val.py --tta does")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="force a device (default: cuda when available)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    output = check_paths(args.model, args.output)
    model_file = load_model_file(args.model)
    if model_file.kind != "torch":
        raise OutputError(f"--model {args.model} is an ONNX export; calibrate the .pth it was made from, "
                          f"then export the copy")
    records = Records(csv_path(args.data_dir, args.dataset, args.split), args.data_dir)
    runtime = setup_runtime(args.device)
    loader = evaluation_loader(records, model_file.cfg, runtime)
    predictions = score_dataset(make_backend(model_file, runtime), loader, runtime,
                                tta=args.tta or model_file.cfg.TEST.TTA, desc=f"scoring {args.split}")
    teardown(runtime)
    scored = np.isfinite(predictions["age"])
    if not scored.any():
        raise OutputError(f"no face of {records.path} could be scored, so there is nothing to fit the sd on; "
                          f"check its photos")
    errors, sds = predictions["age"][scored] - records.age[scored], predictions["age_sd"][scored]
    factor = fit_sd_scale(errors, sds)
    state = dict(model_file.state, **{SD_SCALE_KEY: model_file.sd_scale * factor})
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(output, buffer.getvalue())
    print(f"the true age within the predicted age ± sd, on {args.dataset} {args.split}"
          f" ({HONEST_SD_COVERAGE:.1%} if the sd is an honest error bar):")
    print("\n".join(coverage_lines(errors, sds, records.age[scored], (("before", 1.0), ("calibrated", factor)))))
    print(f"\nsd_scale {state[SD_SCALE_KEY]:.4f} (the model's {model_file.sd_scale:.4f} times {factor:.4f}); "
          f"wrote {output}")
    return state[SD_SCALE_KEY]


if __name__ == "__main__":
    main()
