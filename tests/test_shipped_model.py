"""The shipped model: small, safe to load, and as accurate as its model card says."""
import json

import pandas as pd
import pytest
import torch

import estimator
import demo
import val
from conftest import ROOT, UTKFACE
from defaults import MAX_AGE

CARD = ROOT / "weights" / "report" / "report.json"
SPLIT = ROOT / "weights" / "utkface_valid_align.csv"
# dlib's ResNet (5.6 M parameters) in fp16, with its three heads
MAX_MB = 12
MAE_TOLERANCE = 0.05
ADULT = 18


def test_weights_are_small_fp16_and_load_safely():
    path = estimator.DEFAULT_WEIGHTS
    assert path.stat().st_size / 1e6 <= MAX_MB
    state = torch.load(path, weights_only=True)
    floats = [v for v in state["state_dict"].values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float16 for v in floats)
    assert "optimizer" not in state and state["objective"] == "mt" and state["arch"] == "dlib_resnet"


def test_reproduces_the_model_cards_validation_mae(tmp_path):
    """The card's split (photo names relative to UTKFace), scored again with val.py."""
    card = json.loads(CARD.read_text())
    split = pd.read_csv(SPLIT)
    split["photo"] = [str(UTKFACE / name) for name in split["photo"]]
    split.to_csv(tmp_path / "utkface_valid_align.csv", index=False)
    report = val.main(["--data_dir", str(tmp_path), "--dataset", "utkface", "--resume", str(estimator.DEFAULT_WEIGHTS),
                       "--output_dir", str(tmp_path / "report")] + (["--tta"] if card["tta"] else []))
    assert report["n"] == card["n"]
    assert report["mae"] == pytest.approx(card["mae"], abs=MAE_TOLERANCE)


def test_demo_on_the_sample_photos(tmp_path):
    """README's first command: one face found in each portrait of samples/, each estimated as an adult.

    Two studio portraits are no accuracy test (the MAE tests on real UTKFace faces are); they only catch a model
    that reads a grown woman as a child.
    """
    photos = sorted(path.name for path in (ROOT / "samples").glob("*.jpg"))
    summary = demo.main(["--img_dir", str(ROOT / "samples"), "--output_dir", str(tmp_path)])
    rows = pd.read_csv(tmp_path / "predictions.csv")
    assert rows["source"].tolist() == photos and (rows["face"] == 0).all()
    assert rows["age"].between(ADULT, MAX_AGE).all()
    assert all((tmp_path / photo).is_file() for photo in photos)
    assert summary["faces"] == len(photos)
