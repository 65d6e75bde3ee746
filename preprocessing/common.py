"""What every preprocessing script shares: options, input checks, the split
(splits.py draws it), the alignment (align_pool.py runs it) and the writing of the CSVs as one set.

A script only turns its data set's own layout into `Sample`s (and `Skip`s for
files it cannot label), then hands them to `layouts` and `process`, so every
data set gets the same CSV format, the same report and the same guarantees:
nothing is skipped silently and nothing is written half.
"""
import argparse
import contextlib
import csv
import math
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path


import files
from preprocessing import outputs, split_record, splits
from preprocessing.align import DETECTORS, LANDMARK_MODELS
from preprocessing.align_pool import REASON_NO_FACE, REASON_UNREADABLE, align_into

DEFAULT_VALID_RATIO = 0.2
DEFAULT_SEED = 0
DEFAULT_DETECTOR = "hog"
DEFAULT_LANDMARKS = 5

CSV_COLUMNS = ("photo", "age", "deg", "box1", "box2", "box3", "box4")
ATTRIBUTE_COLUMNS = ("gender", "race")
REPORT_COLUMNS = ("photo", "reason")
# --keep_undetected's column: 1 where no face was found and the row's box is
# the whole image at deg 0, 0 where the box is a detected face.
FALLBACK_COLUMN = "fallback"
FALLBACK_DEG = 0.0

# Labels, as the CSVs store them (UTKFace's codes; the ethnicity's column is named race, as the original named it).
GENDERS = {0: "male", 1: "female"}
ETHNICITIES = {0: "White", 1: "Black", 2: "Asian", 3: "Indian", 4: "Other"}
# The letters MORPH and labelled folders may use for them. UTKFace's scheme has
# no Hispanic class and counts Hispanic and Latino as Other: H → 4.
GENDER_LETTERS = {"M": 0, "F": 1}
ETHNICITY_LETTERS = {"W": 0, "B": 1, "A": 2, "I": 3, "O": 4, "H": 4}


REASON_MISSING = "file not found"
REASON_FALLBACK = "no face found; kept with the whole image as its box (fallback 1)"


@dataclass(frozen=True)
class Sample:
    """One labelled image. ``subject`` names the person, for splits that keep
    each person on one side."""

    path: Path
    age: float
    gender: int | None = None
    ethnicity: int | None = None
    subject: str | None = None


@dataclass(frozen=True)
class Labelled:
    """A Sample and where its labels were read: ``line`` of the file ``source``."""

    sample: Sample
    source: Path
    line: int


@dataclass(frozen=True)
class Skip:
    """An input left out of the CSVs, and why: it goes to the report."""

    path: Path
    reason: str


# Command line -------------------------------------------------------------

