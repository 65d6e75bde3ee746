"""A model's report on a data set: report.json, errors.csv (worst faces first), the plots, and the tables on stdout.

val.py writes one for any model file, and the training loop one for its best checkpoint on a test CSV.
A checkpoint's run record (run_record.py) is repeated in report.json.
"""
import json
import os
from pathlib import Path

import numpy as np

from checkpoint import BEST_NAME, TEST_REPORT_DIR
from estimator import load_model_file, make_backend
from files import atomic_write
from records import ETHNICITY_NAMES, GENDER_NAMES
from scoring import cumulative_accuracy, evaluation_loader, format_report, metrics, score_dataset


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
        "by_race_and_age_group": {race: {group: [n, mae, bias] for group, (n, mae, bias) in groups.items()}
                                  for race, groups in result["ethnicity_age_groups"].items()},
        "sd_coverage": _finite_or_none(result["sd_coverage"]),
        "sd_coverage_by_age_group": {k: _finite_or_none(v) for k, v in result["sd_coverage_by_age_group"].items()},
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

    ``pred_gender`` and ``pred_race`` use the CSV's codes (gender 0 male, 1 female; ethnicity 0..4, as in its race
    column).
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


# cumulative_accuracy.png's curve runs over n = 0 .. this many years
CA_CURVE_MAX = 10
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


def _per_year_panels(plt, result):
    """An error panel by year of age above the count of faces each year rests on: (figure, error axes, years, and
    each year's n, MAE and mean signed error)."""
    fig, (ax, counts) = plt.subplots(2, 1, figsize=(7, 5), sharex=True, gridspec_kw={"height_ratios": MAE_BY_AGE_ROWS})
    years = np.array(list(result["ages"]))
    n, mae, bias = (np.array(column, dtype=float) for column in zip(*result["ages"].values()))
    counts.bar(years, n, width=1.0)
    counts.set(xlabel="true age", ylabel="faces")
    counts.grid(alpha=0.3)
    return fig, ax, years, (n, mae, bias)


def _finish_error_panel(ax, title):
    """The zero line (no bias), the title, grid and legend of a per-year error panel."""
    ax.axhline(0, color="k", lw=1)
    ax.set(ylabel="years", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _mae_by_age(plt, ages, pred, errors, sd, result):
    """Per-year MAE and mean signed error: where the model is biased (above 0: it overestimates). The MAE's
    standard-error bars and the count of faces beneath show which years rest on a handful of faces."""
    fig, ax, years, (_, mae, bias) = _per_year_panels(plt, result)
    ax.errorbar(years, mae, yerr=standard_errors_of_mae(errors, ages, years), marker=".", elinewidth=1,
                label="MAE ± 1 standard error")
    ax.plot(years, bias, marker=".", label="mean signed error")
    _finish_error_panel(ax, "error by year of age")
    return fig


def signed_error_spread(errors, ages, years):
    """Each year's sd of the signed error (NaN for a year of one face): how widely its faces scatter about the bias."""
    return np.array([errors[ages == year].std(ddof=1) if (ages == year).sum() > 1 else np.nan for year in years])


def _bias_by_age(plt, ages, pred, errors, sd, result):
    """Mean signed error per year with a band of ± its faces' sd: which ages are estimated too old (above 0) or too
    young, and how far single faces stray; the count of faces beneath, as in mae_by_age.png."""
    fig, ax, years, (_, _, bias) = _per_year_panels(plt, result)
    spread = signed_error_spread(errors, ages, years)
    ax.fill_between(years, bias - spread, bias + spread, alpha=0.3, label="± 1 sd of the signed error")
    ax.plot(years, bias, marker=".", label="mean signed error (predicted − true)")
    _finish_error_panel(ax, "signed error by year of age")
    return fig


PLOTS = {"pred_vs_true.png": _pred_vs_true, "mae_by_age_group.png": _mae_by_age_group,
         "cumulative_accuracy.png": _cumulative_accuracy, "error_vs_sd.png": _error_vs_sd,
         "mae_by_age.png": _mae_by_age, "bias_by_age.png": _bias_by_age}


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
    """The PNGs of PLOTS, each taken in at a glance, over the scored faces; returns their names."""
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


def score_best_on_test(checkpoint_dir, rule, records, runtime, dataset, tta):
    """Score best.pth, the epoch chosen on valid by ``rule``, once on the test CSV: TEST_REPORT_DIR/report.json
    (with errors.csv and the plots) says which split and rule chose it and that epoch's valid figures, beside the
    test ones."""
    best = load_model_file(Path(checkpoint_dir) / BEST_NAME)
    metric, pick = rule
    chosen = best.state["metrics"]
    selection = {"split": "valid", "rule": f"{pick.__name__} {metric}", "epoch": best.state["epoch"] + 1,
                 "valid": {key: chosen.get(key) for key in ("n", "mae", "ca3", "ca5", "ca7")}}
    output_dir = Path(checkpoint_dir) / TEST_REPORT_DIR
    if runtime.is_main:
        output_dir.mkdir(exist_ok=True)
        print(f"\nthe model chosen on valid (best {metric}, epoch {selection['epoch']}), scored once on test:")
    evaluate(best, best.cfg, records, runtime, output_dir, (dataset, "test"), tta=tta,
             extra={"model_selection": selection})
