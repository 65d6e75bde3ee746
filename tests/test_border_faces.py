"""A tilted face near a corner of a large photo is aged as the same face in its middle, through every path.

Levelling a tilted face turns the photo about its centre, which carries a face near a corner partly out of the
turned frame. Its box must not be squeezed into that frame: the demo (photos and webcam), the Python API and
preprocessing/folder.py + val.py all give the face near each corner the age of the same face in the middle.
"""
import dataclasses

import cv2
import numpy as np
import pandas as pd
import pytest

import cli
import demo
import estimator
import sources
import val
from conftest import UTKFACE
from estimator import DEFAULT_WEIGHTS, AgeEstimator
from geometry import expand_box, inside_frame
from preprocessing import folder
from records import Records
from test_demo import StandInCamera

PHOTO_W, PHOTO_H = 4000, 3000
# a held-out face of the shipped model (weights/utkface_valid_align.csv) whose eyes are level in the chip, so the
# turn below is the face's whole tilt; dlib's HOG detector finds it in every place and tilt used here
FACE = "25_0_0_20170104004153743.jpg.chip.jpg"
FACE_SIDE = 480
TILTS_DEG = (10, 15)
# the face's centre lies this far from both edges at a corner: the turned chip stays inside the photo
CORNER_INSET = 330
PLACES = {"middle": (PHOTO_W / 2, PHOTO_H / 2), "top_left": (CORNER_INSET, CORNER_INSET),
          "top_right": (PHOTO_W - CORNER_INSET, CORNER_INSET),
          "bottom_right": (PHOTO_W - CORNER_INSET, PHOTO_H - CORNER_INSET),
          "bottom_left": (CORNER_INSET, PHOTO_H - CORNER_INSET)}
CORNERS = [place for place in PLACES if place != "middle"]
GRAY = 128
# the face at each corner is aged within this of the same face in the middle (years); detection puts the box a few
# pixels differently at each place, which alone moves this face's age by up to 1.3 with the shipped model (0.85 with
# the one before it). Squeezed to the frame, as before the fix, a corner face was aged 31 years older
SAME_AGE_YEARS = 2.0
# the data set's photos are 2000 x 1500, each decoded twice (preprocessing, then the crop cache): a quarter of the time
DATA_SET_SHRINK = 2
# frames of 1000 x 750 where the photo's size does not matter
SMALL_FRAME_SHRINK = 4
# the face is pasted on JPEG's 16-pixel grid (a colour block with 4:2:0 chroma), so that every copy is encoded alike
JPEG_GRID = 16
JPEG_QUALITY = [cv2.IMWRITE_JPEG_QUALITY, 95]


def tilted_face(tilt, face_side):
    """The face scaled up and turned counter-clockwise by ``tilt`` degrees, with the mask of where it lies."""
    from geometry import read_rgb

    chip = cv2.resize(read_rgb(UTKFACE / FACE), (face_side, face_side), interpolation=cv2.INTER_CUBIC)
    radians = np.radians(tilt)
    side = int(np.ceil(face_side * (abs(np.cos(radians)) + abs(np.sin(radians)))))
    turn = cv2.getRotationMatrix2D(((face_side - 1) / 2, (face_side - 1) / 2), tilt, 1.0)
    turn[:, 2] += (side - face_side) / 2
    patch = cv2.warpAffine(chip, turn, (side, side), flags=cv2.INTER_LINEAR)
    mask = cv2.warpAffine(np.ones((face_side, face_side), np.float32), turn, (side, side), flags=cv2.INTER_LINEAR)
    return patch, mask[..., None]


def write_jpeg(path, rgb):
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), JPEG_QUALITY)


