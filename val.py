"""Evaluate a checkpoint: MAE, CA(n), errors by age group, year, gender and ethnicity, the multitask
heads' accuracies, worst faces, plots.

    python val.py --data_dir D --dataset NAME --model CKPT|FILE.onnx [--output_dir OUT] [--split valid|test|train]
                  [--tta]

(--resume is the original's name for --model and works too.)

The objective, architecture, image size and expand come from the checkpoint
(or the export's metadata). Faces are scored by estimator.py, through PyTorch
or onnxruntime. The training loop calls `score_model` and `metrics` every epoch,
and `evaluate` once at its end to score its best checkpoint on the test CSV.
A checkpoint's run record (run_record.py) is repeated in report.json.
"""
import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cli import add_model_argument
from dataset import CachedBatches, FaceDataset
from estimator import TorchBackend, batch_estimates, load_model_file, make_backend
from files import atomic_write, check_output_dir
from model import input_settings
from records import ETHNICITY_NAMES, GENDER_NAMES, UNKNOWN, Records, csv_path
from runtime import EpochSampler, gather_objects, make_loader, setup_runtime, teardown

CA_THRESHOLDS = (3, 5, 7)
CA_CURVE_MAX = 10
# (label, lowest age, highest age), inclusive, as researchers report them
AGE_GROUPS = (("0-5", 0, 5), ("6-10", 6, 10), ("11-20", 11, 20), ("21-30", 21, 30),
              ("31-40", 31, 40), ("41-60", 41, 60), ("61+", 61, None))
SPLITS = ("valid", "test", "train")


def cumulative_accuracy(errors, n):
    """CA(n): the share of faces whose |predicted - true| is at most n years."""
    return float(np.mean(np.abs(errors) <= n)) if len(errors) else float("nan")


def error_stats(errors):
    """(N, MAE, mean signed error) of a set of faces; the signed mean shows which way a group is biased."""
    if not len(errors):
        return 0, float("nan"), float("nan")
    return int(len(errors)), float(np.abs(errors).mean()), float(errors.mean())


def stats_by_code(errors, codes, names):
    """{name: error_stats} for each class present in ``codes``; UNKNOWN codes are left out."""
    return {name: error_stats(errors[codes == code]) for code, name in enumerate(names) if (codes == code).any()}


def stats_by_age_group(errors, ages):
    table = {}
    for label, low, high in AGE_GROUPS:
        mask = (ages >= low) & (ages <= (high if high is not None else np.inf))
        if mask.any():
            table[label] = error_stats(errors[mask])
    return table


def stats_by_age(errors, ages):
    """{age: error_stats} for every age present: the per-year curve papers plot."""
    return {int(age): error_stats(errors[ages == age]) for age in np.unique(ages)}


def head_scores(probs, labels, num_classes):
    """Accuracy and confusion matrix (rows: true class, columns: predicted) over faces with a known label."""
    known = labels != UNKNOWN
    if not known.any():
        return None, None
    predicted = probs[known].argmax(axis=1)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels[known], predicted), 1)
    return float((predicted == labels[known]).mean()), confusion


def multitask_metrics(predictions, records, scored):
    """Gender and ethnicity accuracy and confusion, when the model has the heads and the CSV the labels."""
    result = {}
    for head, labels, names in (("gender", records.gender, GENDER_NAMES), ("race", records.ethnicity, ETHNICITY_NAMES)):
        probs = predictions.get(f"{head}_prob")
        accuracy, confusion = (None, None) if probs is None else head_scores(probs[scored], labels[scored], len(names))
        result[f"{head}_accuracy"], result[f"{head}_confusion"] = accuracy, confusion
    return result


