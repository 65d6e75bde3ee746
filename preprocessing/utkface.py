"""UTKFace → utkface_{train,valid[,test]}_align.csv (with gender and ethnicity, the race column).

Reads the "Aligned & Cropped Faces" release (UTKFace/*.jpg.chip.jpg, also the
in-the-wild *.jpg names), whose labels are in the file names:
age_gender_race_datetime.jpg.chip.jpg, gender 0 male / 1 female, race 0 White,
1 Black, 2 Asian, 3 Indian, 4 Other. Ages over 100 are kept as they are.

Quirks of the public release: a name with a space before ".jpg" or without the
dot before "jpg" is read as if it were spelled right; a name without its race
field (age_gender_datetime) is left out and listed in utkface_report.csv, as
is any other file whose name does not follow the pattern.

Examples (the second: 5 folds of 60/20/20, for crossval.py; see docs/protocols.md):
    python preprocessing/utkface.py --img_dir ../shared/data/UTKFace \\
        --output_dir data/utkface --valid_ratio 0.1 --seed 0
    python preprocessing/utkface.py --img_dir ../shared/data/UTKFace \\
        --output_dir data/utkface_folds --valid_ratio 0.2 --folds 5
"""
import re
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from preprocessing import common  # noqa: E402

DATASET = "utkface"

# age_gender_race_datetime (UTKFace's names for the fields; race is the
# ethnicity), then ".jpg" with the release's two misspellings tolerated (a space
# before the dot, a missing dot), then ".chip.jpg" in the cropped release.
NAME = re.compile(
    r"(?P<age>\d+)_(?P<gender>\d+)_(?P<race>\d+)_(?P<stamp>\d+)"
    r"(?P<space>\s*)(?P<dot>\.?)jpg(?:\.chip\.jpg)?",
    re.IGNORECASE,
)
# The same without the race field: age and gender are known, the ethnicity is not.
NAME_WITHOUT_ETHNICITY = re.compile(r"\d+_\d+_\d+(?:\.jpg)?(?:\.chip\.jpg)?", re.IGNORECASE)


@dataclass(frozen=True)
class Labels:
    """Labels read from one file name; ``repair`` says what was misspelled."""

    age: int
    gender: int
    ethnicity: int
    repair: str = None


def parse_name(name):
    """The labels in a UTKFace file name; ValueError saying why when there are none."""
    match = NAME.fullmatch(name)
    if match is None:
        if NAME_WITHOUT_ETHNICITY.fullmatch(name):
            raise ValueError("no race field in the name (age_gender_datetime)")
        raise ValueError("name does not follow age_gender_race_datetime.jpg.chip.jpg")
    gender = int(match["gender"])
    ethnicity = int(match["race"])
    if gender not in common.GENDERS:
        raise ValueError(f"gender {gender} in the name is not one of {sorted(common.GENDERS)}")
    if ethnicity not in common.ETHNICITIES:
        raise ValueError(f"race {ethnicity} in the name is not one of {sorted(common.ETHNICITIES)}")
    repairs = []
    if match["space"]:
        repairs.append("space before .jpg")
    if not match["dot"]:
        repairs.append("missing dot before jpg")
    return Labels(int(match["age"]), gender, ethnicity, ", ".join(repairs) or None)


def read_folder(img_dir):
    """(samples, skipped, repaired) for every file in ``img_dir``, sorted by name."""
    samples, skipped, repaired = [], [], []
    for path in sorted(entry for entry in img_dir.iterdir() if entry.is_file()):
        try:
            labels = parse_name(path.name)
        except ValueError as error:
            skipped.append(common.Skip(path, str(error)))
            continue
        if labels.repair:
            repaired.append((path.name, labels.repair))
        samples.append(common.Sample(path, labels.age, labels.gender, labels.ethnicity))
    return samples, skipped, repaired


def main(argv=None):
    parser = common.build_parser(__doc__)
    args = parser.parse_args(argv)
    img_dir = common.existing_dir(args.img_dir, "--img_dir")
    samples, skipped, repaired = read_folder(img_dir)
    for name, repair in repaired:
        print(f"read misspelled name {name!r} ({repair})")
    common.process(DATASET, samples, common.layouts(samples, args), skipped, args, attributes=True)


if __name__ == "__main__":
    main()
