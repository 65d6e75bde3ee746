"""crossval.py over folds that preprocessing/utkface.py --folds wrote from real UTKFace faces (real dlib detections):
every fold trained, its best model scored on its test part, mean ± sd printed, per-fold JSON, and a rerun resumes."""
import json
import os
import re
import shutil
import statistics
import subprocess
import sys

import pytest

import crossval
from checkpoint import TEST_REPORT_DIR
from conftest import ROOT, UTKFACE, utkface_files
from preprocessing import utkface

FOLDS = 2
FACES = 45
FACE_STRIDE = 97
TINY = ["MODEL.ARCH", "tinyage", "MODEL.IMG_SIZE", "32", "TRAIN.EPOCHS", "1", "TRAIN.BATCH_SIZE", "16",
        "TRAIN.WORKERS", "0", "--device", "cpu"]
SUMMARY = re.compile(r"MAE (\d+\.\d+) ± (\d+\.\d+)  CA\(3\) (\d\.\d+) ± (\d\.\d+)  CA\(5\) (\d\.\d+) ± (\d\.\d+)")


@pytest.fixture(scope="module")
def folds(tmp_path_factory):
    root = tmp_path_factory.mktemp("crossval")
    images = root / "images"
    images.mkdir()
    for path, *_ in utkface_files()[::FACE_STRIDE][:FACES]:
        (images / path.name).symlink_to(UTKFACE / path.name)
    utkface.main(["--img_dir", str(images), "--output_dir", str(root / "folds"), "--valid_ratio", "0.2",
                  "--folds", str(FOLDS), "--workers", "1"])
    return root


def crossval_run(root, *extra):
    command = [sys.executable, str(ROOT / "crossval.py"), "--data_dir", str(root / "folds"), "--dataset", "utkface",
               "--script", "train-ldl.py", "--checkpoint", str(root / "runs"), *TINY, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


def test_crossval_trains_each_fold_and_reports_mean_and_sd_of_the_test_scores(folds):
    printed = crossval_run(folds)
    result = json.loads((folds / "runs" / crossval.RESULT_NAME).read_text())
    assert [fold["fold"] for fold in result["folds"]] == list(range(FOLDS))
    for fold in result["folds"]:
        report = json.loads((folds / "runs" / f"fold{fold['fold']}" / TEST_REPORT_DIR / "report.json").read_text())
        assert report["split"] == "test" and report["model_selection"]["split"] == "valid"
        assert (fold["n"], fold["mae"], fold["ca5"]) == (report["n"], report["mae"], report["ca5"])
    assert sum(fold["n"] for fold in result["folds"]) <= FACES
    for figure in ("mae", "ca3", "ca5"):
        values = [fold[figure] for fold in result["folds"]]
        assert result["mean"][figure] == pytest.approx(statistics.fmean(values))
        assert result["sd"][figure] == pytest.approx(statistics.stdev(values))
    mae, mae_sd = (float(value) for value in SUMMARY.search(printed).groups()[:2])
    assert (mae, mae_sd) == (round(result["mean"]["mae"], 3), round(result["sd"]["mae"], 3))

    # a rerun trains nothing again; a fold that lost its test report is scored again from its best.pth
    shutil.rmtree(folds / "runs" / "fold1" / TEST_REPORT_DIR)
    printed = crossval_run(folds)
    assert "fold 0: done before" in printed and "fold 1: done before" not in printed
    assert "val.py" in printed and "--split test" in printed
    assert json.loads((folds / "runs" / crossval.RESULT_NAME).read_text())["mean"] == result["mean"]


def test_crossval_refuses_what_it_sets_itself_and_data_without_folds(tmp_path):
    with pytest.raises(SystemExit, match="crossval.py sets --resume for each fold itself"):
        crossval.main(["--data_dir", str(tmp_path), "--dataset", "utkface", "--resume", "x.pth"])
    with pytest.raises(SystemExit, match="drop --overwrite, and delete a fold's folder"):
        crossval.main(["--data_dir", str(tmp_path), "--dataset", "utkface", "--overwrite"])
    with pytest.raises(SystemExit, match=r"has no fold0 folder: write the folds with .*--folds K"):
        crossval.main(["--data_dir", str(tmp_path), "--dataset", "utkface"])
