"""What every preprocessing script shares: options, input checks, the split,
the parallel alignment and the CSV writing.

A script only turns its data set's own layout into `Sample`s (and `Skip`s for
files it cannot label), then hands them to `split` and `process`, so every
data set gets the same CSV format, the same report and the same guarantees:
nothing is skipped silently and nothing is written half.
"""
import argparse
import csv
import math
import multiprocessing
import os
import random
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import cv2
from tqdm import tqdm

import geometry
from preprocessing.align import DETECTORS, LANDMARK_MODELS, FaceAligner, model_paths

DEFAULT_VALID_RATIO = 0.2
DEFAULT_SEED = 0
DEFAULT_DETECTOR = "hog"
DEFAULT_LANDMARKS = 5

CSV_COLUMNS = ("photo", "age", "deg", "box1", "box2", "box3", "box4")
ATTRIBUTE_COLUMNS = ("gender", "race")
REPORT_COLUMNS = ("photo", "reason")
# Rounding of what the CSVs store: a thousandth of a degree and a tenth of a
# pixel are far below what the landmarks resolve.
DEG_DECIMALS = 3
BOX_DECIMALS = 1

# Labels, as the CSVs store them (UTKFace's codes).
GENDERS = {0: "male", 1: "female"}
RACES = {0: "White", 1: "Black", 2: "Asian", 3: "Indian", 4: "Other"}

# Images handed to a worker at a time: large enough to keep the pool's
# messaging negligible next to ~20 ms of detection per image.
CHUNK_SIZE = 16
PROGRESS_MIN_INTERVAL_S = 1.0
# Workers start as fresh interpreters, not forks: a forked child of a process
# that has used OpenCV's thread pool hangs in cv2.setNumThreads (and the
# caller may be a demo or a test that has).
POOL_START_METHOD = "spawn"

REASON_MISSING = "file not found"
REASON_UNREADABLE = "unreadable image"
REASON_NO_FACE = "no face found"


@dataclass(frozen=True)
class Sample:
    """One labelled image. ``subject`` names the person, for splits that keep
    each person on one side."""

    path: Path
    age: float
    gender: int | None = None
    race: int | None = None
    subject: str | None = None


@dataclass(frozen=True)
class Skip:
    """An input left out of the CSVs, and why: it goes to the report."""

    path: Path
    reason: str


# Command line -------------------------------------------------------------

def build_parser(description, valid_ratio=DEFAULT_VALID_RATIO, valid_ratio_help=None):
    """The options every script takes; scripts add their own to the result."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--img_dir", required=True,
        help="folder of the data set's images, as the publisher ships it",
    )
    parser.add_argument(
        "--output_dir", required=True,
        help="folder for <dataset>_train_align.csv, <dataset>_valid_align.csv and "
             "<dataset>_report.csv (created if needed); pass it to training as "
             "--data_dir: the CSVs name the photos relative to it",
    )
    parser.add_argument(
        "--valid_ratio", type=ratio, default=valid_ratio,
        help=valid_ratio_help or (
            "share of the images, 0..1, drawn at random for the validation CSV; "
            "1 puts every image in valid (default: %(default)s)"
        ),
    )
    parser.add_argument(
        "--seed", type=int, default=DEFAULT_SEED,
        help="seed of the random split: the same seed gives the same split "
             "(default: %(default)s)",
    )
    parser.add_argument(
        "--detector", choices=DETECTORS, default=DEFAULT_DETECTOR,
        help="dlib face detector: hog (fast on a CPU) or cnn (MMOD CNN, more "
             "robust to pose, slow without CUDA) (default: %(default)s)",
    )
    parser.add_argument(
        "--landmarks", type=int, choices=LANDMARK_MODELS, default=DEFAULT_LANDMARKS,
        help="dlib landmark model that places the eyes: 5 or 68 points "
             "(default: %(default)s)",
    )
    parser.add_argument(
        "--workers", type=positive_int, default=os.cpu_count() or 1,
        help="processes sharing the images (default: the number of CPUs, %(default)s)",
    )
    return parser


def ratio(text):
    """argparse type: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1")
    return value


def positive_int(text):
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not 1 or more")
    return value


# Input checks -------------------------------------------------------------

def existing_dir(path, option):
    """``path`` as a Path, or SystemExit naming the option to fix."""
    path = Path(path)
    if not path.is_dir():
        raise SystemExit(f"{option}: folder {path} does not exist; pass the folder that holds the data")
    return path