def metrics(predictions, records):
    """Every figure of the report, from `score_dataset`'s arrays and the CSV's labels (``records.Records``).

    Faces that were not scored (NaN rows: unreadable images skipped under
    DATA.ON_BAD_IMAGE skip) are left out of every figure and counted as
    ``n_skipped``; faces whose box is the whole image because no face was
    detected are counted as ``n_fallback``, and ``mae_detected`` leaves them out.
    """
    scored = np.isfinite(predictions["age"])
    ages = records.age[scored].astype(np.float64)
    errors = predictions["age"][scored].astype(np.float64) - ages
    detected = ~records.fallback[scored]
    result = {"n": int(scored.sum()), "n_skipped": int((~scored).sum()), "n_fallback": int((~detected).sum()),
              "mae": error_stats(errors)[1], "mae_detected": error_stats(errors[detected])[1]}
    for n in CA_THRESHOLDS:
        result[f"ca{n}"] = cumulative_accuracy(errors, n)
    result["age_groups"] = stats_by_age_group(errors, ages)
    result["ages"] = stats_by_age(errors, ages)
    result["genders"] = stats_by_code(errors, records.gender[scored], GENDER_NAMES)
    result["ethnicities"] = stats_by_code(errors, records.ethnicity[scored], ETHNICITY_NAMES)
    result.update(multitask_metrics(predictions, records, scored))
    return result


def evaluation_loader(records, cfg, runtime, crops=None):
    """Batches of every face once, in CSV order per rank: gathered from the crop cache, or decoded per sample."""
    sampler = EpochSampler(len(records), shuffle=False, rank=runtime.rank, world_size=runtime.world_size)
    if crops is not None:
        return CachedBatches(records, crops, sampler, cfg.TEST.BATCH_SIZE, runtime)
    dataset = FaceDataset(records, cfg.MODEL.IMG_SIZE, cfg.DATA.EXPAND, on_bad_image=cfg.DATA.ON_BAD_IMAGE)
    return make_loader(dataset, sampler, cfg.TEST.BATCH_SIZE, cfg.TRAIN.WORKERS, runtime)


@torch.no_grad()
def score_dataset(backend, loader, runtime, tta=False, desc="validate"):
    """Estimates for every face of a loader's data set, gathered over all ranks, in CSV order.

    ``backend`` is an estimator.py backend (estimator.make_backend, or `score_model`'s for a model in training).
    Returns a dict of NumPy arrays: ``age`` and ``age_sd`` (N,), and for a
    multitask model ``gender_prob`` (N, 2) and ``race_prob`` (N, 5). Rows of
    faces that were not scored (unreadable images skipped) are NaN. The loop
    is batched and stays on the device; only the final arrays leave it.
    """
    parts = {}
    indices = []
    size = len(loader.dataset)
    bar = tqdm(loader, desc=desc, unit="batch", leave=False, disable=not runtime.is_main, dynamic_ncols=True)
    for batch in bar:
        if not len(batch.get("index", [])):
            continue
        for name, value in batch_estimates(backend.probabilities(batch["image"], tta)).items():
            parts.setdefault(name, []).append(value.cpu())
        indices.append(batch["index"] % size)
    local = (torch.cat(indices).numpy(), {k: torch.cat(v).numpy() for k, v in parts.items()}) if indices else None
    return _in_csv_order(gather_objects(runtime, local), size)


def score_model(model, loader, runtime, cfg, tta=False, desc="validate"):
    """`score_dataset` for a PyTorch model being trained: its input settings, channels_last and AMP from ``cfg``."""
    backend = TorchBackend(model, runtime, input_settings(cfg.MODEL.ARCH), cfg.MODEL.CHANNELS_LAST, cfg.TRAIN.AMP)
    return score_dataset(backend, loader, runtime, tta, desc)


def _in_csv_order(parts, size):
    """Every rank's (indices, arrays) put back in CSV order; faces no rank scored stay NaN."""
    result = {}
    for part in parts:
        if part is None:
            continue
        index, arrays = part
        for name, values in arrays.items():
            if name not in result:
                result[name] = np.full((size,) + values.shape[1:], np.nan)
            result[name][index] = values
    return result or {"age": np.full(size, np.nan), "age_sd": np.full(size, np.nan)}


def _group_lines(heading, table):
    lines = ["", f"{heading:<10} {'N':>7} {'MAE':>7} {'bias':>7}"]
    return lines + [f"{name:<10} {n:>7} {mae:>7.3f} {bias:>+7.2f}" for name, (n, mae, bias) in table.items()]


