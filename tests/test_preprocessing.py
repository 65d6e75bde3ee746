"""Tests of preprocessing/: face alignment on real UTKFace faces, the four
data-set scripts on trees in their published layouts, and every bad-input path.

Real images are read from ../shared/data/UTKFace (never copied into the
repository); trees in tmp_path link to them.
"""
import csv
import os
import random
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import geometry  # noqa: E402
from preprocessing import align_pool, common, folder, megaage, morph, split_record, splits, utkface  # noqa: E402
from preprocessing.align import EYE_LANDMARKS, FaceAligner  # noqa: E402
from records import Records  # noqa: E402

UTKFACE = (REPO / "../shared/data/UTKFace").resolve()
QUIRK_NAMES = {
    "61_1_20170109150557335.jpg.chip.jpg",
    "61_1_20170109142408075.jpg.chip.jpg",
    "39_1_20170116174525125.jpg.chip.jpg",
    "55_0_0_20170116232725357jpg.chip.jpg",
    "24_0_1_20170116220224657 .jpg.chip.jpg",
}
DETECTION_SAMPLE = 500
DETECTION_STRIDE = 40
MIN_DETECTION_RATE = 0.97
ROTATION_FACES = 20
ROTATION_STRIDE = 1000
ROTATIONS_DEG = (-30, -15, 0, 15, 30)
ANGLE_TOLERANCE_DEG = 2.0
# Share of (face, rotation) pairs that must be within the tolerance: dlib's
# 5-point eye corners wander by 2-4 degrees on some hard faces (squinting,
# head bowed, glasses); the median error is a few tenths of a degree.
MIN_SHARE_WITHIN_TOLERANCE = 0.9
MAX_MEDIAN_ERROR_DEG = 0.5
MAX_ERROR_DEG = 5.0
CROP_EXPAND = 0.5
CROP_SIZE = 200
WORKERS = ["--workers", "2"]
ONE_WORKER = ["--workers", "1"]
# Real UTKFace crops in which dlib finds no face (about 0.4% of the set); the
# tests check that the detector still misses them.
UNDETECTED_NAMES = ("1_0_4_20170103202401551.jpg.chip.jpg", "21_0_1_20170113195431788.jpg.chip.jpg")


@pytest.fixture(scope="module")
def utk_names():
    """UTKFace file names with well-formed labels, sorted."""
    assert UTKFACE.is_dir(), f"UTKFace images expected in {UTKFACE}"
    return sorted(name for name in os.listdir(UTKFACE) if name not in QUIRK_NAMES)


@pytest.fixture(scope="module")
def aligner():
    return FaceAligner()


def link_images(folder_path, names, rename=None):
    """Symbolic links in ``folder_path`` to UTKFace images (renamed by ``rename``)."""
    folder_path.mkdir(parents=True, exist_ok=True)
    links = []
    for index, name in enumerate(names):
        link = folder_path / (rename(index, name) if rename else name)
        link.symlink_to(UTKFACE / name)
        links.append(link)
    return links


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        return reader.fieldnames, list(reader)


def outputs(out_dir, dataset):
    """(train rows, valid rows, report rows) written for ``dataset``."""
    _, train = read_csv(out_dir / f"{dataset}_train_align.csv")
    _, valid = read_csv(out_dir / f"{dataset}_valid_align.csv")
    _, report = read_csv(out_dir / f"{dataset}_report.csv")
    return train, valid, report


def pad_canvas(rgb):
    """The image in the middle of a black canvas twice its size, so that
    turning it cuts nothing of the face."""
    height, width = rgb.shape[:2]
    return cv2.copyMakeBorder(rgb, height // 2, height // 2, width // 2, width // 2,
                              cv2.BORDER_CONSTANT, value=0)


def turn(rgb, deg):
    height, width = rgb.shape[:2]
    return cv2.warpAffine(rgb, geometry.rotation_matrix(width, height, deg), (width, height))


def eye_centres(face):
    left, right = EYE_LANDMARKS[len(face.landmarks)]
    return face.landmarks[list(left)].mean(axis=0), face.landmarks[list(right)].mean(axis=0)


# Alignment on real faces ----------------------------------------------------

def test_utkface_script_finds_faces_in_real_images(tmp_path, utk_names):
    names = utk_names[::DETECTION_STRIDE][:DETECTION_SAMPLE]
    assert len(names) == DETECTION_SAMPLE
    link_images(tmp_path / "images", names)
    out = tmp_path / "out"
    utkface.main(["--img_dir", str(tmp_path / "images"), "--output_dir", str(out),
                  "--valid_ratio", "0.1", "--seed", "0", *WORKERS])

    header, train = read_csv(out / "utkface_train_align.csv")
    _, valid = read_csv(out / "utkface_valid_align.csv")
    _, report = read_csv(out / "utkface_report.csv")
    assert header == list(common.CSV_COLUMNS) + list(common.ATTRIBUTE_COLUMNS)
    assert len(train) + len(valid) >= MIN_DETECTION_RATE * DETECTION_SAMPLE
    assert len(train) + len(valid) + len(report) == DETECTION_SAMPLE
    assert {row["reason"] for row in report} <= {common.REASON_NO_FACE}
    # The split is drawn before detection: 10% of the images, less those without a face.
    assert round(0.1 * DETECTION_SAMPLE) - len(report) <= len(valid) <= round(0.1 * DETECTION_SAMPLE)
    for row in train + valid:
        photo = out / row["photo"]
        assert not Path(row["photo"]).is_absolute() and photo.is_file()
        labels = utkface.parse_name(photo.name)
        assert (int(row["age"]), int(row["gender"]), int(row["race"])) == (
            labels.age, labels.gender, labels.ethnicity)
    for split in ("train", "valid"):  # the boxes frame faces of their photos (past the turned frame's edge, at times)
        Records(out / f"utkface_{split}_align.csv", out)
    assert not list(out.glob("*.part")) + list(out.glob("*.tmp")), "temporary files left behind"


def test_split_is_reproducible_and_valid_ratio_one_empties_train(tmp_path, utk_names):
    link_images(tmp_path / "images", utk_names[:10])
    for run in ("a", "b"):
        utkface.main(["--img_dir", str(tmp_path / "images"), "--output_dir", str(tmp_path / run),
                      "--valid_ratio", "0.3", "--seed", "7", *WORKERS])
    assert outputs(tmp_path / "a", "utkface") == outputs(tmp_path / "b", "utkface")

    out = tmp_path / "all_valid"
    utkface.main(["--img_dir", str(tmp_path / "images"), "--output_dir", str(out),
                  "--valid_ratio", "1", "--workers", "1"])
    header, train = read_csv(out / "utkface_train_align.csv")
    assert header and train == []
    _, valid = read_csv(out / "utkface_valid_align.csv")
    assert len(valid) == 10


