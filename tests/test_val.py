"""val.py's report: metrics by hand, and a full report on a model trained on real faces."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import val
from estimator import AgeEstimator
from geometry import aligned_crop, read_rgb


def test_metrics_on_a_hand_computed_case():
    pred = np.array([10.0, 22.0, 35.0, 70.0])
    ages = np.array([12, 20, 29, 62])
    gender = np.array([0, 1, 1, -1])
    race = np.array([2, 2, 0, 4])
    result = val.metrics(pred, ages, gender, race)
    assert result["n"] == 4
    assert result["mae"] == pytest.approx((2 + 2 + 6 + 8) / 4)
    assert (result["ca3"], result["ca5"], result["ca7"]) == (0.5, 0.5, 0.75)
    assert result["age_groups"] == {"11-20": (2.0, 2), "21-30": (6.0, 1), "61+": (8.0, 1)}
    assert result["genders"] == {"male": (2.0, 1), "female": (4.0, 2)}
    assert result["races"] == {"white": (6.0, 1), "asian": (2.0, 2), "other": (8.0, 1)}


def test_ca_counts_the_boundary():
    assert val.cumulative_accuracy(np.array([3.0, -3.0, 3.01]), 3) == pytest.approx(2 / 3)


@pytest.fixture(scope="module")
def report(trained_ldl, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    args = ["--data_dir", str(trained_ldl["data"]), "--dataset", "utk", "--resume", str(trained_ldl["checkpoint"] / "best.pth")]
    result = val.main(args + ["--output_dir", str(out)])
    return out, result, args


def test_report_is_consistent_with_its_errors(report):
    out, result, _ = report
    saved = json.loads((out / "report.json").read_text())
    assert set(saved) == {"n", "mae", "ca3", "ca5", "ca7", "mae_by_age_group", "mae_by_gender", "mae_by_race",
                          "checkpoint", "dataset", "split", "tta"}
    errors = pd.read_csv(out / "errors.csv")
    assert list(errors.columns) == ["photo", "age", "pred", "error", "pred_sd"]
    assert len(errors) == saved["n"] == 150
    assert saved["mae"] == pytest.approx(errors["error"].abs().mean(), abs=1e-3)
    assert saved["ca5"] == pytest.approx((errors["error"].abs() <= 5).mean(), abs=0.01)
    assert (np.diff(errors["error"].abs().to_numpy()) <= 1e-9).all(), "worst faces first"
    assert (errors["pred"].between(0, 100)).all() and (errors["pred_sd"] > 0).all()
    assert set(saved["mae_by_gender"]) == {"male", "female"} and saved["mae_by_race"]


def test_group_maes_weighted_by_n_give_the_overall_mae(report):
    out, _, _ = report
    saved = json.loads((out / "report.json").read_text())
    errors = pd.read_csv(out / "errors.csv")
    ages = errors["age"].to_numpy()
    total = 0.0
    for label, low, high in val.AGE_GROUPS:
        n = int(((ages >= low) & (ages <= (high if high is not None else 1e9))).sum())
        total += saved["mae_by_age_group"].get(label, 0.0) * n
    assert total / len(errors) == pytest.approx(saved["mae"], abs=1e-3)


def test_plots_are_valid_pngs(report):
    out, _, _ = report
    for name in ("pred_vs_true.png", "mae_by_age_group.png", "cumulative_accuracy.png", "error_vs_sd.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and min(image.size) > 100


def test_tta_is_the_mean_of_each_face_and_its_mirror(trained_ldl, tmp_path):
    """val.py --tta on a trained model against the formula applied to the same model's plain distributions."""
    ckpt = trained_ldl["checkpoint"] / "best.pth"
    val.main(["--data_dir", str(trained_ldl["data"]), "--dataset", "utk", "--resume", str(ckpt),
              "--output_dir", str(tmp_path), "--tta", "TRAIN.AMP", "off"])
    errors = pd.read_csv(tmp_path / "errors.csv").set_index("photo")
    plain = AgeEstimator.from_checkpoint(ckpt, device="cpu", amp="off", tta=False)
    photos = list(errors.index[:20])
    crops = np.stack([aligned_crop(read_rgb(p), 0, (0, 0, 200, 200), plain.expand, plain.img_size) for p in photos])
    face = np.stack([f["distribution"] for f in plain.predict_aligned(crops)])
    mirrored = np.stack([f["distribution"] for f in plain.predict_aligned(crops[:, :, ::-1])])
    expected = ((face + mirrored) / 2) @ np.arange(101.0)
    assert np.abs(errors.loc[photos, "pred"].to_numpy() - expected).max() < 2e-3
    assert np.abs(face @ np.arange(101.0) - expected).max() > 0.1, "the mirror changes these faces"


def test_clear_errors(trained_ldl, tmp_path):
    data = str(trained_ldl["data"])
    ckpt = str(trained_ldl["checkpoint"] / "best.pth")
    with pytest.raises(SystemExit, match="does not exist"):
        val.main(["--data_dir", data, "--dataset", "utk", "--resume", str(tmp_path / "none.pth")])
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(SystemExit, match="not a checkpoint of this project"):
        val.main(["--data_dir", data, "--dataset", "utk", "--resume", str(tmp_path / "other.pth")])
    (tmp_path / "corrupt.pth").write_bytes(open(ckpt, "rb").read()[:5000])
    with pytest.raises(SystemExit, match="truncated or corrupt"):
        val.main(["--data_dir", data, "--dataset", "utk", "--resume", str(tmp_path / "corrupt.pth")])
    with pytest.raises(SystemExit, match="split 'train' does not exist"):
        val.main(["--data_dir", str(tmp_path), "--dataset", "utk", "--resume", ckpt, "--split", "train"])
    (tmp_path / "utk_valid_align.csv").write_text("photo,age\nx.jpg,3\n")
    with pytest.raises(SystemExit, match="lacks the column"):
        val.main(["--data_dir", str(tmp_path), "--dataset", "utk", "--resume", ckpt])
