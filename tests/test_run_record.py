"""What a run keeps of what made it (run_record.py), its best model scored once on a test CSV, val.py --split test,
and TensorBoard's event files (LOG.TENSORBOARD)."""
import csv
import importlib.metadata
import json
import subprocess

import pytest
import torch

import run_record
import train
import val
from checkpoint import TEST_REPORT_DIR
from conftest import ROOT, make_split, utkface_files, write_csv
from history import read_history, best_epoch
from preprocessing import split_record

TINY = ["MODEL.ARCH", "tinyage", "MODEL.IMG_SIZE", "32", "TRAIN.BATCH_SIZE", "32", "TRAIN.WORKERS", "0"]
TEST_FACES = 40
EPOCHS = 2


def run_args(data, folder, *extra):
    return ["--data_dir", str(data), "--dataset", "utk", "--checkpoint", str(folder), *extra]


@pytest.fixture(scope="module")
def run_with_test(tmp_path_factory):
    """A two-epoch run on 64 real faces, validated on 16, with a test CSV of 40 others and TensorBoard on."""
    data = tmp_path_factory.mktemp("with_test")
    make_split(data, 64, 16, seed=4)
    write_csv(data / "utk_test_align.csv", utkface_files()[-TEST_FACES:])
    argv = run_args(data, data / "run", *TINY, "TRAIN.EPOCHS", str(EPOCHS), "LOG.TENSORBOARD", "True")
    train.fit("ldl", argv)
    return data, data / "run", argv


def git(*args):
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True).stdout.strip()


def test_the_run_folder_and_every_checkpoint_record_what_made_the_run(run_with_test):
    data, run, argv = run_with_test
    record = json.loads((run / run_record.RECORD_NAME).read_text())
    assert record["git"] == {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}
    assert record["argv"] == argv and record["command"].endswith(" ".join(argv))
    assert record["config"]["LOG"]["TENSORBOARD"] is True and record["config"]["TRAIN"]["EPOCHS"] == EPOCHS
    assert record["packages"]["torch"] == importlib.metadata.version("torch")
    assert set(record["packages"]) == {"torch", "torchvision", "dlib", "albumentations"}
    assert "not installed" not in record["packages"].values()
    assert record["device"] == run_record.cpu_name() and record["precision"] in ("bf16", "off")
    assert record["split_sha256"] == {f"utk_{side}_align.csv": split_record.digest((data / f"utk_{side}_align.csv")
                                                                                     .read_bytes())
                                      for side in ("train", "valid", "test")}
    for name in ("best.pth", "last.pth"):
        assert torch.load(run / name, map_location="cpu", weights_only=True)["record"] == record


def test_outside_a_git_checkout_the_commit_is_unknown(tmp_path):
    assert run_record.git_state(tmp_path) == {"commit": "unknown", "dirty": "unknown"}


def test_the_best_model_on_valid_is_scored_once_on_test_and_val_py_agrees(run_with_test, tmp_path):
    data, run, _ = run_with_test
    report = json.loads((run / TEST_REPORT_DIR / "report.json").read_text())
    best = best_epoch(read_history(run))
    assert (report["split"], report["n"]) == ("test", TEST_FACES)
    assert report["model_selection"]["split"] == "valid" and report["model_selection"]["epoch"] == best
    assert report["model_selection"]["valid"]["mae"] == pytest.approx(read_history(run)[best - 1]["mae"], rel=1e-5)
    with open(run / TEST_REPORT_DIR / "errors.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == TEST_FACES

    scored = val.main(["--data_dir", str(data), "--dataset", "utk", "--model", str(run / "best.pth"),
                       "--split", "test", "--output_dir", str(tmp_path / "val")])
    assert (scored["n"], scored["split"]) == (TEST_FACES, "test")
    assert scored["mae"] == pytest.approx(report["mae"], abs=1e-6), "the same model on the same faces"
    assert scored["run_record"] == json.loads((run / run_record.RECORD_NAME).read_text())


def test_val_py_names_the_options_that_write_a_missing_test_csv(run_with_test, tmp_path):
    _, run, _ = run_with_test
    make_split(tmp_path, 8, 8)
    with pytest.raises(SystemExit, match=r"split 'test' does not exist: .*utk_test_align.csv not found "
                                         r"\(preprocessing writes it with --test_ratio or --folds\)"):
        val.main(["--data_dir", str(tmp_path), "--dataset", "utk", "--model", str(run / "best.pth"), "--split", "test"])


def test_tensorboard_events_hold_the_loss_the_lr_and_the_validation_mae(run_with_test):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run, _ = run_with_test
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/lr", "valid/mae", "valid/ca5"} <= set(events.Tags()["scalars"])
    assert len(events.Scalars("train/loss")) >= EPOCHS, "one point per check-in, one check-in per epoch at least"
    maes = [(event.step, event.value) for event in events.Scalars("valid/mae")]
    assert maes == [(row["epoch"], pytest.approx(row["mae"], rel=1e-5)) for row in read_history(run)]


def test_without_tensorboard_or_a_test_csv_nothing_more_is_written_and_overwrite_leaves_none_of_the_old_run(
        tmp_path):
    make_split(tmp_path, 64, 16, seed=5)
    test_csv = tmp_path / "utk_test_align.csv"
    write_csv(test_csv, utkface_files()[-8:])
    train.fit("ldl", run_args(tmp_path, tmp_path / "run", *TINY, "TRAIN.EPOCHS", "1", "LOG.TENSORBOARD", "True"))
    assert (tmp_path / "run" / "tensorboard").is_dir() and (tmp_path / "run" / TEST_REPORT_DIR).is_dir()
    test_csv.unlink()
    train.fit("ldl", run_args(tmp_path, tmp_path / "run", "--overwrite", *TINY, "TRAIN.EPOCHS", "1"))
    assert not (tmp_path / "run" / "tensorboard").exists() and not (tmp_path / "run" / TEST_REPORT_DIR).exists()
    assert (tmp_path / "run" / "history.csv").is_file() and (tmp_path / "run" / "curves.png").is_file()