def _head_lines(heading, accuracy, confusion, names):
    """Accuracy, then the confusion matrix with true classes down and predicted classes across."""
    width = max(len(name) for name in names) + 1
    lines = ["", f"{heading} accuracy {accuracy:.3f} ({int(confusion.sum())} faces); rows true, columns predicted",
             " " * width + "".join(f"{name:>{width}}" for name in names)]
    return lines + [f"{name:<{width}}" + "".join(f"{count:>{width}}" for count in row) for name, row in zip(names, confusion)]


def _count_lines(result):
    lines = []
    if result["n_skipped"]:
        lines.append(f"{result['n_skipped']} unreadable images skipped (DATA.ON_BAD_IMAGE skip), not in any figure")
    if result["n_fallback"]:
        lines.append(f"{result['n_fallback']} of {result['n']} faces fell back to the whole image (no face detected); "
                     f"MAE over the {result['n'] - result['n_fallback']} detected faces: {result['mae_detected']:.3f}")
    return lines


def format_report(result, title):
    """Aligned plain-text tables, for the terminal and for pasting; bias is the mean signed error."""
    lines = [title, f"{'N':>8} {'MAE':>7} {'CA(3)':>7} {'CA(5)':>7} {'CA(7)':>7}",
             f"{result['n']:>8} {result['mae']:>7.3f} {result['ca3']:>7.3f} {result['ca5']:>7.3f} {result['ca7']:>7.3f}"]
    lines += _count_lines(result)
    tables = (("age group", result["age_groups"]), ("gender", result["genders"]), ("ethnicity", result["ethnicities"]))
    for heading, table in tables:
        if table:
            lines += _group_lines(heading, table)
    for heading, head, names in (("gender", "gender", GENDER_NAMES), ("ethnicity", "race", ETHNICITY_NAMES)):
        if result[f"{head}_accuracy"] is not None:
            lines += _head_lines(heading, result[f"{head}_accuracy"], result[f"{head}_confusion"], names)
    return "\n".join(lines)


def _finite_or_none(value):
    """JSON has no NaN: a figure over no faces is null."""
    return value if value is None or np.isfinite(value) else None


def _confusion_json(confusion, names):
    return None if confusion is None else {"classes": list(names), "matrix": confusion.tolist()}


def report_json(result, checkpoint, dataset, split, tta):
    """report.json: the contract's keys, then per-year errors, biases, multitask scores and counts."""
    figures = {key: _finite_or_none(result[key]) for key in ("n", "mae", "ca3", "ca5", "ca7")}
    return {
        **figures,
        "mae_by_age_group": {k: _finite_or_none(v[1]) for k, v in result["age_groups"].items()},
        "mae_by_gender": {k: _finite_or_none(v[1]) for k, v in result["genders"].items()},
        "mae_by_race": {k: _finite_or_none(v[1]) for k, v in result["ethnicities"].items()},
        "bias_by_age_group": {k: _finite_or_none(v[2]) for k, v in result["age_groups"].items()},
        "mae_by_age": {str(age): [n, mae, bias] for age, (n, mae, bias) in result["ages"].items()},
        "gender_accuracy": result["gender_accuracy"], "race_accuracy": result["race_accuracy"],
        "gender_confusion": _confusion_json(result["gender_confusion"], GENDER_NAMES),
        "race_confusion": _confusion_json(result["race_confusion"], ETHNICITY_NAMES),
        "n_skipped": result["n_skipped"], "n_fallback": result["n_fallback"],
        "mae_detected": _finite_or_none(result["mae_detected"]),
        "checkpoint": str(checkpoint), "dataset": dataset, "split": split, "tta": bool(tta),
    }


def predicted_class(predictions, head):
    """Each face's most probable class of a multitask head as a nullable integer; empty for an age-only model."""
    import pandas as pd

    probs = predictions.get(f"{head}_prob")
    if probs is None:
        return pd.array([pd.NA] * len(predictions["age"]), dtype="Int64")
    classes = pd.array(np.nan_to_num(probs).argmax(axis=1), dtype="Int64")
    classes[~np.isfinite(probs).all(axis=1)] = pd.NA
    return classes


