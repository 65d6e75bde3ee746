"""Evaluate a checkpoint: MAE, CA(n), errors by age group, gender and ethnicity, worst faces, plots.

    python val.py --data_dir D --dataset NAME --resume CKPT|FILE.onnx [--output_dir OUT] [--split valid|train] [--tta]

The objective, architecture, image size and expand come from the checkpoint
(or the export's metadata). Faces are scored by estimator.py, through PyTorch
or onnxruntime. The training loop calls `predict` and `metrics` every epoch.
"""
import argparse
import json
import os
from pathlib import Path

import numpy as np

from checkpoint import atomic_write, atomic_write_text
from dataset import GENDER_NAMES, RACE_NAMES, CachedBatches, FaceDataset, Records, csv_path
# the training loop and bench.py import predict (and others head_probabilities) from here, as before
from estimator import head_probabilities, load_model_file, make_backend, predict, score_loader  # noqa: F401
from runtime import EpochSampler, make_loader, setup_runtime, teardown

CA_THRESHOLDS = (3, 5, 7)
CA_CURVE_MAX = 10
# (label, lowest age, highest age), inclusive, as researchers report them
AGE_GROUPS = (("0-5", 0, 5), ("6-10", 6, 10), ("11-20", 11, 20), ("21-30", 21, 30),
              ("31-40", 31, 40), ("41-60", 41, 60), ("61+", 61, None))
SPLITS = ("valid", "train")


def cumulative_accuracy(errors, n):
    """CA(n): the share of faces whose |predicted - true| is at most n years."""
    return float(np.mean(np.abs(errors) <= n)) if len(errors) else float("nan")


def mae_by_group(errors, groups, names):
    """{name: (MAE, N)} for each code present in ``groups``; UNKNOWN codes are left out."""
    table = {}
    for code, name in enumerate(names):
        mask = groups == code
        if mask.any():
            table[name] = (float(np.abs(errors[mask]).mean()), int(mask.sum()))
    return table


def age_group_table(errors, ages):
    table = {}
    for label, low, high in AGE_GROUPS:
        mask = (ages >= low) & (ages <= (high if high is not None else np.inf))
        if mask.any():
            table[label] = (float(np.abs(errors[mask]).mean()), int(mask.sum()))
    return table


def metrics(pred, ages, gender=None, race=None):
    """Every figure of the report from predicted and true ages (and groups when known)."""
    pred = np.asarray(pred, dtype=np.float64)
    ages = np.asarray(ages, dtype=np.float64)
    errors = pred - ages
    result = {"n": int(len(ages)), "mae": float(np.abs(errors).mean()) if len(ages) else float("nan")}
    for n in CA_THRESHOLDS:
        result[f"ca{n}"] = cumulative_accuracy(errors, n)
    result["age_groups"] = age_group_table(errors, ages)
    result["genders"] = mae_by_group(errors, np.asarray(gender), GENDER_NAMES) if gender is not None else {}
    result["races"] = mae_by_group(errors, np.asarray(race), RACE_NAMES) if race is not None else {}
    return result


def evaluation_loader(records, cfg, runtime, crops=None):
    """Batches of every face once, in CSV order per rank: gathered from the crop cache, or decoded per sample."""
    sampler = EpochSampler(len(records), shuffle=False, rank=runtime.rank, world_size=runtime.world_size)
    if crops is not None:
        return CachedBatches(records, crops, sampler, cfg.TEST.BATCH_SIZE, runtime)
    dataset = FaceDataset(records, cfg.MODEL.IMG_SIZE, cfg.DATA.EXPAND, on_bad_image=cfg.DATA.ON_BAD_IMAGE)
    return make_loader(dataset, sampler, cfg.TEST.BATCH_SIZE, cfg.TRAIN.WORKERS, runtime)


def format_report(result, title):
    """Aligned plain-text tables, for the terminal and for pasting."""
    lines = [title, f"{'N':>8} {'MAE':>7} {'CA(3)':>7} {'CA(5)':>7} {'CA(7)':>7}",
             f"{result['n']:>8} {result['mae']:>7.3f} {result['ca3']:>7.3f} {result['ca5']:>7.3f} {result['ca7']:>7.3f}"]
    for heading, table in (("age group", result["age_groups"]), ("gender", result["genders"]), ("ethnicity", result["races"])):
        if table:
            lines += ["", f"{heading:<10} {'N':>7} {'MAE':>7}"]
            lines += [f"{name:<10} {n:>7} {mae:>7.3f}" for name, (mae, n) in table.items()]
    return "\n".join(lines)


def report_json(result, checkpoint, dataset, split, tta):
    return {
        "n": result["n"], "mae": result["mae"], "ca3": result["ca3"], "ca5": result["ca5"], "ca7": result["ca7"],
        "mae_by_age_group": {k: v[0] for k, v in result["age_groups"].items()},
        "mae_by_gender": {k: v[0] for k, v in result["genders"].items()},
        "mae_by_race": {k: v[0] for k, v in result["races"].items()},
        "checkpoint": str(checkpoint), "dataset": dataset, "split": split, "tta": bool(tta),
    }


