"""Scoring a model on a data set: its estimates for every face, in CSV order over all ranks, and the figures
researchers report (MAE, CA(n), errors by age group, year, gender and ethnicity, the multitask heads' accuracies).

The training loop scores its validation CSV with these every epoch, and val.py and the loop's final test scoring
write them out through evaluation.py.
"""
import math

import numpy as np
import torch
from tqdm import tqdm

from dataset import CachedBatches, FaceDataset
from estimator import TorchBackend, batch_estimates
from model import input_settings
from records import ETHNICITY_NAMES, GENDER_NAMES, UNKNOWN
from runtime import EpochSampler, gather_objects, make_loader

CA_THRESHOLDS = (3, 5, 7)
# (label, lowest age, highest age), inclusive, as researchers report them
AGE_GROUPS = (("0-5", 0, 5), ("6-10", 6, 10), ("11-20", 11, 20), ("21-30", 21, 30),
              ("31-40", 31, 40), ("41-60", 41, 60), ("61+", 61, None))


# characters per age group in the printed grid of bias by ethnicity: "-10.25 (1234)" and a space
GRID_COLUMN = 14

# the share of a Gaussian within ± 1 sd of its mean: what an honest predicted sd covers
HONEST_SD_COVERAGE = math.erf(1 / math.sqrt(2))


def best_rule(dataset):
    """The original's rule for the best epoch: MegaAge data sets keep the best CA(3), the others the best MAE."""
    return ("ca3", max) if "megaage" in dataset.lower() else ("mae", min)


def is_better(value, best, rule):
    _, pick = rule
    return best is None or (value != best and pick(value, best) == value)


def cumulative_accuracy(errors, n):
    """CA(n): the share of faces whose |predicted - true| is at most n years."""
    return float(np.mean(np.abs(errors) <= n)) if len(errors) else float("nan")


def error_stats(errors):
    """(N, MAE, mean signed error) of a set of faces; the signed mean shows which way a group is biased."""
    if not len(errors):
        return 0, float("nan"), float("nan")
    return int(len(errors)), float(np.abs(errors).mean()), float(errors.mean())


def by_class(codes, names, figures):
    """{name: figures(mask of its faces)} for each class present in ``codes``; UNKNOWN codes are left out."""
    return {name: figures(codes == code) for code, name in enumerate(names) if (codes == code).any()}


def age_group_masks(ages):
    """(label, mask) for each age group with faces."""
    for label, low, high in AGE_GROUPS:
        mask = (ages >= low) & (ages <= (high if high is not None else np.inf))
        if mask.any():
            yield label, mask


def stats_by_age_group(errors, ages):
    return {label: error_stats(errors[mask]) for label, mask in age_group_masks(ages)}


def share(flags):
    """The share of True in a boolean array, NaN for none."""
    return float(flags.mean()) if len(flags) else float("nan")


def sd_coverage(errors, sds, ages):
    """How often the true age lies within the predicted age ± its sd, overall and by age group: about 68% where
    the sd is an honest error bar (a Gaussian's ±1 sd), which is how demo.py and the page show it."""
    covered = np.abs(errors) <= sds
    return share(covered), {label: share(covered[mask]) for label, mask in age_group_masks(ages)}


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
    result["sd_coverage"], result["sd_coverage_by_age_group"] = sd_coverage(
        errors, predictions["age_sd"][scored].astype(np.float64), ages)
    result["ages"] = stats_by_age(errors, ages)
    result["genders"] = by_class(records.gender[scored], GENDER_NAMES, lambda faces: error_stats(errors[faces]))
    ethnicity = records.ethnicity[scored]
    result["ethnicities"] = by_class(ethnicity, ETHNICITY_NAMES, lambda faces: error_stats(errors[faces]))
    # an ethnicity's bias at some ages hides in the tables above where a data set's ethnicities differ in age mix
    # (UTKFace's Asian faces are mostly young)
    result["ethnicity_age_groups"] = by_class(ethnicity, ETHNICITY_NAMES,
                                              lambda faces: stats_by_age_group(errors[faces], ages[faces]))
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
        for name, value in batch_estimates(backend.probabilities(batch["image"], tta), backend.sd_scale).items():
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


