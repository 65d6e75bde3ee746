"""Aligned-face CSVs → checked records: the labels and geometry of every face, before any pixel is read.

The CSV (`photo, age, deg, box1..box4[, gender, race]`, in any order) is
checked whole before any training starts, so that a bad row stops the run in
seconds with its file and row named, not hours later. The ``race`` column holds
the ethnicity code (Records.ethnicity): it keeps the original's name.
"""
import os
from pathlib import Path

import numpy as np
import pandas as pd

from defaults import MAX_AGE, NUM_ETHNICITIES
from geometry import image_size, rotation_matrix, transform_points

REQUIRED_COLUMNS = ("photo", "age", "deg", "box1", "box2", "box3", "box4")
# the CSVs of a data set that a model can be scored on (val.py's --split); training reads train and valid
SPLITS = ("valid", "test", "train")
BOX_COLUMNS = ["box1", "box2", "box3", "box4"]
# letters of the original scripts' CSVs; Hispanic has no class of its own and counts as Other
GENDER_CODES = {"m": 0, "male": 0, "f": 1, "female": 1}
ETHNICITY_CODES = {"w": 0, "b": 1, "a": 2, "i": 3, "h": 4, "o": 4}
GENDER_NAMES = ("male", "female")
ETHNICITY_NAMES = ("white", "black", "asian", "indian", "other")
UNKNOWN = -1
# the optional fallback column (1: no face was detected; the whole image or given crop is the box)
FALLBACK_VALUES = {"": False, "0": False, "0.0": False, "false": False, "1": True, "1.0": True, "true": True}
# deg is folded into (-HALF_TURN, HALF_TURN]
HALF_TURN = 180.0


class DataError(SystemExit):
    """Bad input; a SystemExit so that the scripts print it without a traceback."""


def csv_path(data_dir, dataset, split):
    return Path(data_dir) / f"{dataset}_{split}_align.csv"


def age_bin_frequency(ages, bin_width):
    """For each face, how many faces share its age bin of ``bin_width`` years: what age balancing evens out."""
    bins = np.asarray(ages) // bin_width
    return np.bincount(bins)[bins].astype(np.float64)


def ethnicity_age_mix_ratio(ages, ethnicity, bin_width):
    """For each face, the faces its (age bin, ethnicity) cell would hold if age and ethnicity were independent, over
    the faces it holds: what evens out a data set whose ethnicities differ in age mix (UTKFace's Asian faces are
    mostly young, so a model learns "Asian, so young"). Faces of unknown ethnicity get 1."""
    bins = np.asarray(ages) // bin_width
    ethnicity = np.asarray(ethnicity)
    ratio = np.ones(len(bins))
    known = ethnicity != UNKNOWN
    bins, groups = bins[known], ethnicity[known]
    cells = bins * NUM_ETHNICITIES + groups
    expected = np.bincount(bins)[bins] * np.bincount(groups)[groups] / len(bins)
    ratio[known] = expected / np.bincount(cells)[cells]
    return ratio


def row_error(path, index, message):
    # +2: a header line, and rows counted from 1 as an editor shows them
    return DataError(f"{path}, line {index + 2}: {message}")


def _parse_code(path, column, values, codes, num_classes):
    """Integer codes or the original's letters → 0..num_classes-1, UNKNOWN for blanks."""
    parsed = np.full(len(values), UNKNOWN, dtype=np.int64)
    for index, value in enumerate(values):
        if pd.isna(value) or str(value).strip() == "":
            continue
        text = str(value).strip().lower()
        if text in codes:
            parsed[index] = codes[text]
            continue
        try:
            number = float(text)
        except ValueError:
            number = None
        if number is None or not number.is_integer() or not 0 <= number < num_classes:
            raise row_error(
                path, index,
                f"{column} {value!r} is not one of 0..{num_classes - 1} or {'/'.join(sorted(codes)).upper()}",
            )
        parsed[index] = int(number)
    return parsed


