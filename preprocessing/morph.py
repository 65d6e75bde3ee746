"""MORPH II (Album2) → morph_{train,valid[,test]}_align.csv (with gender and ethnicity, the race column).

Reads the images and the metadata CSV shipped with Album2 (e.g.
MORPH_Album2_Commercial.csv), whose header names at least the columns
id_num (the person), photo (the image file), age, gender (M/F) and race
(letters). Other columns (picture_num, dob, doa, facial_hair, age_diff,
glasses, ...) are ignored. A photo is looked up in --img_dir as written in the
CSV, then by its file name alone, so --img_dir may be the Album2 folder or its
parent. A photo the metadata names twice is kept once, with its first line's
labels, and the later line is listed in the report, with a warning.

Ethnicity codes (the race column) follow UTKFace's: W (White) → 0, B (Black) → 1, A (Asian) → 2,
H (Hispanic) → 4 and O (Other) → 4. Hispanic has no class of its own in
UTKFace's scheme, whose "Other" includes Hispanic and Latino, so H counts as
Other. There is no Indian (3) in MORPH.

The split is random over images by default (80/20); --subject_split keeps
every person's photos (id_num) on one side, so that no face in valid or test was
seen, younger or older, in training; with --folds 5 it gives the 5-fold
subject-exclusive protocol (docs/protocols.md).

Example:
    python preprocessing/morph.py --img_dir MORPH/Album2 \\
        --metadata MORPH/MORPH_Album2_Commercial.csv --output_dir data/morph
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from preprocessing import common  # noqa: E402

DATASET = "morph"
METADATA_COLUMNS = ("id_num", "photo", "age", "gender", "race")


def find_photo(img_dir, photo):
    """The image file a metadata row names, or None when it is not there."""
    for candidate in (img_dir / photo, img_dir / Path(photo).name):
        if candidate.is_file():
            return candidate
    return None


def read_metadata(metadata, img_dir):
    """(samples, skipped) from the metadata CSV; SystemExit on a bad label."""
    rows, _ = common.read_csv_rows(metadata, METADATA_COLUMNS, "--metadata: file")
    labelled, skipped = [], []
    for line, row in rows:
        age = common.parse_age(row["age"], metadata, line)
        gender = common.parse_code(row["gender"].upper(), common.GENDER_LETTERS, "gender",
                                   metadata, line)
        ethnicity = common.parse_code(row["race"].upper(), common.ETHNICITY_LETTERS, "race", metadata, line)
        if not row["photo"]:
            raise SystemExit(f"{metadata}, line {line}: the photo column is empty")
        path = find_photo(img_dir, row["photo"])
        if path is None:
            skipped.append(common.Skip(img_dir / row["photo"], common.REASON_MISSING))
            continue
        labelled.append(common.Labelled(common.Sample(path, age, gender, ethnicity, subject=row["id_num"]), metadata, line))
    kept, duplicates = common.keep_first_of_each_photo(labelled)
    return [entry.sample for entry in kept], skipped + duplicates


def main(argv=None):
    parser = common.build_parser(__doc__, subjects=True)
    parser.add_argument(
        "--metadata", required=True,
        help="MORPH II Album2 metadata CSV (columns id_num, photo, age, gender, race)",
    )
    args = parser.parse_args(argv)
    img_dir = common.existing_dir(args.img_dir, "--img_dir")
    samples, skipped = read_metadata(Path(args.metadata), img_dir)
    common.process(DATASET, samples, common.layouts(samples, args), skipped, args, attributes=True)


if __name__ == "__main__":
    main()
