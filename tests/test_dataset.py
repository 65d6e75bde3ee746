"""The aligned-CSV reader: every bad input stops with the file and row named, before training."""
import shutil

import numpy as np
import pytest

from conftest import utkface_files, write_csv
from dataset import CACHE_CHUNK_SIZE, DataError, FaceDataset, Records, build_crop_cache

HEADER = "photo,age,deg,box1,box2,box3,box4"


@pytest.fixture
def face():
    return utkface_files()[0]


def write(tmp_path, text):
    path = tmp_path / "x_train_align.csv"
    path.write_text(text)
    return path


def test_columns_in_any_order_relative_and_absolute_paths_and_letter_codes(tmp_path, face):
    file, age, _, _ = face
    shutil.copy(file, tmp_path / "a.jpg")
    path = write(tmp_path, "box4,box3,box2,box1,deg,age,photo,gender,race\n"
                           f"200,200,0,0,0,{age},a.jpg,F,B\n200,200,0,0,0,130,{file},M,h\n")
    records = Records(path, tmp_path)
    assert records.files[0] == str(tmp_path / "a.jpg")
    assert records.age.tolist() == [age, 100]
    assert records.ages_out_of_range == 1
    assert records.gender.tolist() == [1, 0]
    assert records.race.tolist() == [1, 4]


@pytest.mark.parametrize("row, message", [
    ("missing.jpg,30,0,0,0,200,200", "does not exist"),
    ("{file},thirty,0,0,0,200,200", "age 'thirty' is not a number"),
    ("{file},30,0,0,0,250,200", "is not inside the 200x200 image"),
    ("{file},30,0,50,0,40,200", "is not inside"),
    ("{file},30,0,0,0,200,200,X", "gender 'X'"),
])
def test_bad_rows_name_file_and_line(tmp_path, face, row, message):
    extra = ",gender" if row.count(",") == 7 else ""
    good = f"{face[0]},30,0,0,0,200,200" + (",0" if extra else "")
    path = write(tmp_path, f"{HEADER}{extra}\n{good}\n{row.format(file=face[0])}\n")
    with pytest.raises(DataError) as error:
        Records(path, tmp_path)
    text = str(error.value)
    assert str(path) in text and "line 3" in text and message in text


def test_missing_column_and_missing_csv(tmp_path, face):
    path = write(tmp_path, f"photo,age,box1,box2,box3,box4\n{face[0]},30,0,0,200,200\n")
    with pytest.raises(DataError, match="lacks the column.*deg"):
        Records(path, tmp_path)
    with pytest.raises(DataError, match="preprocessing"):
        Records(tmp_path / "none_train_align.csv", tmp_path)


def test_unreadable_image_is_caught_before_training(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg at all")
    path = write(tmp_path, f"{HEADER}\nbroken.jpg,30,0,0,0,10,10\n")
    with pytest.raises(DataError, match="line 2.*broken.jpg cannot be read"):
        Records(path, tmp_path)


def test_multitask_needs_gender_and_race(tmp_path, face):
    path = write(tmp_path, f"{HEADER}\n{face[0]},30,0,0,0,200,200\n")
    with pytest.raises(DataError, match="lacks gender, race"):
        Records(path, tmp_path, need_attributes=True)


def test_crop_cache_matches_direct_decoding_and_tracks_changes(tmp_path):
    rows = utkface_files()[:6]
    path = tmp_path / "c_train_align.csv"
    write_csv(path, rows)
    records = Records(path, tmp_path)
    crops = build_crop_cache(records, 48, 0.2, tmp_path / "cache", 0, "c_train")
    direct = FaceDataset(records, 48, 0.2)
    cached = FaceDataset(records, 48, 0.2, crops=crops)
    for index in range(len(records)):
        assert np.array_equal(direct[index]["image"].numpy(), cached[index]["image"].numpy())
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1
    build_crop_cache(records, 48, 0.2, tmp_path / "cache", 0, "c_train")
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1, "an unchanged CSV reuses its cache"
    write_csv(path, rows[:5])
    build_crop_cache(Records(path, tmp_path), 48, 0.2, tmp_path / "cache", 0, "c_train")
    build_crop_cache(records, 56, 0.2, tmp_path / "cache", 0, "c_train")
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 3, "a changed CSV or size never reuses a stale cache"


def test_threaded_crop_cache_puts_every_crop_in_its_row(tmp_path):
    """Enough rows that both threads take several chunks, finishing out of order."""
    path = tmp_path / "t_train_align.csv"
    write_csv(path, utkface_files()[:5 * CACHE_CHUNK_SIZE])
    records = Records(path, tmp_path)
    threaded = build_crop_cache(records, 32, 0.2, tmp_path / "threaded", 2, "t_train")
    in_order = build_crop_cache(records, 32, 0.2, tmp_path / "in_order", 0, "t_train")
    assert np.array_equal(threaded, in_order)


def test_augmentation_is_seeded_per_epoch_and_sample(tmp_path):
    rows = utkface_files()[:2]
    path = tmp_path / "a_train_align.csv"
    write_csv(path, rows)
    dataset = FaceDataset(Records(path, tmp_path), 64, 0.0, augment=True, seed=3)
    first = dataset[0]["image"]
    assert np.array_equal(first.numpy(), dataset[0]["image"].numpy()), "same epoch and sample, same augmentation"
    later_epochs = [dataset[k * len(dataset)]["image"].numpy() for k in range(1, 5)]
    assert any(not np.array_equal(first.numpy(), other) for other in later_epochs)


def test_fallback_column_is_optional_and_checked(tmp_path, face):
    """1 marks a face whose box is the whole image (no face detected); blank, 0 or no column: a detected face."""
    row = f"{face[0]},30,0,0,0,200,200"
    assert Records(write(tmp_path, f"{HEADER}\n{row}\n"), tmp_path).fallback.tolist() == [False]
    path = write(tmp_path, f"{HEADER},fallback\n{row},1\n{row},0\n{row},\n{row},True\n")
    assert Records(path, tmp_path).fallback.tolist() == [True, False, False, True]
    path = write(tmp_path, f"{HEADER},fallback\n{row},0\n{row},2\n")
    with pytest.raises(DataError) as error:
        Records(path, tmp_path)
    assert str(path) in str(error.value) and "line 3" in str(error.value) and "fallback 2 is not 0 or 1" in str(error.value)
