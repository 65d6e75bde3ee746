"""Any folder of photos with a labels CSV → <dataset>_{train,valid[,test]}_align.csv.

The labels CSV has a header naming the columns photo (the image, relative to
--img_dir) and age (a number), and optionally gender and race (the
ethnicity) — both or neither, since the multi-task model needs the pair. Gender
is 0, M or male for male and 1, F or female for female; race is 0 or W
(White), 1 or B (Black), 2 or A (Asian), 3 or I (Indian), 4 or O (Other), or
the class's name; H (Hispanic) counts as Other. Letters and names may be in either case. Images
in the folder that the labels do not name are not used. An optional subject column names the
person in each photo: --subject_split then keeps every person on one side (and in one fold's
test part), and --folds K with K the number of persons is leave-one-person-out (FG-NET's protocol,
docs/protocols.md).

A file labelled twice (also through another path to it: "a.jpg" and
"./a.jpg", or a link) is kept once, with its first line's labels, and the
later line is listed in the report, with a warning; so one photo never lands
in both train and valid.

Example:
    python preprocessing/folder.py --img_dir my_photos --labels my_photos/labels.csv \\
        --output_dir data/mine --dataset mine
"""
import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from preprocessing import common  # noqa: E402

DEFAULT_DATASET = "folder"
LABEL_COLUMNS = ("photo", "age")
SUBJECT_COLUMN = "subject"
# Output file names are built from the data set's name.
DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def dataset_name(text):
    """argparse type: a name that is safe inside a file name."""
    if not DATASET_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{text!r}: use letters, digits, '_', '-' and '.' only"
        )
    return text


def label_codes(names, letters):
    """Codes a label may be written as, upper-cased: the number, the letter or
    the class's name."""
    codes = {str(code): code for code in names}
    codes.update(letters)
    codes.update({name.upper(): code for code, name in names.items()})
    return codes


GENDER_CODES = label_codes(common.GENDERS, common.GENDER_LETTERS)
ETHNICITY_CODES = label_codes(common.ETHNICITIES, common.ETHNICITY_LETTERS)


def read_labels(labels, img_dir):
    """(samples, skipped, attributes) from the labels CSV; SystemExit on a bad label."""
    rows, columns = common.read_csv_rows(labels, LABEL_COLUMNS, "--labels: file")
    missing = [name for name in common.ATTRIBUTE_COLUMNS if name not in columns]
    if len(missing) == 1:
        raise SystemExit(
            f"{labels}: has no {missing[0]} column; give both gender and race, or neither"
        )
    attributes = not missing
    labelled, skipped = [], []
    for line, row in rows:
        sample = _read_row(row, line, labels, img_dir, attributes)
        if not sample.path.is_file():
            skipped.append(common.Skip(sample.path, common.REASON_MISSING))
            continue
        labelled.append(common.Labelled(sample, labels, line))
    kept, duplicates = common.keep_first_of_each_photo(labelled)
    return [entry.sample for entry in kept], skipped + duplicates, attributes


def _read_row(row, line, labels, img_dir, attributes):
    if not row["photo"]:
        raise SystemExit(f"{labels}, line {line}: the photo column is empty")
    age = common.parse_age(row["age"], labels, line)
    gender = ethnicity = None
    if attributes:
        gender = common.parse_code(row["gender"].upper(), GENDER_CODES, "gender", labels, line)
        ethnicity = common.parse_code(row["race"].upper(), ETHNICITY_CODES, "race", labels, line)
    return common.Sample(img_dir / row["photo"], age, gender, ethnicity, subject=row.get(SUBJECT_COLUMN) or None)


def main(argv=None):
    parser = common.build_parser(__doc__, subjects=True)
    parser.add_argument(
        "--labels", required=True,
        help="CSV with a header and the columns photo (relative to --img_dir), age "
             "and optionally gender (0/1, M/F, male/female) and race (0-4, or "
             "W, B, A, I, O, H), and subject (the person, for --subject_split)",
    )
    parser.add_argument(
        "--dataset", type=dataset_name, default=DEFAULT_DATASET,
        help="name of the output CSVs and of training's --dataset (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    img_dir = common.existing_dir(args.img_dir, "--img_dir")
    samples, skipped, attributes = read_labels(Path(args.labels), img_dir)
    common.process(args.dataset, samples, common.layouts(samples, args), skipped, args, attributes=attributes)


if __name__ == "__main__":
    main()