def build_parser(description, valid_ratio=DEFAULT_VALID_RATIO, valid_ratio_help=None, subjects=False):
    """The options every script takes; scripts add their own to the result. ``subjects``: the script knows each
    image's person, so it offers --subject_split."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--img_dir", required=True,
        help="folder of the data set's images, as the publisher ships it",
    )
    parser.add_argument(
        "--output_dir", required=True,
        help="folder for <dataset>_train_align.csv, <dataset>_valid_align.csv (and "
             "<dataset>_test_align.csv with --test_ratio), <dataset>_report.csv and <dataset>_split.json, "
             "or for the folders fold0 … with --folds (created if needed); pass it (or a fold's folder) to "
             "training as --data_dir: the CSVs name the photos relative to it",
    )
    parser.add_argument(
        "--valid_ratio", type=ratio, default=valid_ratio,
        help=valid_ratio_help or (
            "share of the images, 0..1, drawn at random for the validation CSV; "
            "1 puts every image in valid (default: %(default)s)"
        ),
    )
    parser.add_argument(
        "--test_ratio", type=ratio, default=0.0,
        help="share of the images, 0..1, drawn at random (after valid) for <dataset>_test_align.csv, which "
             "training scores once with the model chosen on valid (default: %(default)s, no test CSV)",
    )
    parser.add_argument(
        "--folds", type=fold_count, metavar="K",
        help="write K folds, OUT/fold0 … OUT/fold{K-1}, each a full train/valid/test set: the test parts are "
             "disjoint and together hold every kept face, --valid_ratio of the images is drawn from the other "
             "folds for valid; run crossval.py on OUT. Each image is detected once",
    )
    if subjects:
        parser.add_argument(
            "--subject_split", action="store_true",
            help="split by person so that nobody appears in two of the CSVs (nor in two folds' test parts); "
                 "the ratios are then met as closely as whole persons allow",
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
    parser.add_argument(
        "--keep_undetected", action="store_true",
        help="keep an image in which no face is found, with the whole image as its box "
             "at deg 0 and 1 in an added 'fallback' column, instead of leaving it out "
             "(e.g. to score a test set whole); the report lists such images too",
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


def fold_count(text):
    """argparse type: a number of folds, 2 or more."""
    value = positive_int(text)
    if value < splits.MIN_FOLDS:
        raise argparse.ArgumentTypeError(f"{text} folds: pass at least {splits.MIN_FOLDS}")
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


# One photo, one line ---------------------------------------------------------

def keep_first_of_each_photo(labelled):
    """(the Labelled kept, the Skips of the others): a photo named again (also
    through another path to it: "a.jpg" and "./a.jpg", or a link) is kept
    once, with its first line's labels, and each later line is reported, with
    a warning; so one photo never lands in both train and valid."""
    kept, skipped, first_entries = [], [], {}
    for entry in labelled:
        identity = file_identity(entry.sample.path)
        if identity in first_entries:
            skipped.append(_duplicate(entry, first_entries[identity]))
            continue
        first_entries[identity] = entry
        kept.append(entry)
    return kept, skipped


def file_identity(path):
    """What two names of one file share, whatever the path: "a.jpg",
    "./a.jpg", "sub/../a.jpg", a link to it (as os.path.samefile compares)."""
    status = os.stat(path)
    return status.st_dev, status.st_ino


def _duplicate(entry, first):
    """The Skip of ``entry``, which names the file of ``first`` again, after a
    warning that says whether the labels agree."""
    where = f"line {first.line}" if first.source == entry.source else f"{first.source.name}, line {first.line}"
    if _labels_text(entry.sample) == _labels_text(first.sample):
        detail = "with the same labels"
    else:
        detail = (f"with other labels ({_labels_text(entry.sample)} against "
                  f"{_labels_text(first.sample)} on {where}); fix the wrong one")
    print(f"warning: {entry.source}, line {entry.line}: {entry.sample.path} is the file of "
          f"{where} ({first.sample.path}) labelled again, {detail}. The labels of {where} "
          f"are kept and line {entry.line} is left out (listed in the report)", file=sys.stderr)
    return Skip(entry.sample.path, f"labelled again on line {entry.line} of {entry.source.name}; "
                                   f"{where}'s labels kept")


def _labels_text(sample):
    text = f"age {sample.age}"
    if sample.gender is not None:
        text += f", gender {sample.gender}, race {sample.ethnicity}"
    return text


# Split --------------------------------------------------------------------

def layouts(samples, args, fixed_test=()):
    """The output sets the options ask for (see splits.py): K folds for --folds, else one train/valid[/test]
    split; ``fixed_test`` holds the indices of a publisher's test part. SystemExit for --subject_split where a
    sample has no subject."""
    by_subject = getattr(args, "subject_split", False)
    if by_subject:
        _require_subjects(samples)
    if args.folds:
        if args.test_ratio or fixed_test:
            raise SystemExit(f"--folds {args.folds} makes each fold's test part (1/{args.folds} of the images); "
                             "drop --test_ratio (and --official_test)")
        return splits.folds(samples, args.folds, args.valid_ratio, args.seed, by_subject)
    return splits.single(samples, args.valid_ratio, args.test_ratio, args.seed, by_subject, fixed_test)


def _require_subjects(samples):
    missing = [sample.path for sample in samples if not sample.subject]
    if missing:
        raise SystemExit(f"--subject_split: {len(missing)} images have no subject (person) id, e.g. {missing[0]}; "
                         "give every image one, or drop --subject_split")


# Output -------------------------------------------------------------------

@dataclass
class Tables:
    """What the CSVs and the report will hold: the CSV header, each side's
    rows, and every input that is left out or kept by --keep_undetected, with
    the reason."""

    header: list
    sides: dict
    reported: list
    n_fallback: int = 0


def photo_name(path, out_dir):
    """The photo as the CSVs name it: relative to the output folder, or
    absolute where no relative path exists (another drive on Windows)."""
    absolute = os.path.abspath(path)
    try:
        return os.path.relpath(absolute, os.path.abspath(out_dir))
    except ValueError:
        return absolute


def whole_image_box(size):
    """--keep_undetected's box for an image of ``size`` (width, height)."""
    width, height = size
    return (0.0, 0.0, float(width), float(height))


