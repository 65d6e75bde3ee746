"""history.csv is appended (rewritten only to add a column); curves.png pictures it after every epoch of a real run."""
import csv

import pytest
import torch
from PIL import Image

import history


def rows_of(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def epoch_row(epoch, mae):
    return {"epoch": epoch, "lr": 0.001, "train_loss": 10.0 / epoch, "train_mae": 9.0, "mae": mae, "ca3": 0.2,
            "ca5": 0.3, "ca7": 0.4, "gender_accuracy": None, "seconds": 1.5, "not_a_column": "ignored"}


def test_rows_are_appended_to_the_same_file_with_one_header(tmp_path):
    history.append_history(tmp_path, epoch_row(1, 12.0))
    path = tmp_path / history.HISTORY_NAME
    before, inode = path.read_bytes(), path.stat().st_ino
    history.append_history(tmp_path, epoch_row(2, 11.0))
    assert path.read_bytes().startswith(before) and path.stat().st_ino == inode, "appended in place, not rewritten"
    assert path.read_text().count("epoch,") == 1
    rows = rows_of(path)
    assert [r["epoch"] for r in rows] == ["1", "2"] and tuple(rows[0]) == history.HISTORY_FIELDS
    assert rows[0]["gender_accuracy"] == "" and rows[1]["mae"] == "11"


def test_a_torn_last_row_is_cut_and_an_old_header_upgraded_keeping_rows(tmp_path):
    path = tmp_path / history.HISTORY_NAME
    path.write_text("epoch,lr,train_loss,train_mae,mae,ca3,ca5,ca7,seconds\n"
                    "1,0.001,5,9,12,0.2,0.3,0.4,1.5\n2,0.001,4,8,11,0.2,0.3,0.4,1.5\n3,0.00")
    history.append_history(tmp_path, epoch_row(3, 10.0))
    rows = rows_of(path)
    assert [(r["epoch"], r["mae"]) for r in rows] == [("1", "12"), ("2", "11"), ("3", "10")]
    assert tuple(rows[0]) == history.HISTORY_FIELDS and rows[0]["train_gender_accuracy"] == ""


def test_read_back_keeps_the_latest_row_of_a_repeated_epoch(tmp_path):
    """A run resumed from an earlier checkpoint logs that epoch again; the plot follows the resumed run."""
    for epoch, mae in ((1, 12.0), (2, 11.0), (3, 10.0), (2, 9.0)):
        history.append_history(tmp_path, epoch_row(epoch, mae))
    rows = history.read_history(tmp_path)
    assert [(r["epoch"], r["mae"]) for r in rows] == [(1, 12.0), (2, 9.0), (3, 10.0)]
    assert rows[0]["gender_accuracy"] is None
    assert history.best_epoch(rows) == 2
    assert history.best_epoch(rows, "mae", max) == 1


def assert_valid_png(path):
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) > 100


def test_age_only_run_logs_empty_accuracies_and_draws_curves(trained_ldl):
    rows = rows_of(trained_ldl["checkpoint"] / history.HISTORY_NAME)
    assert len(rows) == 10 and all(r[name] == "" for r in rows for name in history.HEAD_ACCURACY_FIELDS)
    assert_valid_png(trained_ldl["checkpoint"] / history.CURVES_NAME)


def test_multitask_run_logs_train_and_validation_accuracies_and_draws_curves(trained_mt):
    checkpoint = trained_mt["checkpoint"]
    rows = rows_of(checkpoint / history.HISTORY_NAME)
    assert [int(r["epoch"]) for r in rows] == list(range(1, 7))
    for row in rows:
        assert all(0.0 <= float(row[name]) <= 1.0 for name in history.HEAD_ACCURACY_FIELDS)
    saved = torch.load(checkpoint / "last.pth", weights_only=True)["metrics"]
    assert float(rows[-1]["gender_accuracy"]) == pytest.approx(saved["gender_accuracy"], rel=1e-5)
    assert float(rows[-1]["race_accuracy"]) == pytest.approx(saved["race_accuracy"], rel=1e-5)
    assert_valid_png(checkpoint / history.CURVES_NAME)


@pytest.mark.parametrize("epochs", [1, 2, 3, 7, 40])
def test_curves_are_ticked_at_whole_epochs_only(epochs):
    """A short run's axis once read 1.2, 1.4, ...: epochs between epochs that never happened."""
    rows = [{**{name: None for name in history.HISTORY_FIELDS}, **epoch_row(epoch, 12.0 - epoch / 10)}
            for epoch in range(1, epochs + 1)]
    fig = history.draw_curves(rows)
    import matplotlib.pyplot  # after draw_curves has chosen the Agg backend

    try:
        for ax in fig.axes:
            low, high = ax.get_xlim()
            ticks = [tick for tick in ax.get_xticks() if low <= tick <= high]
            assert ticks and all(float(tick).is_integer() for tick in ticks), (ax.get_title(), ticks)
    finally:
        matplotlib.pyplot.close(fig)
