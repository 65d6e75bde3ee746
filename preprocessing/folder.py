"""Any folder of photos with a labels CSV → <dataset>_{train,valid}_align.csv.

The labels CSV has a header naming the columns photo (the image, relative to
--img_dir) and age (a number), and optionally gender (0 male, 1 female) and
race (0 White, 1 Black, 2 Asian, 3 Indian, 4 Other) — both or neither, since
the multi-task model needs the pair. Images in the folder that the labels do
not name are not used.

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
# Output file names are built from the data set's name.
DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def dataset_name(text):
    """argparse type: a name that is safe inside a file name."""
    if not DATASET_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{text!r}: use letters, digits, '_', '-' and '.' only"
        )
    return text


def read_labels(labels, img_dir):
    """(samples, skipped, attributes) from the labels CSV; SystemExit on a bad label."""
    rows, columns = common.read_csv_rows(labels, LABEL_COLUMNS, "--labels: file")
    missing = [name for name in common.ATTRIBUTE_COLUMNS if name not in columns]
    if len(missing) == 1:
        raise SystemExit(
            f"{labels}: has no {missing[0]} column; give both gender and race, or neither"
        )
    attributes = not missing
    gender_codes = {str(code): code for code in common.GENDERS}
    race_codes = {str(code): code for code in common.RACES}
    samples, skipped = [], []
    for line, row in rows:
        if not row["photo"]:
            raise SystemExit(f"{labels}, line {line}: the photo column is empty")
        age = common.parse_age(row["age"], labels, line)
        gender = race = None
        if attributes:
            gender = common.parse_code(row["gender"], gender_codes, "gender", labels, line)
            race = common.parse_code(row["race"], race_codes, "race", labels, line)
        path = img_dir / row["photo"]
        if path.is_file():
            samples.append(common.Sample(path, age, gender, race))
        else:
            skipped.append(common.Skip(path, common.REASON_MISSING))
    return samples, skipped, attributes


def main(argv=None):
    parser = common.build_parser(__doc__)
    parser.add_argument(
        "--labels", required=True,
        help="CSV with a header and the columns photo (relative to --img_dir), age "
             "and optionally gender and race",
    )
    parser.add_argument(
        "--dataset", type=dataset_name, default=DEFAULT_DATASET,
        help="name of the output CSVs and of training's --dataset (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    img_dir = common.existing_dir(args.img_dir, "--img_dir")
    samples, skipped, attributes = read_labels(Path(args.labels), img_dir)
    train, valid = common.split(samples, args.valid_ratio, args.seed)
    common.process(args.dataset, train, valid, skipped, args, attributes=attributes)


if __name__ == "__main__":
    main()
