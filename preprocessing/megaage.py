"""MegaAge / MegaAge-Asian → <dataset>_{train,valid[,test]}_align.csv.

Reads either data set in its published layout, with --img_dir at its root:

    train/  test/                       the images
    list/train_name.txt  list/train_age.txt
    list/test_name.txt   list/test_age.txt

The name and age lists hold one entry per line, line N of one matching line N
of the other. The publisher's split is kept: train → train CSV, test → valid
CSV. --official_test keeps the publisher's test part as the test CSV (the
published protocol, scored by CA(3) and CA(5); see docs/protocols.md) and draws
valid from the train part (--valid_ratio of it, default 0.2). --valid_ratio
alone, --test_ratio or --folds instead pool both parts and split at random. A photo
named twice (in one part or both, also through another path) is kept once,
with its first line's labels (the train list's first), and the later line is
listed in the report, with a warning.

Example:
    python preprocessing/megaage.py --img_dir megaage_asian \\
        --output_dir data/megaage_asian --dataset megaage_asian --official_test
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from preprocessing import common, splits  # noqa: E402

DATASETS = ("megaage", "megaage_asian")
DEFAULT_DATASET = "megaage_asian"
LIST_DIR = "list"
# The publisher's parts: image folder and list prefix.
TRAIN_PART = "train"
TEST_PART = "test"


def read_list(path):
    """Lines of a list file, stripped; SystemExit on a blank line."""
    path = common.existing_file(path, "list file")
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise SystemExit(f"{path}, line {number}: blank line; remove it so the lists stay aligned")
    return [line.strip() for line in lines]


def read_part(img_dir, part):
    """(Labelled samples, skipped) of one published part, 'train' or 'test'."""
    names_path = img_dir / LIST_DIR / f"{part}_name.txt"
    ages_path = img_dir / LIST_DIR / f"{part}_age.txt"
    names, ages = read_list(names_path), read_list(ages_path)
    if len(names) != len(ages):
        raise SystemExit(
            f"{names_path} has {len(names)} lines but {ages_path} has {len(ages)}; "
            "they must list the same images in the same order"
        )
    labelled, skipped = [], []
    for line, (name, age_text) in enumerate(zip(names, ages), start=1):
        age = common.parse_age(age_text, ages_path, line)
        path = img_dir / part / name
        if path.is_file():
            labelled.append(common.Labelled(common.Sample(path, age), names_path, line))
        else:
            skipped.append(common.Skip(path, common.REASON_MISSING))
    return labelled, skipped


def read_parts(img_dir):
    """(train samples, test samples, skipped): a photo named twice, in one part or both, is kept once, at its first
    line (train's first), so that no face is both trained on and scored."""
    train, train_skipped = read_part(img_dir, TRAIN_PART)
    test, test_skipped = read_part(img_dir, TEST_PART)
    kept, duplicates = common.keep_first_of_each_photo(train + test)
    kept = set(kept)
    return ([entry.sample for entry in train if entry in kept], [entry.sample for entry in test if entry in kept],
            train_skipped + test_skipped + duplicates)


def main(argv=None):
    parser = common.build_parser(
        __doc__, valid_ratio=None,
        valid_ratio_help="pool train and test and draw this share, 0..1, at random "
                         "for the validation CSV (1 puts every image in valid); by "
                         "default the publisher's split is kept: test is valid",
    )
    parser.add_argument(
        "--dataset", choices=DATASETS, default=DEFAULT_DATASET,
        help="name of the output CSVs and of training's --dataset (default: %(default)s)",
    )
    parser.add_argument(
        "--official_test", action="store_true",
        help="the publisher's test part is the test CSV and valid is drawn from its train part "
             f"(--valid_ratio of it, default {common.DEFAULT_VALID_RATIO})",
    )
    args = parser.parse_args(argv)
    img_dir = common.existing_dir(args.img_dir, "--img_dir")
    train, test, skipped = read_parts(img_dir)
    samples = train + test
    common.process(args.dataset, samples, layouts(samples, len(train), args), skipped, args, attributes=False)


def layouts(samples, n_train, args):
    """The publisher's split (its test part as valid) unless the options ask for another (see the module's
    docstring); the default valid share is filled in where one is drawn."""
    if args.valid_ratio is None and not (args.official_test or args.test_ratio or args.folds):
        return [splits.Layout("", None, {"train": list(range(n_train)), "valid": list(range(n_train, len(samples)))})]
    if args.valid_ratio is None:
        args.valid_ratio = common.DEFAULT_VALID_RATIO
    fixed_test = range(n_train, len(samples)) if args.official_test else ()
    return common.layouts(samples, args, fixed_test)


if __name__ == "__main__":
    main()