def _csv_row(sample, deg, box, out_dir, attributes):
    # deg and box unrounded: a tenth of a pixel moves a 96 px crop enough to move its age by 0.08 years, and
    # val.py must crop a face exactly as demo.py does (estimator.py) to give it the same age
    row = [photo_name(sample.path, out_dir), sample.age, deg, *box]
    if attributes:
        row += [sample.gender, sample.ethnicity]
    return row


def csv_header(attributes, keep_undetected):
    return (list(CSV_COLUMNS) + (list(ATTRIBUTE_COLUMNS) if attributes else [])
            + ([FALLBACK_COLUMN] if keep_undetected else []))


def tabulate(samples, layout, outcomes, skipped, out_dir, attributes, keep_undetected):
    """The Tables of the aligned ``samples`` for one splits.Layout, the photos named relative to ``out_dir``."""
    side_of = {index: side for side, indices in layout.sides.items() for index in indices}
    tables = Tables(csv_header(attributes, keep_undetected), {side: [] for side in layout.sides}, list(skipped))
    for index, (sample, outcome) in enumerate(zip(samples, outcomes)):
        fallback = keep_undetected and outcome.reason == REASON_NO_FACE
        if outcome.box is None and not fallback:
            tables.reported.append(Skip(sample.path, outcome.reason))
            continue
        if fallback:
            tables.reported.append(Skip(sample.path, REASON_FALLBACK))
            tables.n_fallback += 1
            deg, box = FALLBACK_DEG, whole_image_box(outcome.size)
        else:
            deg, box = outcome.deg, outcome.box
        row = _csv_row(sample, deg, box, out_dir, attributes)
        if keep_undetected:
            row.append(int(fallback))
        tables.sides[side_of[index]].append(row)
    return tables


def process(dataset, samples, layouts, skipped, args, attributes):
    """Align every sample once, then write, for each of the ``layouts`` (splits.Layout), its CSVs, the report and
    the split record as one set (see outputs.py).

    ``skipped`` lists inputs the script already left out (unusable labels,
    missing files); images without a readable face join them in
    ``<dataset>_report.csv``. ``attributes`` adds the gender and race columns.
    SIGINT or SIGTERM ends the workers, prints the summary so far and exits
    with 128 + the signal's number, having written either nothing or the
    whole set.
    """
    _require_samples(dataset, samples, skipped)
    out_dir = files.check_output_dir(args.output_dir)
    folders = [files.check_output_dir(out_dir / layout.folder) for layout in layouts]
    outcomes, tables, interruption = [], [], None
    start = time.perf_counter()
    with outputs.StopSignals() as stop, contextlib.ExitStack() as stack:
        file_sets = [stack.enter_context(outputs.FileSet(folder, output_names(dataset))) for folder in folders]
        try:
            align_into(outcomes, [sample.path for sample in samples], args.detector,
                       args.landmarks, args.workers, stop)
            for layout, folder, file_set in zip(layouts, folders, file_sets):
                tables.append(tabulate(samples, layout, outcomes, skipped, folder, attributes,
                                       args.keep_undetected))
                _stage_outputs(file_set, dataset, tables[-1], folder, args, layout)
            stop.check()
            for file_set in file_sets:
                file_set.commit()
            stop.check()
        except outputs.Interrupted as caught:
            interruption = caught
    _print_summary(dataset, len(samples), outcomes, len(skipped), time.perf_counter() - start, args)
    committed = all(file_set.committed for file_set in file_sets)
    if committed:
        for folder, table in zip(folders, tables):
            _print_written(dataset, folder, table)
    if interruption is not None:
        written = " after writing every output" if committed else (
            f"; nothing written ({out_dir} keeps its previous files, if any)")
        print(f"{dataset}: stopped by {interruption.name}{written}")
        raise SystemExit(interruption.exit_status)