def _parse_numbers(path, frame, column):
    values = pd.to_numeric(frame[column], errors="coerce")
    bad = np.flatnonzero(values.isna().to_numpy())
    if len(bad):
        index = bad[0]
        raise row_error(
            path, index,
            f"{column} {frame[column].iloc[index]!r} is not a number ({len(bad)} such rows); fix or remove the row",
        )
    return values.to_numpy(dtype=np.float64)


def _resolve_photos(path, data_dir, photos):
    resolved = []
    for index, photo in enumerate(photos):
        photo = str(photo)
        full = Path(photo) if os.path.isabs(photo) else Path(data_dir) / photo
        if full.is_dir():
            raise row_error(path, index, f"photo {full} is a folder, not an image; name an image file")
        if not full.is_file():
            raise row_error(path, index, f"image {full} does not exist; photo paths are relative to --data_dir {data_dir}")
        resolved.append(str(full))
    return resolved


def _fold_angles(path, deg):
    """Angles in (-180, 180]; a non-finite one is a broken row (it would train on a blank crop)."""
    bad = np.flatnonzero(~np.isfinite(deg))
    if len(bad):
        raise row_error(path, bad[0], f"deg {deg[bad[0]]} is not a finite angle ({len(bad)} such rows); "
                                       f"deg is the rotation in degrees that levels the eyes")
    inside = (deg > -HALF_TURN) & (deg <= HALF_TURN)
    return np.where(inside, deg, HALF_TURN - np.mod(HALF_TURN - deg, 2 * HALF_TURN))


# dlib's detector, run upsampled on a tight crop, frames a face past the photo's edges: up to 1.02 times the diagonal
# on UTKFace's 200 px crops (one face of 21,275). A box twice the diagonal frames no face of the photo: it was
# measured in another image's pixels
LARGEST_BOX_PER_DIAGONAL = 2.0


def _check_boxes(path, photos, deg, boxes):
    """Each photo's (width, height), upright as decoded, once its box is checked; only headers are read, so it is quick.

    A box lies in the photo turned by its deg about the centre and may extend
    past that frame's edge: a tilted face near a corner does. It is nonsense
    when its corners are out of order, when it is over LARGEST_BOX_PER_DIAGONAL
    times the photo's diagonal (no face in the photo is), or when it lies off the photo: its
    centre, turned back into the photo, further out than half the box.
    """
    sizes = np.zeros((len(photos), 2), dtype=np.int64)
    for index, (photo, angle, box) in enumerate(zip(photos, deg, boxes)):
        try:
            sizes[index] = image_size(photo)
        except OSError as error:
            raise row_error(path, index, f"image {photo} cannot be read ({error}); replace it or remove the row") from None
        problem = _box_problem(box, angle, *sizes[index])
        if problem:
            x1, y1, x2, y2 = box
            raise row_error(path, index, f"box ({x1:g}, {y1:g}, {x2:g}, {y2:g}) at deg {angle:g} {problem} the "
                                         f"{sizes[index][0]}x{sizes[index][1]} image {photo}; boxes are x1, y1, x2, y2 "
                                         f"with x1 < x2 and y1 < y2, in the image turned by deg about its centre "
                                         f"(docs/face-geometry.md)")
    return sizes


def _box_problem(box, deg, width, height):
    """What makes ``box`` frame no face of a ``width`` x ``height`` photo turned by ``deg``, or None."""
    x1, y1, x2, y2 = box
    if not (x1 < x2 and y1 < y2):
        return "has its corners out of order for"
    if max(x2 - x1, y2 - y1) > LARGEST_BOX_PER_DIAGONAL * np.hypot(width, height):
        return f"is over {LARGEST_BOX_PER_DIAGONAL:g} times the diagonal of"
    # the box's centre turned back into the photo (rotation_matrix works on pixel centres, boxes on pixel edges)
    centre = transform_points(rotation_matrix(width, height, -deg), [((x1 + x2) / 2 - 0.5, (y1 + y2) / 2 - 0.5)])[0]
    off_x, off_y = np.abs(centre + 0.5 - (width / 2, height / 2))
    if off_x >= (width + x2 - x1) / 2 or off_y >= (height + y2 - y1) / 2:
        return "lies off"
    return None