def write_errors_csv(path, predictions, records):
    """One row per CSV row, worst first, so that the badly estimated faces are the top rows; unscored rows last, empty.

    ``pred_gender`` and ``pred_race`` use the CSV's codes (gender 0 male, 1 female; ethnicity 0..4, as in its race column).
    """
    import pandas as pd

    pred = predictions["age"]
    errors = pred - records.age
    frame = pd.DataFrame({"photo": records.photo, "age": records.age, "pred": np.round(pred, 3),
                          "error": np.round(errors, 3), "pred_sd": np.round(predictions["age_sd"], 3),
                          "pred_gender": predicted_class(predictions, "gender"),
                          "pred_race": predicted_class(predictions, "race")})
    worst_first = np.argsort(-np.nan_to_num(np.abs(errors), nan=-1.0), kind="stable")
    atomic_write(path, frame.iloc[worst_first].to_csv(index=False))


# the plots' heading (data set, split, model) in points, below matplotlib's axis titles
PLOT_TITLE_SIZE = 9
# mae_by_age.png: heights of the error panel and of the count of faces beneath it
MAE_BY_AGE_ROWS = (3, 1)


def _pred_vs_true(plt, ages, pred, errors, sd, result):
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(ages, pred, s=4, alpha=0.3)
    top = max(float(ages.max()), float(pred.max())) + 2
    ax.plot([0, top], [0, top], "k--", lw=1, label="identity")
    ax.set(xlabel="true age", ylabel="predicted age", title=f"MAE {result['mae']:.2f}", xlim=(0, top), ylim=(0, top))
    ax.legend()
    return fig


def _mae_by_age_group(plt, ages, pred, errors, sd, result):
    fig, ax = plt.subplots(figsize=(6, 4))
    groups = result["age_groups"]
    ax.bar(list(groups), [mae for _, mae, _ in groups.values()])
    for x, (n, mae, _) in enumerate(groups.values()):
        ax.annotate(f"n={n}", (x, mae), ha="center", va="bottom", fontsize=8)
    ax.set(xlabel="age group", ylabel="MAE (years)", title="MAE by age group")
    return fig


def _cumulative_accuracy(plt, ages, pred, errors, sd, result):
    fig, ax = plt.subplots(figsize=(5, 4))
    thresholds = np.arange(CA_CURVE_MAX + 1)
    ax.plot(thresholds, [cumulative_accuracy(errors, n) for n in thresholds], marker="o")
    ax.set(xlabel="n (years)", ylabel="CA(n)", title="cumulative accuracy", ylim=(0, 1))
    ax.grid(alpha=0.3)
    return fig


def _error_vs_sd(plt, ages, pred, errors, sd, result):
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter(sd, np.abs(errors), s=4, alpha=0.3)
    ax.set(xlabel="predicted sd (years)", ylabel="|error| (years)", title="error against predicted uncertainty")
    return fig


def standard_errors_of_mae(errors, ages, years):
    """The standard error of each year's MAE (NaN for a year of one face): how far its point can be trusted."""
    spread = []
    for year in years:
        absolute = np.abs(errors[ages == year])
        spread.append(absolute.std(ddof=1) / np.sqrt(len(absolute)) if len(absolute) > 1 else np.nan)
    return np.array(spread)


def _mae_by_age(plt, ages, pred, errors, sd, result):
    """Per-year MAE and mean signed error: where the model is biased (above 0: it overestimates). The MAE's
    standard-error bars and the count of faces beneath show which years rest on a handful of faces."""
    fig, (ax, counts) = plt.subplots(2, 1, figsize=(7, 5), sharex=True, gridspec_kw={"height_ratios": MAE_BY_AGE_ROWS})
    years = np.array(list(result["ages"]))
    n, mae, bias = (np.array(column, dtype=float) for column in zip(*result["ages"].values()))
    spread = standard_errors_of_mae(errors, ages, years)
    ax.errorbar(years, mae, yerr=spread, marker=".", elinewidth=1, label="MAE ± 1 standard error")
    ax.plot(years, bias, marker=".", label="mean signed error")
    ax.axhline(0, color="k", lw=1)
    ax.set(ylabel="years", title="error by year of age")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    counts.bar(years, n, width=1.0)
    counts.set(xlabel="true age", ylabel="faces")
    counts.grid(alpha=0.3)
    return fig