def _group_lines(heading, table, coverage=None):
    """N, MAE and bias per group; with ``coverage`` ({group: share}), how often age ± sd holds the true age."""
    extra = lambda name: f" {coverage[name]:>7.3f}" if coverage else ""  # noqa: E731
    lines = ["", f"{heading:<10} {'N':>7} {'MAE':>7} {'bias':>7}" + (f" {'±sd':>7}" if coverage else "")]
    return lines + [f"{name:<10} {n:>7} {mae:>7.3f} {bias:>+7.2f}" + extra(name)
                    for name, (n, mae, bias) in table.items()]


def _bias_grid_lines(heading, table):
    """Mean signed error and faces for each class (down) and age group (across): where a class's bias lies."""
    groups = [label for label, _, _ in AGE_GROUPS]
    lines = ["", f"bias by {heading} and age group (mean signed error, faces)",
             f"{heading:<10}" + "".join(f"{label:>{GRID_COLUMN}}" for label in groups)]
    for name, by_group in table.items():
        cells = [f"{by_group[label][2]:+.2f} ({by_group[label][0]})" if label in by_group else "" for label in groups]
        lines.append(f"{name:<10}" + "".join(f"{cell:>{GRID_COLUMN}}" for cell in cells))
    return lines


def _head_lines(heading, accuracy, confusion, names):
    """Accuracy, then the confusion matrix with true classes down and predicted classes across."""
    width = max(len(name) for name in names) + 1
    lines = ["", f"{heading} accuracy {accuracy:.3f} ({int(confusion.sum())} faces); rows true, columns predicted",
             " " * width + "".join(f"{name:>{width}}" for name in names)]
    return lines + [f"{name:<{width}}" + "".join(f"{count:>{width}}" for count in row)
                    for name, row in zip(names, confusion)]


def _count_lines(result):
    lines = []
    if result["n_skipped"]:
        lines.append(f"{result['n_skipped']} unreadable images skipped (DATA.ON_BAD_IMAGE skip), not in any figure")
    if result["n_fallback"]:
        lines.append(f"{result['n_fallback']} of {result['n']} faces fell back to the whole image (no face detected); "
                     f"MAE over the {result['n'] - result['n_fallback']} detected faces: {result['mae_detected']:.3f}")
    return lines


def format_report(result, title):
    """Aligned plain-text tables, for the terminal and for pasting; bias is the mean signed error, ±sd the share of
    faces whose true age lies within the predicted age ± sd."""
    lines = [title, f"{'N':>8} {'MAE':>7} {'CA(3)':>7} {'CA(5)':>7} {'CA(7)':>7}",
             f"{result['n']:>8} {result['mae']:>7.3f} "
             f"{result['ca3']:>7.3f} {result['ca5']:>7.3f} {result['ca7']:>7.3f}"]
    lines += _count_lines(result)
    if result["n"]:
        lines.append(f"predicted age ± sd holds the true age for {result['sd_coverage']:.1%} of the faces "
                     f"({HONEST_SD_COVERAGE:.1%} if the sd is an honest error bar)")
    if result["age_groups"]:
        lines += _group_lines("age group", result["age_groups"], result["sd_coverage_by_age_group"])
    for heading, table in (("gender", result["genders"]), ("ethnicity", result["ethnicities"])):
        if table:
            lines += _group_lines(heading, table)
    if result["ethnicity_age_groups"]:
        lines += _bias_grid_lines("ethnicity", result["ethnicity_age_groups"])
    for heading, head, names in (("gender", "gender", GENDER_NAMES), ("ethnicity", "race", ETHNICITY_NAMES)):
        if result[f"{head}_accuracy"] is not None:
            lines += _head_lines(heading, result[f"{head}_accuracy"], result[f"{head}_confusion"], names)
    return "\n".join(lines)