class Records:
    """A checked CSV: absolute photo paths and their sizes, ages clamped to 0..100, geometry and optional labels."""

    def __init__(self, path, data_dir, need_attributes=False):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(
                f"{self.path} not found. --data_dir must hold <dataset>_train_align.csv and "
                f"<dataset>_valid_align.csv; make them with preprocessing/<name>.py"
            )
        try:
            # round_trip: deg and box read back as the very floats preprocessing wrote, so that a face is cropped
            # here exactly as demo.py crops it (a box 1e-14 px wider can take geometry.aligned_crop's ceil a pixel up)
            frame = pd.read_csv(self.path, skipinitialspace=True, float_precision="round_trip")
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
            raise DataError(f"{self.path} is not a readable CSV: {error}") from None
        frame.columns = [str(c).strip().lower() for c in frame.columns]
        missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
        if missing:
            raise DataError(
                f"{self.path} lacks the column(s) {', '.join(missing)}; it needs "
                f"{', '.join(REQUIRED_COLUMNS)} (gender, race optional), in any order"
            )
        if need_attributes:
            absent = [c for c in ("gender", "race") if c not in frame.columns]
            if absent:
                raise DataError(f"{self.path} lacks {', '.join(absent)}, which the multitask objective needs")
        raw_age = _parse_numbers(self.path, frame, "age")
        self.ages_out_of_range = int(((raw_age < 0) | (raw_age > MAX_AGE)).sum())
        self.age = np.clip(np.rint(raw_age), 0, MAX_AGE).astype(np.int64)
        self.deg = _fold_angles(self.path, _parse_numbers(self.path, frame, "deg"))
        self.boxes = np.stack([_parse_numbers(self.path, frame, c) for c in BOX_COLUMNS], axis=1)
        self.photo = [str(p) for p in frame["photo"]]
        self.files = _resolve_photos(self.path, data_dir, self.photo)
        self.sizes = _check_boxes(self.path, self.files, self.deg, self.boxes)
        self.gender = self._codes(frame, "gender", GENDER_CODES, len(GENDER_NAMES))
        self.ethnicity = self._codes(frame, "race", ETHNICITY_CODES, NUM_ETHNICITIES)
        if need_attributes:
            for name, codes in (("gender", self.gender), ("race", self.ethnicity)):
                blank = np.flatnonzero(codes == UNKNOWN)
                if len(blank):
                    raise row_error(self.path, blank[0], f"{name} is blank ({len(blank)} rows); the multitask objective needs it on every row")
        self.fallback = self._fallback_flags(frame)

    def _codes(self, frame, column, codes, num_classes):
        if column not in frame.columns:
            return np.full(len(frame), UNKNOWN, dtype=np.int64)
        return _parse_code(self.path, column, frame[column].tolist(), codes, num_classes)

    def _fallback_flags(self, frame):
        """The optional ``fallback`` column: True where no face was found and the whole image (or given crop) is the box.

        Blank or absent means a detected face, so CSVs from before the column existed read as all detected.
        """
        if "fallback" not in frame.columns:
            return np.zeros(len(frame), dtype=bool)
        flags = np.zeros(len(frame), dtype=bool)
        for index, value in enumerate(frame["fallback"].tolist()):
            text = "" if pd.isna(value) else str(value).strip().lower()
            if text not in FALLBACK_VALUES:
                raise row_error(self.path, index, f"fallback {value!r} is not 0 or 1 (1: no face was detected, "
                                                   f"the whole image is the box; 0 or blank: a detected face)")
            flags[index] = FALLBACK_VALUES[text]
        return flags

    def __len__(self):
        return len(self.files)