def write_errors_csv(path, records, pred, sd):
    """One row per face, worst first, so that the badly estimated faces are the top rows."""
    import pandas as pd

    errors = pred - records.age
    frame = pd.DataFrame({"photo": records.photo, "age": records.age, "pred": np.round(pred, 3),
                          "error": np.round(errors, 3), "pred_sd": np.round(sd, 3)})
    frame = frame.iloc[np.argsort(-np.abs(errors), kind="stable")]
    atomic_write_text(path, frame.to_csv(index=False))


def write_plots(output_dir, records, pred, sd, result):
    """Four PNGs a reader takes in at a glance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ages = records.age
    errors = pred - ages
    figures = {}

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(ages, pred, s=4, alpha=0.3)
    top = max(float(ages.max()), float(pred.max())) + 2
    ax.plot([0, top], [0, top], "k--", lw=1, label="identity")
    ax.set(xlabel="true age", ylabel="predicted age", title=f"MAE {result['mae']:.2f}", xlim=(0, top), ylim=(0, top))
    ax.legend()
    figures["pred_vs_true.png"] = fig

    fig, ax = plt.subplots(figsize=(6, 4))
    groups = result["age_groups"]
    ax.bar(list(groups), [v[0] for v in groups.values()])
    for x, (mae, n) in enumerate(groups.values()):
        ax.annotate(f"n={n}", (x, mae), ha="center", va="bottom", fontsize=8)
    ax.set(xlabel="age group", ylabel="MAE (years)", title="MAE by age group")
    figures["mae_by_age_group.png"] = fig

    fig, ax = plt.subplots(figsize=(5, 4))
    thresholds = np.arange(CA_CURVE_MAX + 1)
    ax.plot(thresholds, [cumulative_accuracy(errors, n) for n in thresholds], marker="o")
    ax.set(xlabel="n (years)", ylabel="CA(n)", title="cumulative accuracy", ylim=(0, 1))
    ax.grid(alpha=0.3)
    figures["cumulative_accuracy.png"] = fig

    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter(sd, np.abs(errors), s=4, alpha=0.3)
    ax.set(xlabel="predicted sd (years)", ylabel="|error| (years)", title="error against predicted uncertainty")
    figures["error_vs_sd.png"] = fig

    for name, fig in figures.items():
        fig.tight_layout()
        atomic_write(Path(output_dir) / name, lambda handle, fig=fig: fig.savefig(handle, format="png", dpi=100))
        plt.close(fig)
    return list(figures)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", required=True, help="folder with <dataset>_{train,valid}_align.csv")
    parser.add_argument("--dataset", required=True, help="data set name, the CSV prefix (utkface, morph, megaage, ...)")
    parser.add_argument("--resume", required=True,
                        help="model to evaluate: a .pth written by the training scripts, or an .onnx written by export.py")
    parser.add_argument("--output_dir", help="where report.json, errors.csv and the plots go (default: a folder named after the checkpoint)")
    parser.add_argument("--split", default="valid", choices=SPLITS, help="which CSV to score (default: valid)")
    parser.add_argument("--tta", action="store_true", help="average the predicted distributions of each face and its mirror")
    parser.add_argument("--expand", type=float, help="override the crop expand stored in the checkpoint")
    parser.add_argument("--multi_gpu", action="store_true", help="DataParallel over all visible GPUs")
    parser.add_argument("--ldl", action="store_true", help="accepted for old command lines; the objective comes from the checkpoint")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="force a device (default: cuda when available)")
    parser.add_argument("opts", nargs="*", metavar="KEY VALUE", help="config overrides as KEY VALUE pairs, e.g. TEST.BATCH_SIZE 64")
    return parser


def main(argv=None):
    from defaults import merge_opts

    args = build_parser().parse_intermixed_args(argv)
    model_file = load_model_file(args.resume)
    cfg = model_file.cfg
    if args.expand is not None:
        cfg.DATA.EXPAND = args.expand
    merge_opts(cfg, args.opts)
    path = csv_path(args.data_dir, args.dataset, args.split)
    if not path.is_file():
        raise SystemExit(f"split {args.split!r} does not exist: {path} not found")
    records = Records(path, args.data_dir)
    runtime = setup_runtime(args.device)
    backend = make_backend(model_file, runtime, cfg, multi_gpu=args.multi_gpu)
    loader = evaluation_loader(records, cfg, runtime)
    predictions = score_loader(backend, loader, runtime, tta=args.tta or cfg.TEST.TTA, desc=f"scoring {args.split}")
    pred, sd = predictions["age"], predictions["age_sd"]
    if not runtime.is_main:
        teardown(runtime)
        return None
    result = metrics(pred, records.age, records.gender if records.has_gender else None,
                     records.race if records.has_race else None)
    output_dir = Path(args.output_dir or Path(args.resume).with_suffix("")).expanduser()
    output_dir.mkdir(parents=True, exist_ok=True)
    report = report_json(result, args.resume, args.dataset, args.split, args.tta or cfg.TEST.TTA)
    atomic_write_text(output_dir / "report.json", json.dumps(report, indent=2) + "\n")
    write_errors_csv(output_dir / "errors.csv", records, pred, sd)
    plots = write_plots(output_dir, records, pred, sd, result)
    title = f"{args.dataset} {args.split}: {model_file.arch} ({model_file.objective}), {os.path.basename(args.resume)}"
    print(format_report(result, title))
    print(f"\nwrote {output_dir / 'report.json'}, errors.csv and {', '.join(plots)}")
    teardown(runtime)
    return report


if __name__ == "__main__":
    main()