def existing_file(path, what):
    """``path`` as a Path, or SystemExit saying which file is expected."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"{what} {path} does not exist")
    return path


def parse_age(text, source, line):
    """An age label as a number, or SystemExit naming the file and line."""
    try:
        age = float(text)
    except (TypeError, ValueError):
        age = math.nan
    if not math.isfinite(age) or age < 0:
        raise SystemExit(
            f"{source}, line {line}: age {text!r} is not a number >= 0; fix the label"
        )
    return int(age) if age.is_integer() else age


def parse_code(text, codes, field, source, line):
    """A categorical label looked up in ``codes``, or SystemExit naming the
    file, the line and the values allowed."""
    key = text.strip() if isinstance(text, str) else text
    if key not in codes:
        allowed = ", ".join(str(code) for code in codes)
        raise SystemExit(
            f"{source}, line {line}: {field} {text!r} is not one of {allowed}; fix the label"
        )
    return codes[key]


def read_csv_rows(path, required, what):
    """Rows of a CSV file with a header, as (line number, dict) pairs.

    SystemExit when the file is missing or lacks a required column.
    """
    path = existing_file(path, what)
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle, restval="")
        columns = [name.strip() for name in reader.fieldnames or ()]
        missing = [name for name in required if name not in columns]
        if missing:
            raise SystemExit(
                f"{path}: no column {', '.join(missing)} in the header "
                f"(found: {', '.join(columns) or 'nothing'}); the file needs a header "
                f"row naming at least {', '.join(required)}"
            )
        rows = []
        for row in reader:
            rows.append((reader.line_num, {
                key.strip(): (value.strip() if isinstance(value, str) else value)
                for key, value in row.items() if key is not None
            }))
    return rows, columns


# Split --------------------------------------------------------------------

def split(samples, valid_ratio, seed, by_subject=False):
    """(train, valid): ``round(valid_ratio * len(samples))`` samples drawn at
    random for valid, or whole subjects until that many when ``by_subject``.

    The split is drawn before face detection so that an image's side depends
    only on the seed and the labelled list, not on which faces the detector
    finds. Each side keeps the input order.
    """
    rng = random.Random(seed)
    target = round(valid_ratio * len(samples))
    if by_subject:
        chosen = _draw_subjects(samples, target, rng)
        in_valid = [sample.subject in chosen for sample in samples]
    else:
        order = list(range(len(samples)))
        rng.shuffle(order)
        picked = set(order[:target])
        in_valid = [index in picked for index in range(len(samples))]
    train = [sample for sample, valid in zip(samples, in_valid) if not valid]
    valid = [sample for sample, valid in zip(samples, in_valid) if valid]
    return train, valid


def _draw_subjects(samples, target, rng):
    """Subjects drawn at random until they hold ``target`` samples or more."""
    sizes = Counter(sample.subject for sample in samples)
    subjects = sorted(sizes)
    rng.shuffle(subjects)
    chosen, count = set(), 0
    for subject in subjects:
        if count >= target:
            break
        chosen.add(subject)
        count += sizes[subject]
    return chosen


# Alignment ----------------------------------------------------------------

_worker_aligner = None


def check_models(detector, landmarks):
    """SystemExit, before any work, when dlib's model files are missing."""
    try:
        model_paths(detector, landmarks)
    except (ModuleNotFoundError, FileNotFoundError) as error:
        raise SystemExit(str(error)) from None


def _init_worker(detector, landmarks):
    """Pool initializer: one aligner per process, built once."""
    global _worker_aligner
    cv2.setNumThreads(1)  # the pool already uses every CPU
    _worker_aligner = FaceAligner(detector=detector, landmarks=landmarks)


def _align_in_worker(path):
    return _align_path(_worker_aligner, path)


def _align_path(aligner, path):
    """(deg, box) of the largest face, or (None, reason)."""
    try:
        rgb = geometry.read_rgb(path)
    except OSError:
        rgb = None
    if rgb is None:
        return None, REASON_UNREADABLE
    face = aligner.align_largest(rgb)
    if face is None:
        return None, REASON_NO_FACE
    return (face.deg, face.box), None


