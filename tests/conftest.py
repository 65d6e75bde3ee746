"""Shared fixtures: real UTKFace faces, read in place from ../shared/data/UTKFace."""
import os
import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
UTKFACE = (ROOT / ".." / "shared" / "data" / "UTKFace").resolve()
UTKFACE_SIDE = 200


def utkface_files():
    """Well-formed UTKFace names, sorted, as (path, age, gender, ethnicity)."""
    if not UTKFACE.is_dir():
        raise RuntimeError(f"the tests read real faces from {UTKFACE}; it is missing")
    rows = []
    for name in sorted(os.listdir(UTKFACE)):
        parts = name.split("_")
        if len(parts) == 4 and name.endswith(".jpg.chip.jpg") and all(p.isdigit() for p in parts[:3]):
            rows.append((UTKFACE / name, int(parts[0]), int(parts[1]), int(parts[2])))
    return rows


def write_csv(path, rows, attributes=True):
    """An aligned CSV over whole UTKFace crops: deg 0 and the full image as the box."""
    header = "photo,age,deg,box1,box2,box3,box4" + (",gender,race" if attributes else "")
    lines = [header]
    for file, age, gender, ethnicity in rows:
        line = f"{file},{age},0,0,0,{UTKFACE_SIDE},{UTKFACE_SIDE}"
        lines.append(line + (f",{gender},{ethnicity}" if attributes else ""))
    Path(path).write_text("\n".join(lines) + "\n")


def make_split(directory, n_train, n_valid, seed=0, dataset="utk"):
    rows = utkface_files()
    random.Random(seed).shuffle(rows)
    write_csv(Path(directory) / f"{dataset}_train_align.csv", rows[:n_train])
    write_csv(Path(directory) / f"{dataset}_valid_align.csv", rows[n_train:n_train + n_valid])
    return rows[:n_train], rows[n_train:n_train + n_valid]


@pytest.fixture
def utk_small(tmp_path):
    """A few hundred real faces in a train/valid split, for quick end-to-end runs."""
    data = tmp_path / "data"
    data.mkdir()
    train, valid = make_split(data, 240, 80)
    return data, train, valid


LEARNING_RUN = ["MODEL.ARCH", "tinyage", "MODEL.IMG_SIZE", "48", "TRAIN.EPOCHS", "10", "TRAIN.BATCH_SIZE", "32",
                "TRAIN.LR", "0.003", "TRAIN.SCHEDULER", "cosine", "TRAIN.WORKERS", "0"]


def train_once(tmp_path_factory, objective, sizes, seed, run):
    """Train on a fresh split of real faces; ``sizes`` is (training faces, validation faces)."""
    import train

    data = tmp_path_factory.mktemp(f"utk_{objective}")
    train_rows, valid_rows = make_split(data, *sizes, seed=seed)
    checkpoint = data / "checkpoint"
    result = train.fit(objective, ["--data_dir", str(data), "--dataset", "utk", "--checkpoint", str(checkpoint)] + run)
    return {"data": data, "checkpoint": checkpoint, "result": result, "train": train_rows, "valid": valid_rows}


@pytest.fixture(scope="session")
def trained_ldl(tmp_path_factory):
    """train-ldl.py on 1,200 real faces, once per test session; later tests evaluate its checkpoint."""
    return train_once(tmp_path_factory, "ldl", (1200, 150), 1, LEARNING_RUN)


# Multitask run for the report tests: 32 px and a heavier gender loss, so that the gender head learns within a
# few epochs (in fp32 and bf16 it reached 0.69 validation accuracy on 600 faces, against 0.57 for the majority class).
MULTITASK_RUN = ["MODEL.ARCH", "tinyage", "MODEL.IMG_SIZE", "32", "TRAIN.EPOCHS", "6", "TRAIN.BATCH_SIZE", "32",
                 "TRAIN.LR", "0.005", "TRAIN.SCHEDULER", "cosine", "TRAIN.WORKERS", "0", "MT.GENDER_WEIGHT", "10.0"]


@pytest.fixture(scope="session")
def trained_mt(tmp_path_factory):
    """train-mt.py on 1,000 real faces, validated on 600, once per test session."""
    return train_once(tmp_path_factory, "mt", (1000, 600), 2, MULTITASK_RUN)
