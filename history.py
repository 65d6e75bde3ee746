"""The per-epoch log of a run: ``history.csv`` and its picture, ``curves.png``.

Rows are appended and fsynced, so that a crash or a second writer can at worst
tear the row being written (cut off by the next append), never lose earlier
ones. Every file has the same columns; the gender and ethnicity accuracies are
empty for an age-only run. A log written before a column was added is the one
case of a rewrite: once, atomically, with its rows kept (_upgrade_header).
"""
import csv
import os
from pathlib import Path

import numpy as np

from files import atomic_write, csv_text

HISTORY_NAME = "history.csv"
CURVES_NAME = "curves.png"
HEAD_ACCURACY_FIELDS = ("train_gender_accuracy", "train_race_accuracy", "gender_accuracy", "race_accuracy")
# raw_mae: with TRAIN.EMA, the MAE of the weights being trained, beside the averaged weights' mae
HISTORY_FIELDS = ("epoch", "lr", "train_loss", "train_mae", "mae", "ca3", "ca5", "ca7",
                  *HEAD_ACCURACY_FIELDS, "raw_mae", "seconds")
CURVES_SIZE = (11, 3.2)
CURVES_DPI = 100


def _format(value):
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else value


def _csv_text(rows, header):
    """``rows`` (dicts) under HISTORY_FIELDS; keys outside them are left out, missing ones left empty."""
    return csv_text(([HISTORY_FIELDS] if header else []) + [[_format(row.get(k)) for k in HISTORY_FIELDS] for row in rows])


def _drop_torn_row(path):
    """A crash in the middle of an append leaves a row without its newline; cut it off before appending."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as handle:
            handle.truncate(data.rfind(b"\n") + 1)


def _upgrade_header(path):
    """A log written before a column was added gets the current columns once, its rows kept, atomically."""
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if tuple(reader.fieldnames or ()) == HISTORY_FIELDS:
            return
        rows = list(reader)
    atomic_write(path, _csv_text(rows, header=True))


def append_history(checkpoint_dir, row):
    """Append one epoch's row to ``checkpoint_dir/history.csv``; keys outside HISTORY_FIELDS are ignored.

    The header is written once, when the file is new or empty.
    """
    path = Path(checkpoint_dir) / HISTORY_NAME
    exists = path.is_file() and path.stat().st_size > 0
    if exists:
        _drop_torn_row(path)
        _upgrade_header(path)
    with open(path, "a", newline="") as handle:
        handle.write(_csv_text([row], header=not exists))
        handle.flush()
        os.fsync(handle.fileno())
    return path


def read_history(checkpoint_dir):
    """The log's rows as dicts of floats (None where a column is empty), the last row of each epoch kept.

    A run resumed from an earlier checkpoint logs its epochs again; its rows replace the old ones.
    """
    path = Path(checkpoint_dir) / HISTORY_NAME
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        rows = [{k: float(v) if v not in ("", None) else None for k, v in row.items() if k is not None}
                for row in csv.DictReader(handle)]
    by_epoch = {int(row["epoch"]): row for row in rows if row.get("epoch") is not None}
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def _column(rows, name):
    return np.array([np.nan if row.get(name) is None else row[name] for row in rows], dtype=float)


def best_epoch(rows, metric="mae", pick=min):
    """The first epoch with the best ``metric`` (as the loop picks best.pth), or None when none is finite."""
    values = _column(rows, metric)
    if not np.isfinite(values).any():
        return None
    index = np.nanargmin(values) if pick is min else np.nanargmax(values)
    return int(rows[index]["epoch"])


def _panels(rows):
    """(title, [(column, label), ...]) for each panel; the accuracy panel only for a multitask run."""
    panels = [("loss", [("train_loss", "train")]),
              ("MAE (years)", [("train_mae", "train"), ("mae", "validation")]),
              ("CA(5)", [("ca5", "validation")])]
    if any(np.isfinite(_column(rows, name)).any() for name in HEAD_ACCURACY_FIELDS):
        panels.append(("gender / ethnicity accuracy",
                       [("train_gender_accuracy", "gender, train"), ("gender_accuracy", "gender, validation"),
                        ("train_race_accuracy", "ethnicity, train"), ("race_accuracy", "ethnicity, validation")]))
    return panels


def write_curves(checkpoint_dir, metric="mae", pick=min):
    """Draw the log as ``checkpoint_dir/curves.png``, written atomically; the best epoch is a dashed line."""
    rows = read_history(checkpoint_dir)
    if not rows:
        return None
    fig = draw_curves(rows, metric, pick)
    import matplotlib.pyplot as plt  # after draw_curves has chosen the Agg backend

    path = Path(checkpoint_dir) / CURVES_NAME
    atomic_write(path, lambda partial: fig.savefig(partial, format="png", dpi=CURVES_DPI))
    plt.close(fig)
    return path


def draw_curves(rows, metric="mae", pick=min):
    """The figure of ``rows`` (read_history's), one panel per quantity, ticked at whole epochs only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = _column(rows, "epoch")
    best = best_epoch(rows, metric, pick)
    panels = _panels(rows)
    fig, axes = plt.subplots(1, len(panels), figsize=(CURVES_SIZE[0] * len(panels) / 3, CURVES_SIZE[1]), squeeze=False)
    for ax, (title, series) in zip(axes[0], panels):
        for name, label in series:
            ax.plot(epochs, _column(rows, name), marker="o", markersize=3, label=label)
        if best is not None:
            ax.axvline(best, color="k", linestyle="--", linewidth=1, label=f"best ({metric}), epoch {best}")
        ax.set(xlabel="epoch", title=title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # a one-epoch run too
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