def _require_samples(dataset, samples, skipped):
    if not samples:
        reasons = Counter(skip.reason for skip in skipped)
        detail = "; ".join(f"{reason}: {count}" for reason, count in reasons.items())
        raise SystemExit(f"{dataset}: no image to align ({detail or 'the input lists none'}); "
                         "check --img_dir and the labels")


def _stage_outputs(file_set, dataset, tables, out_dir, args, layout):
    """Stage the CSVs, the report and, last, the split record that names them."""
    contents = {split_record.csv_name(dataset, side): (tables.header, rows)
                for side, rows in tables.sides.items()}
    contents[report_name(dataset)] = (
        REPORT_COLUMNS, [(photo_name(skip.path, out_dir), skip.reason) for skip in tables.reported])
    digests = {}
    for name, (header, rows) in contents.items():
        data = files.csv_text([header, *rows]).encode("utf-8")
        file_set.add(name, data)
        digests[name] = split_record.digest(data)
    details = {"test_ratio": args.test_ratio, "subject_split": getattr(args, "subject_split", False)}
    if layout.fold is not None:
        details.update(folds=args.folds, fold=layout.fold)
    file_set.add(split_record.record_name(dataset),
                 split_record.render(dataset, args.seed, args.valid_ratio, digests, details))


def report_name(dataset):
    return f"{dataset}_report.csv"


def output_names(dataset):
    """The files of one run's set, as `_stage_outputs` writes them."""
    return [split_record.csv_name(dataset, side) for side in splits.SIDES] + [
        report_name(dataset), split_record.record_name(dataset)]


def _print_summary(dataset, tried, outcomes, n_skipped, seconds, args):
    counts = Counter(outcome.reason for outcome in outcomes)
    found, no_face, unreadable = counts[None], counts[REASON_NO_FACE], counts[REASON_UNREADABLE]
    readable = len(outcomes) - unreadable
    rate = 100.0 * found / readable if readable else 0.0
    kept = " (kept with the whole image as box)" if args.keep_undetected else ""
    print(f"{dataset}: face found in {found} of {readable} readable images ({rate:.2f}%); "
          f"{no_face} without a face{kept}, {unreadable} unreadable, "
          f"{n_skipped} left out before detection")
    done = len(outcomes)
    if done:
        print(f"aligned {done} of {tried} images in {seconds:.1f} s with "
              f"{min(args.workers, tried)} worker(s): {1000.0 * seconds / done:.1f} ms per "
              f"image, {done / seconds:.1f} images/s")


def _print_written(dataset, out_dir, tables):
    for side, rows in tables.sides.items():
        print(f"wrote {out_dir / split_record.csv_name(dataset, side)} ({len(rows)} rows)")
    left_out = len(tables.reported) - tables.n_fallback
    kept = f", {tables.n_fallback} kept with the whole image as box" if tables.n_fallback else ""
    print(f"wrote {out_dir / report_name(dataset)} ({left_out} images left out{kept}, "
          "with the reason)")
    print(f"wrote {out_dir / split_record.record_name(dataset)} (the split's seed and the "
          "files' sha256)")