def align_paths(paths, detector, landmarks, workers):
    """(deg, box) or (None, reason) for every path, in order, with a progress bar."""
    # Checked here: a pool whose initializer fails restarts workers forever.
    check_models(detector, landmarks)
    workers = max(1, min(workers, len(paths)))
    progress = dict(total=len(paths), unit="img", mininterval=PROGRESS_MIN_INTERVAL_S)
    if workers == 1:
        aligner = FaceAligner(detector=detector, landmarks=landmarks)
        return [_align_path(aligner, path) for path in tqdm(paths, **progress)]
    context = multiprocessing.get_context(POOL_START_METHOD)
    with context.Pool(workers, initializer=_init_worker, initargs=(detector, landmarks)) as pool:
        return list(tqdm(pool.imap(_align_in_worker, paths, chunksize=CHUNK_SIZE), **progress))


# Output -------------------------------------------------------------------

def photo_name(path, out_dir):
    """The photo as the CSVs name it: relative to the output folder, or
    absolute where no relative path exists (another drive on Windows)."""
    absolute = os.path.abspath(path)
    try:
        return os.path.relpath(absolute, os.path.abspath(out_dir))
    except ValueError:
        return absolute


def write_csv_atomic(path, header, rows):
    """Write a CSV whole or not at all: a temporary file in the same folder,
    flushed and synced to disk, then renamed over ``path``."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", newline="", encoding="utf-8") as stream:
            os.chmod(temporary, _file_mode())
            writer = csv.writer(stream)
            writer.writerow(header)
            writer.writerows(rows)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def _file_mode():
    """The mode a plainly created file gets (mkstemp's own is owner-only)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _csv_row(sample, deg, box, out_dir, attributes):
    row = [photo_name(sample.path, out_dir), sample.age, round(deg, DEG_DECIMALS)]
    row += [round(value, BOX_DECIMALS) for value in box]
    if attributes:
        row += [sample.gender, sample.race]
    return row


def process(dataset, train, valid, skipped, args, attributes):
    """Align every sample, then write the train and valid CSVs and the report.

    ``skipped`` lists inputs the script already left out (unusable labels,
    missing files); images without a readable face join them in
    ``<dataset>_report.csv``. ``attributes`` adds the gender and race columns.
    """
    samples = list(train) + list(valid)
    if not samples:
        reasons = Counter(skip.reason for skip in skipped)
        detail = "; ".join(f"{reason}: {count}" for reason, count in reasons.items())
        raise SystemExit(f"{dataset}: no image to align ({detail or 'the input lists none'}); "
                         "check --img_dir and the labels")
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = align_paths([sample.path for sample in samples], args.detector,
                          args.landmarks, args.workers)
    seconds = time.perf_counter() - start

    sides = {"train": [], "valid": []}
    failures = []
    for index, (sample, (found, reason)) in enumerate(zip(samples, results)):
        if found is None:
            failures.append(Skip(sample.path, reason))
        else:
            side = "train" if index < len(train) else "valid"
            sides[side].append(_csv_row(sample, *found, out_dir, attributes))
    _write_outputs(dataset, out_dir, attributes, sides, list(skipped) + failures)
    _print_summary(dataset, samples, failures, skipped, seconds, args.workers, out_dir, sides)


def _write_outputs(dataset, out_dir, attributes, sides, left_out):
    header = list(CSV_COLUMNS) + (list(ATTRIBUTE_COLUMNS) if attributes else [])
    for side, rows in sides.items():
        write_csv_atomic(out_dir / f"{dataset}_{side}_align.csv", header, rows)
    write_csv_atomic(out_dir / f"{dataset}_report.csv", REPORT_COLUMNS,
                     [(photo_name(skip.path, out_dir), skip.reason) for skip in left_out])


def _print_summary(dataset, samples, failures, skipped, seconds, workers, out_dir, sides):
    tried = len(samples)
    unreadable = sum(failure.reason == REASON_UNREADABLE for failure in failures)
    readable = tried - unreadable
    found = tried - len(failures)
    rate = 100.0 * found / readable if readable else 0.0
    print(f"{dataset}: face found in {found} of {readable} readable images ({rate:.2f}%); "
          f"{len(failures) - unreadable} without a face, {unreadable} unreadable, "
          f"{len(skipped)} left out before detection")
    print(f"aligned {tried} images in {seconds:.1f} s with {min(workers, tried)} "
          f"worker(s): {1000.0 * seconds / tried:.1f} ms per image, "
          f"{tried / seconds:.1f} images/s")
    for side, rows in sides.items():
        print(f"wrote {out_dir / f'{dataset}_{side}_align.csv'} ({len(rows)} rows)")
    print(f"wrote {out_dir / f'{dataset}_report.csv'} "
          f"({len(failures) + len(skipped)} images left out, with the reason)")
