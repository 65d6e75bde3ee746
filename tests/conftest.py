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
    """Well-formed UTKFace names, sorted, as (path, age, gender, race)."""
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
    for file, age, gender, race in rows:
        line = f"{file},{age},0,0,0,{UTKFACE_SIDE},{UTKFACE_SIDE}"
        lines.append(line + (f",{gender},{race}" if attributes else ""))
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


@pytest.fixture(scope="session")
def trained_ldl(tmp_path_factory):
    """train-ldl.py on 1,200 real faces, once per test session; later tests evaluate its checkpoint."""
    import train

    data = tmp_path_factory.mktemp("utk_learn")
    train_rows, valid_rows = make_split(data, 1200, 150, seed=1)
    checkpoint = data / "checkpoint"
    result = train.fit("ldl", ["--data_dir", str(data), "--dataset", "utk", "--checkpoint", str(checkpoint)] + LEARNING_RUN)
    return {"data": data, "checkpoint": checkpoint, "result": result, "train": train_rows, "valid": valid_rows}