def test_rotated_faces_are_levelled(utk_names, aligner):
    """Turn real faces by known angles: the aligner must measure the turn,
    and the crop it prescribes must show level eyes."""
    deg_errors, level_errors = [], []
    for name in utk_names[::ROTATION_STRIDE][:ROTATION_FACES]:
        canvas = pad_canvas(geometry.read_rgb(UTKFACE / name))
        upright = aligner.align_largest(canvas)
        assert upright is not None, name
        for turned_by in ROTATIONS_DEG:
            image = turn(canvas, turned_by)
            face = aligner.align_largest(image)
            assert face is not None, (name, turned_by)
            # Turning the image counter-clockwise by a tilts the eye line by -a.
            deg_errors.append(face.deg - (upright.deg - turned_by))

            # Exact: the face's own eyes, carried by the crop transform, are level.
            height, width = image.shape[:2]
            matrix = geometry.crop_matrix(face.deg, face.box, width, height, CROP_SIZE, CROP_SIZE)
            left, right = geometry.transform_points(matrix, eye_centres(face))
            assert abs(right[1] - left[1]) < 1e-6 and right[0] > left[0]

            # Independent: a fresh look at the crop finds level eyes.
            crop = geometry.aligned_crop(image, face.deg, face.box, CROP_EXPAND, CROP_SIZE)
            again = aligner.align_largest(crop)
            assert again is not None, (name, turned_by)
            level_errors.append(again.deg)
    for errors in (np.abs(deg_errors), np.abs(level_errors)):
        assert np.mean(errors <= ANGLE_TOLERANCE_DEG) >= MIN_SHARE_WITHIN_TOLERANCE, errors
        assert np.median(errors) <= MAX_MEDIAN_ERROR_DEG, errors
        assert errors.max() <= MAX_ERROR_DEG, errors


def test_box_is_in_rotated_frame_and_keeps_the_face_size(utk_names, aligner):
    canvas = pad_canvas(geometry.read_rgb(UTKFACE / utk_names[0]))
    upright = aligner.align_largest(canvas)
    face = aligner.align_largest(turn(canvas, ROTATIONS_DEG[-1]))
    height, width = canvas.shape[:2]
    # The face turned back upright lands where the upright face's box is.
    centre = np.array([(face.box[0] + face.box[2]) / 2, (face.box[1] + face.box[3]) / 2])
    upright_centre = np.array([(upright.box[0] + upright.box[2]) / 2,
                               (upright.box[1] + upright.box[3]) / 2])
    face_size = upright.box[2] - upright.box[0]
    # Both boxes are in frames levelled by their own deg, which differ only
    # by the landmark noise: the centres agree to a small share of the face.
    assert np.linalg.norm(centre - upright_centre) < 0.1 * face_size
    assert 0.8 < (face.box[2] - face.box[0]) / face_size < 1.25
    assert 0 <= face.box[0] < face.box[2] <= width and 0 <= face.box[1] < face.box[3] <= height


def test_align_all_returns_every_face_largest_first(utk_names):
    aligner = FaceAligner(upsample=1)  # one pass finds every face, as the demo needs
    big = geometry.read_rgb(UTKFACE / utk_names[100])
    small = cv2.resize(geometry.read_rgb(UTKFACE / utk_names[200]), (140, 140))
    canvas = np.zeros((300, 600, 3), np.uint8)
    canvas[50:250, 20:220] = big
    canvas[80:220, 400:540] = small
    faces = aligner.align_all(canvas)
    assert len(faces) == 2
    assert faces[0].area > faces[1].area
    assert faces[0].det_box[2] < 300 < faces[1].det_box[0]
    assert aligner.align_largest(canvas).box == faces[0].box
    assert aligner.align_largest(np.zeros((200, 200, 3), np.uint8)) is None


def test_other_detector_and_landmark_models_agree(utk_names, aligner):
    image = geometry.read_rgb(UTKFACE / utk_names[300])
    reference = aligner.align_largest(image)
    for other in (FaceAligner(detector="cnn"), FaceAligner(landmarks=68)):
        face = other.align_largest(image)
        assert face is not None
        assert abs(face.deg - reference.deg) < 2 * ANGLE_TOLERANCE_DEG


# UTKFace names ------------------------------------------------------------

@pytest.mark.parametrize("name, labels", [
    ("26_0_2_20170104023102422.jpg.chip.jpg", (26, 0, 2, None)),
    ("116_1_3_20170120134921760.jpg.chip.jpg", (116, 1, 3, None)),
    ("9_1_4_20170103213057382.jpg", (9, 1, 4, None)),
    ("55_0_0_20170116232725357jpg.chip.jpg", (55, 0, 0, "missing dot before jpg")),
    ("24_0_1_20170116220224657 .jpg.chip.jpg", (24, 0, 1, "space before .jpg")),
])
def test_parse_name_reads_and_repairs(name, labels):
    assert tuple(vars(utkface.parse_name(name)).values()) == labels


@pytest.mark.parametrize("name, reason", [
    ("61_1_20170109150557335.jpg.chip.jpg", "no race field"),
    ("61_1_20170109142408075.jpg.chip.jpg", "no race field"),
    ("39_1_20170116174525125.jpg.chip.jpg", "no race field"),
    ("30_2_0_20170116174525125.jpg.chip.jpg", "gender 2"),
    ("30_0_5_20170116174525125.jpg.chip.jpg", "race 5"),
    ("readme.txt", "does not follow"),
])
def test_parse_name_rejects_with_a_reason(name, reason):
    with pytest.raises(ValueError, match=reason):
        utkface.parse_name(name)


def test_quirk_names_are_repaired_or_reported(tmp_path, utk_names):
    quirks = sorted(QUIRK_NAMES)
    real = utk_names[:len(quirks)]
    link_images(tmp_path / "images", real, rename=lambda index, _: quirks[index])
    out = tmp_path / "out"
    utkface.main(["--img_dir", str(tmp_path / "images"), "--output_dir", str(out), *WORKERS])
    train, valid, report = outputs(out, "utkface")
    kept = {Path(row["photo"]).name for row in train + valid}
    assert kept == {"55_0_0_20170116232725357jpg.chip.jpg", "24_0_1_20170116220224657 .jpg.chip.jpg"}
    assert {Path(row["photo"]).name: row["reason"] for row in report} == {
        name: "no race field in the name (age_gender_datetime)"
        for name in QUIRK_NAMES - kept
    }


# MORPH II -----------------------------------------------------------------

MORPH_HEADER = ["id_num", "picture_num", "dob", "doa", "race", "gender",
                "facial_hair", "age", "age_diff", "glasses", "photo"]
MORPH_PEOPLE = [("000101", "M", "W"), ("000202", "F", "B"), ("000303", "M", "H"),
                ("000404", "F", "A"), ("000505", "M", "O")]
PHOTOS_PER_PERSON = 2


