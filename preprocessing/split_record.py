"""The split record, ``<dataset>_split.json``: which train, valid (and test) CSVs one
preprocessing run wrote together.

It holds the split's seed, ratios and fold, the sha256 of every file of the set
and a ``split_id`` derived from the CSVs' hashes. The preprocessing scripts
rename it into place last, in the same batch as the CSVs (see outputs.py), so
a set mixed by a hard kill between the renames, or by copying one CSV from
another run, no longer matches it. `check` is what training calls before it
reads the CSVs; this module needs neither dlib nor OpenCV.
"""
import hashlib
import json
from pathlib import Path

RECORD_FORMAT = 1
# the CSVs every set has; a test CSV is part of the set where the record lists it
SIDES = ("train", "valid")
OPTIONAL_SIDES = ("test",)


class SplitMismatch(SystemExit):
    """The CSVs in a data folder are not the set its split record describes."""


def csv_name(dataset, side):
    return f"{dataset}_{side}_align.csv"


def record_name(dataset):
    return f"{dataset}_split.json"


def digest(data):
    """sha256 of ``data`` (bytes), as hex."""
    return hashlib.sha256(data).hexdigest()


def split_id(dataset, digests):
    """One hash naming the split: the train and valid (and test) CSVs' hashes together."""
    names = [csv_name(dataset, side) for side in SIDES + OPTIONAL_SIDES]
    return digest("".join(digests[name] for name in names if name in digests).encode("ascii"))


def render(dataset, seed, valid_ratio, digests, details=None):
    """The record as bytes. ``digests`` maps each file name of the set to its
    sha256; ``valid_ratio`` is None where the publisher's split was kept;
    ``details`` (test_ratio, subject_split, folds and fold) are added as they are."""
    record = {
        "format": RECORD_FORMAT,
        "dataset": dataset,
        "seed": seed,
        "valid_ratio": valid_ratio,
        **(details or {}),
        "split_id": split_id(dataset, digests),
        "sha256": dict(digests),
    }
    return (json.dumps(record, indent=2) + "\n").encode("utf-8")


def check(data_dir, dataset):
    """The split record of ``dataset`` in ``data_dir``, after checking that
    its train and valid CSVs are the ones it lists; None when there is no
    record (CSVs made by hand or by an older version). SplitMismatch, naming
    the file and the fix, when a CSV differs from the one recorded."""
    path = Path(data_dir) / record_name(dataset)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        recorded = {name: record["sha256"][name] for name in
                    (csv_name(dataset, side) for side in SIDES)}
        recorded.update({name: record["sha256"][name] for name in
                         (csv_name(dataset, side) for side in OPTIONAL_SIDES) if name in record["sha256"]})
    except (ValueError, KeyError, TypeError):
        raise SplitMismatch(f"{path}: not a split record written by preprocessing; rerun "
                            "preprocessing, or delete it to train on the CSVs as they are"
                            ) from None
    for name, expected in recorded.items():
        csv_path = Path(data_dir) / name
        if csv_path.is_file() and digest(csv_path.read_bytes()) != expected:
            raise SplitMismatch(
                f"{csv_path} is not the file that preprocessing wrote with the split in {path} "
                f"(seed {record.get('seed')}): the CSVs may come from different runs and "
                "share faces. Rerun preprocessing to write a consistent set, or, if you edited "
                f"the CSV on purpose, delete {path.name}"
            )
    for name in (csv_name(dataset, side) for side in OPTIONAL_SIDES):
        if name not in recorded and (Path(data_dir) / name).is_file():
            raise SplitMismatch(
                f"{Path(data_dir) / name} is not part of the split in {path}, which has no test CSV: it was left by "
                "an earlier preprocessing run and may share faces with train. Delete it, or rerun preprocessing "
                "with --test_ratio"
            )
    return record