def photo(tilt, places, shrink=1):
    """A grey 4000 x 3000 photo with the tilted face centred at each of ``places``; all of it ``shrink`` times
    smaller when given (the face is found at the same size: detection shrinks both photos to
    preprocessing.align.DETECT_MAX_SIDE)."""
    patch, mask = tilted_face(tilt, FACE_SIDE // shrink)
    canvas = np.full((PHOTO_H // shrink, PHOTO_W // shrink, 3), GRAY, np.uint8)
    side = patch.shape[0]
    for place in places:
        left, top = (int(v / shrink - side / 2) // JPEG_GRID * JPEG_GRID for v in PLACES[place])
        region = canvas[top:top + side, left:left + side]
        region[:] = np.rint(patch * mask + region * (1 - mask)).astype(np.uint8)
    return canvas


def place_of(box):
    """The place whose face centre is nearest the centre of a face's box."""
    x, y = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return min(PLACES, key=lambda place: np.hypot(PLACES[place][0] - x, PLACES[place][1] - y))


def assert_corners_aged_as_the_middle(ages, label):
    """``ages``: place → age of the face there, for one tilt."""
    assert sorted(ages) == sorted(PLACES), f"{label}: faces found at {sorted(ages)}"
    for corner in CORNERS:
        assert abs(ages[corner] - ages["middle"]) < SAME_AGE_YEARS, (label, corner, ages)


@pytest.fixture(scope="module")
def photos():
    """tilt → the photo with the face in the middle and near each corner."""
    return {tilt: photo(tilt, PLACES) for tilt in TILTS_DEG}


@pytest.fixture(scope="module")
def estimator():
    return AgeEstimator.from_checkpoint(device="cpu")


def test_the_api_ages_each_corner_face_as_the_middle_one_although_its_box_leaves_the_turned_frame(photos, estimator):
    for tilt, rgb in photos.items():
        faces = estimator.detect(rgb)
        leaving = [face for face in faces
                   if not inside_frame(expand_box(face.box, estimator.expand), PHOTO_W, PHOTO_H)]
        assert len(leaving) >= len(CORNERS), "the test puts faces where their boxes leave the turned frame"
        results = estimator.predict(rgb)
        assert_corners_aged_as_the_middle({place_of(face["box"]): face["age"] for face in results}, f"{tilt} deg")


def demo_ages(table):
    """source or frame → {place: age} from demo.py's predictions.csv."""
    return {key: {place_of(row[["x1", "y1", "x2", "y2"]].to_numpy(float)): row["age"] for _, row in rows.iterrows()}
            for key, rows in table.groupby(["source", "frame"])}


def test_demo_photos_age_each_corner_face_as_the_middle_one(photos, tmp_path):
    folder_in = tmp_path / "photos"
    folder_in.mkdir()
    for tilt, rgb in photos.items():
        write_jpeg(folder_in / f"tilt{tilt}.jpg", rgb)
    demo.main(["--img_dir", str(folder_in), "--output_dir", str(tmp_path / "out"), "--device", "cpu"])
    ages = demo_ages(pd.read_csv(tmp_path / "out" / "predictions.csv"))
    assert len(ages) == len(TILTS_DEG)
    for (source, _), by_place in ages.items():
        assert_corners_aged_as_the_middle(by_place, source)


def test_the_webcam_path_ages_each_corner_face_as_the_middle_one(photos, tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "display_available", lambda: False)
    camera = StandInCamera(list(photos.values()))
    monkeypatch.setattr(sources, "open_camera", lambda index: camera)
    summary = demo.main(["--camera", "0", "--output_dir", str(tmp_path), "--device", "cpu"])
    assert summary["frames"] == len(TILTS_DEG)
    ages = demo_ages(pd.read_csv(tmp_path / "predictions.csv"))
    for (_, frame), by_place in ages.items():
        assert_corners_aged_as_the_middle(by_place, f"frame {frame}")


def test_a_face_that_cannot_be_cropped_is_reported_and_the_stream_goes_on(tmp_path, monkeypatch, capsys):
    """A box under a pixel wide (no detector gives one; it stands in for any face whose crop fails) in the first
    frame: the frame is reported on stderr and in predictions.csv, and the next frame is aged as usual."""
    monkeypatch.setattr(demo, "display_available", lambda: False)
    camera = StandInCamera([photo(tilt, ["middle"], SMALL_FRAME_SHRINK) for tilt in TILTS_DEG])
    monkeypatch.setattr(sources, "open_camera", lambda index: camera)
    detect = AgeEstimator.detect
    calls = []

    def detect_with_a_broken_face_first(self, rgb):
        faces = detect(self, rgb)
        calls.append(rgb)
        if len(calls) == 1:
            x1, y1, _, y2 = faces[0].box
            faces.append(dataclasses.replace(faces[0], box=(x1, y1, x1, y2)))
        return faces

    monkeypatch.setattr(AgeEstimator, "detect", detect_with_a_broken_face_first)
    summary = demo.main(["--camera", "0", "--output_dir", str(tmp_path), "--device", "cpu"])
    assert summary["frames"] == len(TILTS_DEG)
    table = pd.read_csv(tmp_path / "predictions.csv")
    first, second = table[table["frame"] == 0], table[table["frame"] == 1]
    assert len(first) == 1 and first["note"].iloc[0].startswith(cli.UNCROPPED_NOTE)
    assert len(second) == 1 and second["age"].notna().all()
    assert "frame 0: box" in capsys.readouterr().err


def test_folder_preprocessing_and_val_age_each_corner_face_as_the_middle_one(tmp_path):
    """One face a photo, as a data set holds them: the CSV keeps the boxes that leave the turned frame (records.py
    accepts them) and val.py, cropping through the crop cache as training does, ages the corners as the middle."""
    width, height = PHOTO_W // DATA_SET_SHRINK, PHOTO_H // DATA_SET_SHRINK
    images = tmp_path / "photos"
    images.mkdir()
    labels = ["photo,age"]
    for tilt in TILTS_DEG:
        for place in PLACES:
            name = f"{tilt}_{place}.jpg"
            write_jpeg(images / name, photo(tilt, [place], DATA_SET_SHRINK))
            labels.append(f"{name},25")
    (tmp_path / "labels.csv").write_text("\n".join(labels) + "\n")
    data = tmp_path / "data"
    folder.main(["--img_dir", str(images), "--labels", str(tmp_path / "labels.csv"), "--output_dir", str(data),
                 "--valid_ratio", "1", "--workers", "1"])
    records = Records(data / "folder_valid_align.csv", data)
    assert len(records) == len(TILTS_DEG) * len(PLACES), "every face found"
    assert sum(not inside_frame(box, width, height) for box in records.boxes) >= len(CORNERS)
    val.main(["--data_dir", str(data), "--dataset", "folder", "--model", str(DEFAULT_WEIGHTS),
              "--output_dir", str(tmp_path / "report"), "--device", "cpu"])
    errors = pd.read_csv(tmp_path / "report" / "errors.csv")
    for tilt in TILTS_DEG:
        ages = {place: errors.loc[errors["photo"].str.endswith(f"{tilt}_{place}.jpg"), "pred"].item()
                for place in PLACES}
        assert_corners_aged_as_the_middle(ages, f"{tilt} deg")