def make_morph(root, utk_names, extra_rows=()):
    """Album2 images and its metadata CSV, as the publisher lays them out."""
    rows, names = [], []
    for person, (id_num, gender, ethnicity) in enumerate(MORPH_PEOPLE):
        for picture in range(PHOTOS_PER_PERSON):
            age = 20 + 3 * picture + person
            photo = f"{id_num}_{picture:02d}{gender}{age}.JPG"
            names.append(photo)
            rows.append([id_num, picture, "01/01/1970", "01/01/1990", ethnicity, gender,
                         "0", age, "0", "0", f"Album2/{photo}"])
    sources = utk_names[:len(names)]
    link_images(root / "Album2", sources, rename=lambda index, _: names[index])
    metadata = root / "MORPH_Album2_Commercial.csv"
    with open(metadata, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(MORPH_HEADER)
        writer.writerows(rows + list(extra_rows))
    return metadata


def test_morph_labels_and_subject_split(tmp_path, utk_names):
    missing = ["000606", 0, "", "", "W", "M", "0", "30", "0", "0", "Album2/000606_00M30.JPG"]
    metadata = make_morph(tmp_path / "morph", utk_names, extra_rows=[missing])
    out = tmp_path / "out"
    morph.main(["--img_dir", str(tmp_path / "morph"), "--metadata", str(metadata),
                "--output_dir", str(out), "--subject_split", "--valid_ratio", "0.4", *WORKERS])
    train, valid, report = outputs(out, "morph")
    assert len(train) + len(valid) + len(report) == len(MORPH_PEOPLE) * PHOTOS_PER_PERSON + 1
    assert {Path(row["photo"]).name: row["reason"] for row in report if row["reason"] != common.REASON_NO_FACE} == {
        "000606_00M30.JPG": common.REASON_MISSING
    }
    people = {id_num: (gender, ethnicity) for id_num, gender, ethnicity in MORPH_PEOPLE}
    codes = {"M": "0", "F": "1", "W": "0", "B": "1", "A": "2", "H": "4", "O": "4"}
    for row in train + valid:
        gender, ethnicity = people[Path(row["photo"]).name[:6]]
        assert (row["gender"], row["race"]) == (codes[gender], codes[ethnicity])
        assert row["age"] == Path(row["photo"]).stem[-2:]
    train_people = {Path(row["photo"]).name[:6] for row in train}
    valid_people = {Path(row["photo"]).name[:6] for row in valid}
    assert train_people and valid_people and not train_people & valid_people


def test_morph_finds_photos_from_album_folder_too(tmp_path, utk_names):
    metadata = make_morph(tmp_path / "morph", utk_names)
    out = tmp_path / "out"
    morph.main(["--img_dir", str(tmp_path / "morph" / "Album2"), "--metadata", str(metadata),
                "--output_dir", str(out), *WORKERS])
    train, valid, report = outputs(out, "morph")
    assert len(train) + len(valid) + len(report) == len(MORPH_PEOPLE) * PHOTOS_PER_PERSON
    assert all(row["reason"] == common.REASON_NO_FACE for row in report)
    # A random split over images by default, drawn before detection: 20% of 10.
    assert len(valid) <= 2 and len(train) <= 8


def test_morph_bad_letter_names_file_and_line(tmp_path, utk_names):
    bad = ["000707", 0, "", "", "X", "M", "0", "30", "0", "0", "Album2/000101_00M20.JPG"]
    metadata = make_morph(tmp_path / "morph", utk_names, extra_rows=[bad])
    with pytest.raises(SystemExit, match=r"MORPH_Album2_Commercial.csv, line 12: race 'X'"):
        morph.main(["--img_dir", str(tmp_path / "morph"), "--metadata", str(metadata),
                    "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_morph_keeps_a_photo_listed_twice_once_with_a_warning(tmp_path, utk_names, capsys):
    """Line 12 names line 2's photo again, through another path to it, with another age."""
    again = ["000101", 0, "", "", "W", "M", "0", "60", "0", "0", "./Album2/000101_00M20.JPG"]
    metadata = make_morph(tmp_path / "morph", utk_names, extra_rows=[again])
    out = tmp_path / "out"
    morph.main(["--img_dir", str(tmp_path / "morph"), "--metadata", str(metadata), "--output_dir", str(out),
                "--valid_ratio", "0.5", "--keep_undetected", *ONE_WORKER])
    assert re.search(r"MORPH_Album2_Commercial.csv, line 12: .*000101_00M20.JPG is the file of line 2 .* with "
                     r"other labels \(age 60, gender 0, race 0 against age 20, gender 0, race 0 on line 2\)",
                     capsys.readouterr().err)
    train, valid, report = outputs(out, "morph")
    names = [Path(row["photo"]).name for row in train + valid]
    assert sorted(names) == sorted(set(names)) and len(names) == len(MORPH_PEOPLE) * PHOTOS_PER_PERSON
    assert {row["age"] for row in train + valid if row["photo"].endswith("000101_00M20.JPG")} == {"20"}
    assert [row["reason"] for row in report if not row["reason"].startswith(common.REASON_NO_FACE)] == [
        "labelled again on line 12 of MORPH_Album2_Commercial.csv; line 2's labels kept"]


def test_morph_missing_metadata_or_column(tmp_path, utk_names):
    make_morph(tmp_path / "morph", utk_names)
    with pytest.raises(SystemExit, match="nope.csv does not exist"):
        morph.main(["--img_dir", str(tmp_path / "morph"), "--metadata", str(tmp_path / "nope.csv"),
                    "--output_dir", str(tmp_path / "out")])
    no_age = tmp_path / "no_age.csv"
    no_age.write_text("id_num,photo,gender,race\n000101,Album2/000101_00M20.JPG,M,W\n")
    with pytest.raises(SystemExit, match="no column age"):
        morph.main(["--img_dir", str(tmp_path / "morph"), "--metadata", str(no_age),
                    "--output_dir", str(tmp_path / "out")])


# MegaAge ------------------------------------------------------------------

MEGAAGE_PARTS = {"train": 6, "test": 4}


def make_megaage(root, utk_names):
    """train/, test/ and list/*.txt, as the publisher lays them out."""
    (root / "list").mkdir(parents=True)
    start = 0
    for part, count in MEGAAGE_PARTS.items():
        names = [f"{index + 1}.jpg" for index in range(count)]
        link_images(root / part, utk_names[start:start + count],
                    rename=lambda index, _: names[index])
        ages = [str(int(utkface.parse_name(name).age)) for name in utk_names[start:start + count]]
        (root / "list" / f"{part}_name.txt").write_text("\n".join(names) + "\n")
        (root / "list" / f"{part}_age.txt").write_text("\n".join(ages) + "\n")
        start += count


def test_megaage_keeps_the_published_split(tmp_path, utk_names):
    make_megaage(tmp_path / "megaage", utk_names)
    out = tmp_path / "out"
    megaage.main(["--img_dir", str(tmp_path / "megaage"), "--output_dir", str(out),
                  "--dataset", "megaage", *WORKERS])
    header, train = read_csv(out / "megaage_train_align.csv")
    _, valid = read_csv(out / "megaage_valid_align.csv")
    _, report = read_csv(out / "megaage_report.csv")
    assert header == list(common.CSV_COLUMNS)
    assert {Path(row["photo"]).parent.name for row in train} == {"train"}
    assert {Path(row["photo"]).parent.name for row in valid} == {"test"}
    assert len(train) + len(valid) + len(report) == sum(MEGAAGE_PARTS.values())
    first_age = (tmp_path / "megaage/list/train_age.txt").read_text().split()[0]
    assert all(row["age"] == first_age for row in train if row["photo"].endswith("train/1.jpg"))


def test_megaage_valid_ratio_one_pools_everything_in_valid(tmp_path, utk_names):
    make_megaage(tmp_path / "megaage", utk_names)
    out = tmp_path / "out"
    megaage.main(["--img_dir", str(tmp_path / "megaage"), "--output_dir", str(out),
                  "--valid_ratio", "1", *WORKERS])
    train, valid, report = outputs(out, "megaage_asian")
    assert train == [] and len(valid) + len(report) == sum(MEGAAGE_PARTS.values())


def test_megaage_keeps_a_photo_listed_in_both_parts_once_in_train(tmp_path, utk_names, capsys):
    """The test list names the train part's first photo (through another path): it would be trained on and scored."""
    make_megaage(tmp_path / "megaage", utk_names)
    lists = tmp_path / "megaage" / "list"
    with open(lists / "test_name.txt", "a") as names, open(lists / "test_age.txt", "a") as ages:
        names.write("../train/1.jpg\n")
        ages.write("77\n")
    out = tmp_path / "out"
    megaage.main(["--img_dir", str(tmp_path / "megaage"), "--output_dir", str(out), "--dataset", "megaage",
                  "--keep_undetected", *ONE_WORKER])
    assert re.search(r"test_name.txt, line 5: .*train/1.jpg is the file of train_name.txt, line 1 .* with other "
                     r"labels", capsys.readouterr().err)
    train, valid, report = outputs(out, "megaage")
    assert [Path(row["photo"]).parts[-2:] for row in train].count(("train", "1.jpg")) == 1
    assert len(valid) == MEGAAGE_PARTS["test"] and "train" not in {Path(row["photo"]).parts[-2] for row in valid}
    assert [row["reason"] for row in report if not row["reason"].startswith(common.REASON_NO_FACE)] == [
        "labelled again on line 5 of test_name.txt; train_name.txt, line 1's labels kept"]


def test_megaage_missing_list_file(tmp_path, utk_names):
    make_megaage(tmp_path / "megaage", utk_names)
    (tmp_path / "megaage/list/test_age.txt").unlink()
    with pytest.raises(SystemExit, match=r"list file .*test_age.txt does not exist"):
        megaage.main(["--img_dir", str(tmp_path / "megaage"), "--output_dir", str(tmp_path / "out")])


def test_megaage_non_numeric_age_names_file_and_line(tmp_path, utk_names):
    make_megaage(tmp_path / "megaage", utk_names)
    ages = tmp_path / "megaage/list/train_age.txt"
    lines = ages.read_text().splitlines()
    lines[2] = "thirty"
    ages.write_text("\n".join(lines) + "\n")
    with pytest.raises(SystemExit, match=r"train_age.txt, line 3: age 'thirty' is not a number"):
        megaage.main(["--img_dir", str(tmp_path / "megaage"), "--output_dir", str(tmp_path / "out")])


def test_megaage_lists_of_different_length(tmp_path, utk_names):
    make_megaage(tmp_path / "megaage", utk_names)
    ages = tmp_path / "megaage/list/test_age.txt"
    ages.write_text("\n".join(ages.read_text().splitlines()[:-1]) + "\n")
    with pytest.raises(SystemExit, match="test_name.txt has 4 lines but .*test_age.txt has 3"):
        megaage.main(["--img_dir", str(tmp_path / "megaage"), "--output_dir", str(tmp_path / "out")])


# Any folder ---------------------------------------------------------------

def test_folder_with_and_without_attributes(tmp_path, utk_names):
    names = utk_names[:6]
    link_images(tmp_path / "photos" / "sub", names)
    with_attributes = tmp_path / "labels.csv"
    with open(with_attributes, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["photo", "age", "gender", "race"])
        for name in names:
            labels = utkface.parse_name(name)
            writer.writerow([f"sub/{name}", labels.age, labels.gender, labels.ethnicity])
    ages_only = tmp_path / "ages.csv"
    ages_only.write_text("photo,age\n" + "".join(f"sub/{name},{25.5}\n" for name in names))

    runs = {"mine": (with_attributes, ["--dataset", "mine"]), "folder": (ages_only, [])}
    for dataset, (labels, extra) in runs.items():
        folder.main(["--img_dir", str(tmp_path / "photos"), "--labels", str(labels),
                     "--output_dir", str(tmp_path / dataset), *extra, *WORKERS])
    header, train = read_csv(tmp_path / "mine" / "mine_train_align.csv")
    assert header == list(common.CSV_COLUMNS) + list(common.ATTRIBUTE_COLUMNS)
    header, train = read_csv(tmp_path / "folder" / "folder_train_align.csv")
    _, valid = read_csv(tmp_path / "folder" / "folder_valid_align.csv")
    assert header == list(common.CSV_COLUMNS)
    assert {row["age"] for row in train + valid} == {"25.5"}
    assert len(valid) <= 1 and len(train) + len(valid) >= 5  # 20% of 6, before detection


def test_folder_bad_labels(tmp_path, utk_names):
    link_images(tmp_path / "photos", utk_names[:2])
    cases = {
        "photo,age\n{0},abc\n": r"labels.csv, line 2: age 'abc' is not a number",
        "photo,age,gender\n{0},30,1\n": "no race column",
        "photo,age,gender,race\n{0},30,1,9\n": r"line 2: race '9' is not one of 0, 1, 2, 3, 4",
        "name,age\n{0},30\n": "no column photo",
    }
    labels = tmp_path / "labels.csv"
    for text, message in cases.items():
        labels.write_text(text.format(utk_names[0]))
        with pytest.raises(SystemExit, match=message):
            folder.main(["--img_dir", str(tmp_path / "photos"), "--labels", str(labels),
                         "--output_dir", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="labels: file .*missing.csv does not exist"):
        folder.main(["--img_dir", str(tmp_path / "photos"), "--labels", str(tmp_path / "missing.csv"),
                     "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


# Bad input shared by every script --------------------------------------------

@pytest.mark.parametrize("script, extra", [
    (utkface, []),
    (morph, ["--metadata", "metadata.csv"]),
    (megaage, []),
    (folder, ["--labels", "labels.csv"]),
])
def test_missing_image_folder(tmp_path, script, extra):
    with pytest.raises(SystemExit, match=r"--img_dir: folder .*no_such_dir does not exist"):
        script.main(["--img_dir", str(tmp_path / "no_such_dir"), "--output_dir",
                     str(tmp_path / "out"), *extra])


def test_nothing_to_align_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="utkface: no image to align"):
        utkface.main(["--img_dir", str(tmp_path / "empty"), "--output_dir", str(tmp_path / "out")])
    labels = tmp_path / "labels.csv"
    labels.write_text("photo,age\ngone.jpg,30\n")
    with pytest.raises(SystemExit, match=f"no image to align \\({common.REASON_MISSING}: 1\\)"):
        folder.main(["--img_dir", str(tmp_path / "empty"), "--labels", str(labels),
                     "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_unreadable_images_are_reported(tmp_path, utk_names):
    images = tmp_path / "images"
    link_images(images, utk_names[:3])
    broken = "30_0_0_20170101000000000.jpg.chip.jpg"
    empty = "31_1_2_20170101000000001.jpg.chip.jpg"
    (images / broken).write_bytes(b"this is not a JPEG")
    (images / empty).write_bytes(b"")
    out = tmp_path / "out"
    utkface.main(["--img_dir", str(images), "--output_dir", str(out), *WORKERS])
    train, valid, report = outputs(out, "utkface")
    assert {Path(row["photo"]).name: row["reason"] for row in report} == {
        broken: common.REASON_UNREADABLE, empty: common.REASON_UNREADABLE
    }
    assert len(train) + len(valid) == 3


@pytest.mark.parametrize("option, value", [
    ("--valid_ratio", "1.5"), ("--valid_ratio", "x"), ("--workers", "0"),
    ("--detector", "mtcnn"), ("--landmarks", "7"), ("--test_ratio", "-0.1"), ("--folds", "1"),
])
def test_bad_options_are_refused(tmp_path, capsys, option, value):
    with pytest.raises(SystemExit):
        utkface.main(["--img_dir", str(tmp_path), "--output_dir", str(tmp_path / "out"),
                      option, value])
    assert option in capsys.readouterr().err


def test_help_explains_every_option(capsys):
    for script in (utkface, morph, megaage, folder):
        with pytest.raises(SystemExit):
            script.main(["-h"])
        text = capsys.readouterr().out
        for option in ("--img_dir", "--output_dir", "--valid_ratio", "--test_ratio", "--folds", "--seed",
                       "--detector", "--landmarks", "--workers"):
            assert option in text


# Undetected faces (--keep_undetected) ---------------------------------------

def test_keep_undetected_keeps_faceless_images_with_the_whole_image_as_box(
        tmp_path, utk_names, aligner):
    for name in UNDETECTED_NAMES:
        assert aligner.align_largest(geometry.read_rgb(UTKFACE / name)) is None, name
    detected = utk_names[:2]
    link_images(tmp_path / "images", list(UNDETECTED_NAMES) + detected)
    out = tmp_path / "out"
    utkface.main(["--img_dir", str(tmp_path / "images"), "--output_dir", str(out),
                  "--valid_ratio", "0.5", "--keep_undetected", *ONE_WORKER])

    header, train = read_csv(out / "utkface_train_align.csv")
    _, valid = read_csv(out / "utkface_valid_align.csv")
    _, report = read_csv(out / "utkface_report.csv")
    assert header == [*common.CSV_COLUMNS, *common.ATTRIBUTE_COLUMNS, common.FALLBACK_COLUMN]
    rows = {Path(row["photo"]).name: row for row in train + valid}
    assert sorted(rows) == sorted(list(UNDETECTED_NAMES) + detected)
    for name in UNDETECTED_NAMES:
        row = rows[name]
        assert row["fallback"] == "1"
        assert [float(row[key]) for key in ("deg", "box1", "box2", "box3", "box4")] == [
            0.0, 0.0, 0.0, 200.0, 200.0]
        assert int(row["age"]) == utkface.parse_name(name).age
    for name in detected:
        assert rows[name]["fallback"] == "0"
        assert float(rows[name]["box3"]) - float(rows[name]["box1"]) < 200.0
    assert {Path(row["photo"]).name: row["reason"] for row in report} == {
        name: common.REASON_FALLBACK for name in UNDETECTED_NAMES}


# The outputs: one consistent set ---------------------------------------------

@pytest.fixture
def sigterm_guard():
    """A SIGTERM that preprocessing does not handle fails the test instead of
    killing the test runner."""
    def unhandled(signum, frame):
        raise AssertionError("SIGTERM reached the test's handler: preprocessing did not handle it")

    previous = signal.signal(signal.SIGTERM, unhandled)
    yield
    signal.signal(signal.SIGTERM, previous)


def snapshot(folder_path):
    return {path.name: path.read_bytes() for path in sorted(folder_path.iterdir())}


def stopped_by_sigterm(monkeypatch, capsys, os_function, hook, argv):
    """What utkface.py printed when ``hook``, standing in for ``os_function``,
    sent a SIGTERM; it must exit with 128 + SIGTERM."""
    with monkeypatch.context() as patch, pytest.raises(SystemExit) as stopped:
        patch.setattr(os, os_function, hook)
        utkface.main(argv)
    assert stopped.value.code == 128 + signal.SIGTERM
    return capsys.readouterr().out


def test_sigterm_in_a_rerun_with_another_seed_never_mixes_the_set(
        tmp_path, utk_names, monkeypatch, capsys, sigterm_guard):
    """A rerun with another seed, stopped by a real SIGTERM while it stages its
    files, leaves the previous set; stopped between its renames, it finishes
    them all. A mixed pair is caught by the split record."""
    link_images(tmp_path / "images", utk_names[:8])
    out = tmp_path / "out"
    run = ["--img_dir", str(tmp_path / "images"), "--output_dir", str(out),
           "--valid_ratio", "0.5", *ONE_WORKER]
    utkface.main(run + ["--seed", "1"])
    first = snapshot(out)
    assert split_record.check(out, "utkface")["seed"] == 1
    real_fsync, real_replace = os.fsync, os.replace

    def fsync_then_sigterm(handle):
        real_fsync(handle)
        os.kill(os.getpid(), signal.SIGTERM)

    said = stopped_by_sigterm(monkeypatch, capsys, "fsync", fsync_then_sigterm,
                              run + ["--seed", "2"])
    assert "stopped by SIGTERM; nothing written" in said
    assert snapshot(out) == first, "the interrupted run changed or left files"

    renamed = []

    def replace_then_sigterm(source, target):
        real_replace(source, target)
        renamed.append(Path(target).name)
        if len(renamed) == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    said = stopped_by_sigterm(monkeypatch, capsys, "replace", replace_then_sigterm,
                              run + ["--seed", "2"])
    assert "stopped by SIGTERM after writing every output" in said
    assert renamed == ["utkface_train_align.csv", "utkface_valid_align.csv",
                       "utkface_report.csv", "utkface_split.json"]
    record = split_record.check(out, "utkface")
    assert record["seed"] == 2
    train, valid, report = outputs(out, "utkface")
    valid_photos = {row["photo"] for row in valid}
    assert not valid_photos & {row["photo"] for row in train}
    assert len(train) + len(valid) + len(report) == 8

    # The old valid CSV beside the new train CSV, as a hard kill between two
    # renames would leave it (or a copy by hand), is refused.
    assert first["utkface_valid_align.csv"] != (out / "utkface_valid_align.csv").read_bytes()
    (out / "utkface_valid_align.csv").write_bytes(first["utkface_valid_align.csv"])
    with pytest.raises(split_record.SplitMismatch, match="utkface_valid_align.csv is not the file"):
        split_record.check(out, "utkface")


def test_written_files_honour_the_umask(tmp_path, utk_names):
    link_images(tmp_path / "images", utk_names[:2])
    out = tmp_path / "out"
    previous = os.umask(0o027)
    try:
        utkface.main(["--img_dir", str(tmp_path / "images"), "--output_dir", str(out), *ONE_WORKER])
    finally:
        os.umask(previous)
    modes = {path.name: path.stat().st_mode & 0o777 for path in out.iterdir()}
    assert modes == {name: 0o640 for name in ("utkface_train_align.csv", "utkface_valid_align.csv",
                                              "utkface_report.csv", "utkface_split.json")}


# A script that kills itself with SIGKILL right after staging its first output file under a temporary name.
DIE_AFTER_FIRST_STAGED_FILE = """
import os, signal, sys
sys.path.insert(0, {root!r})
from preprocessing import outputs, utkface
stage = outputs.FileSet.add
def stage_then_die(self, name, data):
    stage(self, name, data)
    os.kill(os.getpid(), signal.SIGKILL)
outputs.FileSet.add = stage_then_die
utkface.main({argv!r})
"""


def test_a_killed_runs_temporary_file_is_removed_by_the_next_run(tmp_path, utk_names):
    link_images(tmp_path / "images", utk_names[:4])
    out = tmp_path / "out"
    argv = ["--img_dir", str(tmp_path / "images"), "--output_dir", str(out), *ONE_WORKER]
    killed = subprocess.run([sys.executable, "-c", DIE_AFTER_FIRST_STAGED_FILE.format(root=str(REPO), argv=argv)],
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    leftovers = [path.name for path in out.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].startswith(".utkface_train_align.csv."), leftovers
    utkface.main(argv)
    assert sorted(path.name for path in out.iterdir()) == sorted(
        ["utkface_train_align.csv", "utkface_valid_align.csv", "utkface_report.csv", "utkface_split.json"])


# Stopped by a signal ----------------------------------------------------------

STOP_IMAGES = 600
STOP_DEADLINE_S = 120
# Ctrl-C is sent this long after the pool's workers were started: inside the
# second or so in which they import OpenCV and dlib, before they could set up
# any signal handling of their own (without the fix, 5 of 5 runs printed their
# KeyboardInterrupt tracebacks).
WORKER_IMPORTS_S = 0.5


def read_stderr_until(process, pattern, deadline_s):
    """What ``process`` wrote to stderr until ``pattern`` appeared in it."""
    text, deadline = "", time.monotonic() + deadline_s
    while not re.search(pattern, text):
        assert process.poll() is None, f"ended before {pattern!r} appeared: {text}"
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"{pattern!r} did not appear: {text}"
        if select.select([process.stderr], [], [], remaining)[0]:
            text += os.read(process.stderr.fileno(), 4096).decode(errors="replace")
    return text


def live_processes_in_group(group):
    """Processes of the process group ``group`` that have not ended."""
    live = []
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        state, process_group = fields[0], int(fields[2])
        if process_group == group and state != "Z":
            live.append(int(entry.name))
    return live


@pytest.mark.parametrize("signum, whole_group, started, wait_s", [
    # kill PID, once faces are being aligned
    (signal.SIGTERM, False, rf"\b[1-9]\d*/{STOP_IMAGES}\b", 0),
    # Ctrl-C reaches the whole process group, here while the workers start up
    (signal.SIGINT, True, rf"\b0/{STOP_IMAGES}\b", WORKER_IMPORTS_S),
], ids=["SIGTERM-to-the-script", "Ctrl-C-to-its-process-group"])
def test_signal_ends_the_workers_cleanly_and_writes_nothing(tmp_path, utk_names, signum,
                                                            whole_group, started, wait_s):
    link_images(tmp_path / "images", utk_names[:STOP_IMAGES])
    out = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, str(REPO / "preprocessing" / "utkface.py"), "--img_dir",
         str(tmp_path / "images"), "--output_dir", str(out), *WORKERS],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )
    try:
        stderr = read_stderr_until(process, started, STOP_DEADLINE_S)
        time.sleep(wait_s)
        (os.killpg if whole_group else os.kill)(process.pid, signum)
        stdout, rest = process.communicate(timeout=STOP_DEADLINE_S)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    stdout, stderr = stdout.decode(), stderr + rest.decode()
    name = signal.Signals(signum).name
    assert process.returncode == 128 + signum, (stdout, stderr)
    for noise in ("Traceback", "BrokenPipe", "leaked", "KeyboardInterrupt"):
        assert noise not in stderr, stderr
    assert re.search(r"utkface: face found in \d+ of \d+ readable images", stdout), stdout
    assert f"utkface: stopped by {name}; nothing written" in stdout, stdout
    if not whole_group:
        assert re.search(rf"aligned [1-9]\d* of {STOP_IMAGES} images", stdout), stdout
    assert list(out.iterdir()) == []
    deadline = time.monotonic() + 10
    while live_processes_in_group(process.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert live_processes_in_group(process.pid) == []


# Labelled folders: label spellings and duplicates ---------------------------

def write_labels(path, header, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_folder_reads_gender_and_race_as_numbers_letters_or_names(tmp_path, utk_names):
    spellings = [("M", "W", 0, 0), ("f", "b", 1, 1), ("Male", "A", 0, 2), ("FEMALE", "i", 1, 3),
                 ("m", "O", 0, 4), ("F", "H", 1, 4), ("0", "white", 0, 0), ("1", "3", 1, 3)]
    names = utk_names[:len(spellings)]
    link_images(tmp_path / "photos", names)
    labels = write_labels(tmp_path / "labels.csv", ["photo", "age", "gender", "race"],
                          [(name, 30, gender, ethnicity)
                           for name, (gender, ethnicity, _, _) in zip(names, spellings)])
    out = tmp_path / "out"
    # --keep_undetected: every photo gets a row, whatever the detector finds.
    folder.main(["--img_dir", str(tmp_path / "photos"), "--labels", str(labels),
                 "--output_dir", str(out), "--keep_undetected", *ONE_WORKER])
    train, valid, _ = outputs(out, "folder")
    codes = {Path(row["photo"]).name: (int(row["gender"]), int(row["race"]))
             for row in train + valid}
    assert codes == {name: (gender, ethnicity)
                     for name, (_, _, gender, ethnicity) in zip(names, spellings)}

    write_labels(labels, ["photo", "age", "gender", "race"], [(names[0], 30, "X", "W")])
    with pytest.raises(SystemExit, match=r"line 2: gender 'X' is not one of 0, 1, M, F"):
        folder.main(["--img_dir", str(tmp_path / "photos"), "--labels", str(labels),
                     "--output_dir", str(out)])


def test_folder_keeps_a_photo_labelled_twice_once_with_a_warning(tmp_path, utk_names, capsys):
    names = utk_names[:6]
    link_images(tmp_path / "photos" / "sub", names)
    (tmp_path / "photos" / "alias.jpg").symlink_to(UTKFACE / names[1])
    rows = [(f"sub/{name}", 30 + index) for index, name in enumerate(names)]
    rows += [
        (f"./sub/{names[0]}", 70),        # line 8: another path, another age
        (f"sub/../sub/{names[2]}", 32),   # line 9: another path, the same age
        ("alias.jpg", 31),                # line 10: a link to line 3's file
        (f"sub/{names[3]}", 33),          # line 11: the same line again
    ]
    labels = write_labels(tmp_path / "labels.csv", ["photo", "age"], rows)
    out = tmp_path / "out"
    folder.main(["--img_dir", str(tmp_path / "photos"), "--labels", str(labels),
                 "--output_dir", str(out), "--valid_ratio", "0.5", "--keep_undetected",
                 *ONE_WORKER])
    warnings = capsys.readouterr().err
    assert re.search(r"labels.csv, line 8: .* is the file of line 2 .* with other labels "
                     r"\(age 70 against age 30 on line 2\); fix the wrong one", warnings)
    for line, first in ((9, 4), (10, 3), (11, 5)):
        assert re.search(rf"line {line}: .* is the file of line {first} .* with the same labels",
                         warnings)

    train, valid, report = outputs(out, "folder")
    photos = [os.path.realpath(out / row["photo"]) for row in train + valid]
    assert sorted(photos) == sorted(os.path.realpath(UTKFACE / name) for name in names)
    assert {Path(row["photo"]).name: row["age"] for row in train + valid}[names[0]] == "30"
    assert sorted(row["reason"] for row in report) == sorted(
        f"labelled again on line {line} of labels.csv; line {first}'s labels kept"
        for line, first in ((8, 2), (9, 4), (10, 3), (11, 5)))


# Output folder checked before any detection -------------------------------

@pytest.fixture
def no_detection(monkeypatch):
    def detection_started(*args, **kwargs):
        raise AssertionError("face detection started before the output folder was checked")

    monkeypatch.setattr(common, "align_into", detection_started)


def test_output_dir_that_is_a_file_or_under_one_is_refused_before_detection(
        tmp_path, utk_names, no_detection):
    link_images(tmp_path / "images", utk_names[:1])
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    for out, message in ((a_file, "is a file, not a folder"),
                         (a_file / "out", r"cannot be written to \(Not a directory")):
        with pytest.raises(SystemExit, match=rf"--output_dir .*{message}"):
            utkface.main(["--img_dir", str(tmp_path / "images"), "--output_dir", str(out)])
    assert a_file.read_text() == "mine"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")
def test_read_only_output_dir_is_refused_before_detection(tmp_path, utk_names, no_detection):
    link_images(tmp_path / "images", utk_names[:1])
    read_only = tmp_path / "read_only"
    read_only.mkdir(mode=0o555)
    with pytest.raises(SystemExit, match="--output_dir .*read_only cannot be written to .*denied"):
        utkface.main(["--img_dir", str(tmp_path / "images"), "--output_dir", str(read_only)])


def test_degraded_copies_keep_size_boxes_and_labels_and_are_reproducible(tmp_path):
    from conftest import utkface_files, write_csv
    from preprocessing import degrade

    rows = utkface_files()[:12]
    write_csv(tmp_path / "utk_valid_align.csv", rows)
    for out in ("a", "b"):
        degrade.main(["--data_dir", str(tmp_path), "--dataset", "utk", "--output_dir", str(tmp_path / out)])
    copy = pd.read_csv(tmp_path / "a" / "a_valid_align.csv")
    source = pd.read_csv(tmp_path / "utk_valid_align.csv")
    assert copy.drop(columns="photo").equals(source.drop(columns="photo"))
    assert (tmp_path / "a" / "a_train_align.csv").is_file()
    grey = 0
    for name, (original, *_rest) in zip(copy["photo"], rows):
        made = Image.open(tmp_path / "a" / name)
        assert made.size == Image.open(original).size
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), "seeded per row"
        pixels = np.asarray(made.convert("RGB")).astype(int)
        grey += int(np.abs(pixels[..., 0] - pixels[..., 1]).max() <= 3)
    assert 0 < grey < len(rows), "some copies, not all, turned grey"


def test_scanned_copies_are_sepia_and_faded_and_keep_labels(tmp_path):
    from conftest import utkface_files, write_csv
    from preprocessing import degrade

    rows = utkface_files()[:6]
    write_csv(tmp_path / "utk_valid_align.csv", rows)
    for out in ("a", "b"):
        degrade.main(["--data_dir", str(tmp_path), "--dataset", "utk", "--output_dir", str(tmp_path / out),
                      "--style", "scan"])
    copy = pd.read_csv(tmp_path / "a" / "a_valid_align.csv")
    assert copy.drop(columns="photo").equals(pd.read_csv(tmp_path / "utk_valid_align.csv").drop(columns="photo"))
    for name, (original, *_rest) in zip(copy["photo"], rows):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), "seeded per row"
        made = np.asarray(Image.open(tmp_path / "a" / name).convert("RGB")).astype(float)
        source = np.asarray(Image.open(original).convert("RGB")).astype(float)
        assert made.shape == source.shape
        red, green, blue = made.mean((0, 1))
        assert red > green > blue, "sepia: warm, every photo"
        assert made.mean(2).std() < 0.8 * source.mean(2).std(), "faded contrast"


# Test split and folds -------------------------------------------------------

SPLIT_FACES = 60
FOLDS = 3
PERSONS = 4
PHOTOS_EACH = 3


def photos(rows):
    return {Path(row["photo"]).name for row in rows}


def sides(out_dir, dataset):
    """{side: photo names} of the train, valid and test CSVs in ``out_dir``."""
    return {side: photos(read_csv(out_dir / split_record.csv_name(dataset, side))[1]) for side in splits.SIDES}


def assert_disjoint(parts):
    for index, part in enumerate(parts):
        for other in parts[index + 1:]:
            assert not part & other, f"in two parts: {sorted(part & other)[:3]}"


def test_test_ratio_writes_a_third_csv_with_no_photo_in_two(tmp_path, utk_names):
    link_images(tmp_path / "images", utk_names[::DETECTION_STRIDE][:SPLIT_FACES])
    out = tmp_path / "out"
    utkface.main(["--img_dir", str(tmp_path / "images"), "--output_dir", str(out),
                  "--valid_ratio", "0.2", "--test_ratio", "0.2", *WORKERS])
    parts = sides(out, "utkface")
    _, report = read_csv(out / "utkface_report.csv")
    assert_disjoint(list(parts.values()))
    assert sum(len(part) for part in parts.values()) + len(report) == SPLIT_FACES
    for side in ("valid", "test"):  # 20% each, drawn before detection
        assert round(0.2 * SPLIT_FACES) - len(report) <= len(parts[side]) <= round(0.2 * SPLIT_FACES)
    record = split_record.check(out, "utkface")
    assert record["test_ratio"] == 0.2 and "utkface_test_align.csv" in record["sha256"]


def test_without_test_ratio_the_split_is_the_one_earlier_versions_drew():
    samples = [common.Sample(Path(f"{index}.jpg"), 30) for index in range(50)]
    [layout] = splits.single(samples, 0.3, 0.0, seed=7)
    order = list(range(50))
    random.Random(7).shuffle(order)
    assert layout.sides == {"valid": sorted(order[:15]), "train": sorted(order[15:])}


def test_folds_detect_each_image_once_and_their_test_parts_cover_every_kept_face(tmp_path, utk_names, monkeypatch):
    sample = [name for name in utk_names[::DETECTION_STRIDE] if name not in UNDETECTED_NAMES]
    names = [*UNDETECTED_NAMES, *sample[:SPLIT_FACES - len(UNDETECTED_NAMES)]]
    link_images(tmp_path / "images", names)
    detected, align = [], align_pool._align_path
    monkeypatch.setattr(align_pool, "_align_path", lambda aligner, path: detected.append(path.name) or align(aligner, path))
    out = tmp_path / "out"
    utkface.main(["--img_dir", str(tmp_path / "images"), "--output_dir", str(out),
                  "--valid_ratio", "0.2", "--folds", str(FOLDS), *ONE_WORKER])
    assert sorted(detected) == sorted(names), "each image detected once, not once per fold"
    folds = [sides(out / f"fold{fold}", "utkface") for fold in range(FOLDS)]
    kept = set(names) - set(UNDETECTED_NAMES)
    assert_disjoint([fold["test"] for fold in folds])
    assert set().union(*(fold["test"] for fold in folds)) == kept
    for number, fold in enumerate(folds):
        assert_disjoint(list(fold.values()))
        assert set().union(*fold.values()) == kept
        assert round(0.2 * SPLIT_FACES) - len(UNDETECTED_NAMES) <= len(fold["valid"]) <= round(0.2 * SPLIT_FACES)
        record = split_record.check(out / f"fold{number}", "utkface")
        assert (record["folds"], record["fold"]) == (FOLDS, number)
    _, report = read_csv(out / "fold0" / "utkface_report.csv")
    assert photos(report) == set(UNDETECTED_NAMES)
    assert not list(out.glob("utkface_*")), "folds only: nothing written beside them"


def write_subject_labels(tmp_path, utk_names, blank_subject=False):
    """A labels CSV of PERSONS people with PHOTOS_EACH photos each, in a subject column."""
    names = utk_names[:PERSONS * PHOTOS_EACH]
    link_images(tmp_path / "photos", names)
    subjects = {name: f"person{index // PHOTOS_EACH}" for index, name in enumerate(names)}
    if blank_subject:
        subjects[names[-1]] = ""
    labels = tmp_path / "labels.csv"
    write_labels(labels, ["photo", "age", "subject"],
                 [[name, utkface.parse_name(name).age, subjects[name]] for name in names])
    return labels, subjects


def test_subject_split_and_leave_one_person_out_keep_each_person_in_one_part(tmp_path, utk_names):
    labels, subjects = write_subject_labels(tmp_path, utk_names)
    common_args = ["--img_dir", str(tmp_path / "photos"), "--labels", str(labels), "--subject_split", *ONE_WORKER]
    folder.main([*common_args, "--output_dir", str(tmp_path / "split"), "--valid_ratio", "0.25",
                 "--test_ratio", "0.25"])
    people = [{subjects[name] for name in part} for part in sides(tmp_path / "split", "folder").values()]
    assert all(people) and sum(len(part) for part in people) == PERSONS
    assert_disjoint(people)

    folder.main([*common_args, "--output_dir", str(tmp_path / "lopo"), "--valid_ratio", "0.25",
                 "--folds", str(PERSONS)])
    tests = [{subjects[name] for name in sides(tmp_path / "lopo" / f"fold{fold}", "folder")["test"]}
             for fold in range(PERSONS)]
    assert sorted(person for test in tests for person in test) == sorted(set(subjects.values())), \
        "one person per fold's test part, every person once"


@pytest.mark.parametrize("extra, message", [
    (["--folds", "3", "--test_ratio", "0.2"], "drop --test_ratio"),
    (["--valid_ratio", "0.6", "--test_ratio", "0.5"], "add up to more than 1"),
    (["--folds", "7"], "only 6 images; pass at most --folds 6"),
    (["--folds", "2", "--valid_ratio", "0.5"], "leaves no training images"),
])
def test_impossible_splits_are_refused_before_detection(tmp_path, utk_names, no_detection, extra, message):
    link_images(tmp_path / "images", utk_names[:6])
    with pytest.raises(SystemExit, match=message):
        utkface.main(["--img_dir", str(tmp_path / "images"), "--output_dir", str(tmp_path / "out"), *extra])


def test_subject_split_without_a_subject_names_the_image(tmp_path, utk_names, no_detection):
    labels, _ = write_subject_labels(tmp_path, utk_names, blank_subject=True)
    unnamed = utk_names[PERSONS * PHOTOS_EACH - 1]
    with pytest.raises(SystemExit, match=rf"--subject_split: 1 images have no subject .*{unnamed}"):
        folder.main(["--img_dir", str(tmp_path / "photos"), "--labels", str(labels), "--output_dir",
                     str(tmp_path / "out"), "--subject_split", "--folds", "2"])


def test_megaage_official_test_keeps_the_published_test_part(tmp_path, utk_names):
    make_megaage(tmp_path / "megaage", utk_names)
    out = tmp_path / "out"
    megaage.main(["--img_dir", str(tmp_path / "megaage"), "--output_dir", str(out), "--official_test",
                  "--valid_ratio", "0.5", *ONE_WORKER])
    rows = {side: read_csv(out / split_record.csv_name("megaage_asian", side))[1] for side in splits.SIDES}
    assert {Path(row["photo"]).parent.name for row in rows["test"]} == {"test"}
    assert {Path(row["photo"]).parent.name for row in rows["train"] + rows["valid"]} == {"train"}
    assert rows["valid"] and rows["train"]


def test_a_test_csv_left_by_an_earlier_run_is_refused(tmp_path, utk_names):
    link_images(tmp_path / "images", utk_names[:6])
    out = tmp_path / "out"
    utkface.main(["--img_dir", str(tmp_path / "images"), "--output_dir", str(out), "--test_ratio", "0.3",
                  *ONE_WORKER])
    utkface.main(["--img_dir", str(tmp_path / "images"), "--output_dir", str(out), *ONE_WORKER])
    with pytest.raises(split_record.SplitMismatch, match="utkface_test_align.csv is not part of the split"):
        split_record.check(out, "utkface")