PLOTS = {"pred_vs_true.png": _pred_vs_true, "mae_by_age_group.png": _mae_by_age_group,
         "cumulative_accuracy.png": _cumulative_accuracy, "error_vs_sd.png": _error_vs_sd, "mae_by_age.png": _mae_by_age}


def draw_plots(predictions, records, result, title):
    """{file name: figure} for the scored faces, each figure headed by ``title`` (data set, split, model file), so a
    plot read on its own still says what it shows; {} when no face was scored."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = np.isfinite(predictions["age"])
    if not scored.any():
        return {}
    ages, pred, sd = records.age[scored], predictions["age"][scored], predictions["age_sd"][scored]
    figures = {}
    for name, draw in PLOTS.items():
        figures[name] = draw(plt, ages, pred, pred - ages, sd, result)
        figures[name].suptitle(title, fontsize=PLOT_TITLE_SIZE)
        figures[name].tight_layout()
    return figures


def write_plots(output_dir, predictions, records, result, title):
    """Five PNGs a reader takes in at a glance, over the scored faces; returns their names."""
    figures = draw_plots(predictions, records, result, title)
    import matplotlib.pyplot as plt  # after draw_plots has chosen the Agg backend

    for name, fig in figures.items():
        atomic_write(Path(output_dir) / name, lambda handle, fig=fig: fig.savefig(handle, format="png", dpi=100))
        plt.close(fig)
    return list(figures)


def write_report(output_dir, predictions, records, title, provenance, extra=None):
    """report.json, errors.csv and the plots in ``output_dir``, and the tables on stdout; returns the report.

    ``provenance`` is (checkpoint, dataset, split, tta), recorded in report.json, and ``extra`` is added to it.
    """
    result = metrics(predictions, records)
    report = {**report_json(result, *provenance), **(extra or {})}
    atomic_write(output_dir / "report.json", json.dumps(report, indent=2) + "\n")
    write_errors_csv(output_dir / "errors.csv", predictions, records)
    plots = write_plots(output_dir, predictions, records, result, title)
    print(format_report(result, title))
    print(f"\nwrote {output_dir / 'report.json'}, errors.csv" + "".join(f", {name}" for name in plots))
    return report


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", required=True, help="folder with <dataset>_{train,valid}_align.csv")
    parser.add_argument("--dataset", required=True, help="data set name, the CSV prefix (utkface, morph, megaage, ...)")
    add_model_argument(parser, "model to evaluate: a .pth written by the training scripts, or an .onnx written by export.py",
                       required=True)
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
    from defaults import check_config, merge_opts

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


def evaluate(model_file, cfg, records, runtime, output_dir, data, tta=False, multi_gpu=False, extra=None):
    """Score ``records`` (the CSV of ``data``: (dataset, split)) with ``model_file`` (estimator.load_model_file)
    on every rank, and write the report in ``output_dir`` on the main one, which gets it (the others get None).

    report.json carries the checkpoint's run record and ``extra``.
    """
    dataset, split = data
    backend = make_backend(model_file, runtime, cfg, multi_gpu=multi_gpu)
    loader = evaluation_loader(records, cfg, runtime)
    predictions = score_dataset(backend, loader, runtime, tta=tta, desc=f"scoring {split}")
    if not runtime.is_main:
        return None
    title = f"{dataset} {split}: {model_file.arch} ({model_file.objective}), {os.path.basename(model_file.path)}"
    record = {"run_record": (model_file.state or {}).get("record")}
    return write_report(output_dir, predictions, records, title, (model_file.path, dataset, split, tta),
                        {**record, **(extra or {})})


if __name__ == "__main__":
    main()
