"""The aligned-CSV reader: every bad input stops with the file and row named, before training."""
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from augment import SeededPipeline
from conftest import ROOT, utkface_files, write_csv
import crop_cache
from crop_cache import CACHE_CHUNK_SIZE, build_crop_cache
from dataset import FaceDataset, sample_key
from defaults import get_cfg_defaults
from geometry import EXIF_ORIENTATION
from records import DataError, Records

HEADER = "photo,age,deg,box1,box2,box3,box4"
# how a phone stores the pixels of an upright photo for each EXIF orientation that turns them (PIL's names)
STORED_TURN = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}
JPEG_QUALITY = 95
# mean absolute difference (of 255) between crops of two JPEG encodings of the same pixels
JPEG_TOLERANCE = 3.0


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
    assert records.ethnicity.tolist() == [1, 4]


@pytest.mark.parametrize("row, message", [
    ("missing.jpg,30,0,0,0,200,200", "does not exist"),
    ("{file},thirty,0,0,0,200,200", "age 'thirty' is not a number"),
    ("{file},30,0,50,0,40,200", "has its corners out of order for the 200x200 image"),
    ("{file},30,0,-200,-200,400,400", "is over 2 times the diagonal of the 200x200 image"),
    ("{file},30,0,300,0,500,200", "lies off the 200x200 image"),
    ("{file},30,45,-60,-60,20,20", "lies off"),  # a corner of the frame turned by 45 degrees, where no photo is
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


def test_a_box_past_the_frames_edge_is_accepted_and_cropped_with_black_where_the_photo_ends(tmp_path, face):
    """A face cut by the photo's edge: its box hangs off the frame, and the crop shows the face unsqueezed."""
    path = write(tmp_path, f"{HEADER}\n{face[0]},30,0,100,0,300,200\n")
    records = Records(path, tmp_path)
    crop = build_crop_cache(records, 200, 0.0, tmp_path / "cache", 0, "x_train")[0]
    photo = np.asarray(Image.open(face[0]).convert("RGB"))
    assert np.array_equal(crop[:, :100], photo[:, 100:]) and not crop[:, 100:].any()


def test_only_a_cache_holding_padded_crops_gets_a_new_key(tmp_path, face, monkeypatch):
    """Boxes inside their frames crop as they always did, so their caches keep their keys; a box whose crop reaches
    past the frame was squeezed into it once, so its cache gets a key no earlier cache had."""
    import crop_cache

    records = Records(write(tmp_path, f"{HEADER}\n{face[0]},30,5,20,20,180,180\n"), tmp_path)
    padded = crop_cache.PADDED_CROPS
    keys = {}
    for mark in ("", padded):  # an empty mark adds nothing to the digest: the key as it was before the mark
        monkeypatch.setattr(crop_cache, "PADDED_CROPS", mark)
        keys[mark] = [crop_cache.cache_key(records, 32, expand) for expand in (0.0, 0.25, 0.5)]
    assert keys[""][0] == keys[padded][0], "expand 0: the box is in its frame, the key is unchanged"
    assert keys[""][1] == keys[padded][1], "expand 0.25: 180 + 20 = 200, still in the frame"
    assert keys[""][2] != keys[padded][2], "expand 0.5: the crop reaches past the frame"


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


def test_a_cache_the_disk_cannot_hold_is_refused_with_its_size_and_folder_before_any_file(tmp_path, monkeypatch):
    """A full disk under the memory-mapped cache would kill the build with SIGBUS; here the disk has one byte too
    few for 10 crops of 32 px (30,720 bytes and the .npy header's allowance), then just enough."""
    path = tmp_path / "d_train_align.csv"
    write_csv(path, utkface_files()[:10])
    records, cache = Records(path, tmp_path), tmp_path / "cache"
    needed = 10 * 32 * 32 * 3 + crop_cache.NPY_HEADER_ALLOWANCE
    real_disk_usage = shutil.disk_usage
    free = needed - 1

    def disk_usage(folder):
        return real_disk_usage(folder)._replace(free=free)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    message = f"the d_train crop cache needs 34.8 kB (10 crops of 32x32 px) in {cache}, which has 34.8 kB free"
    with pytest.raises(SystemExit, match=re.escape(message) + ".*DATA.CACHE False"):
        build_crop_cache(records, 32, 0.0, cache, 0, "d_train")
    assert list(cache.iterdir()) == [], "refused before any file is written"
    free = needed
    assert build_crop_cache(records, 32, 0.0, cache, 0, "d_train").shape == (10, 32, 32, 3)


def test_per_sample_augmentation_is_seeded_per_epoch_and_sample(tmp_path):
    rows = utkface_files()[:2]
    path = tmp_path / "a_train_align.csv"
    write_csv(path, rows)
    pipeline = SeededPipeline(get_cfg_defaults().AUG, 64)
    dataset = FaceDataset(Records(path, tmp_path), 64, 0.0, augment=pipeline, seed=3)
    first = dataset[0]["image"]
    assert np.array_equal(first.numpy(), dataset[0]["image"].numpy()), "same epoch and sample, same augmentation"
    later_epochs = [dataset[sample_key(epoch, 0, 0, len(dataset))]["image"].numpy() for epoch in range(1, 5)]
    assert any(not np.array_equal(first.numpy(), other) for other in later_epochs)


def sideways_copy(upright, orientation, path):
    """Store ``upright``'s pixels turned as a phone stores them, with the EXIF tag that turns them back."""
    stored = upright.transpose(STORED_TURN[orientation])
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    stored.save(path, "JPEG", quality=JPEG_QUALITY, exif=exif.tobytes())


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_photo_stored_sideways_with_an_exif_tag_is_checked_and_cropped_upright(tmp_path, face, orientation):
    with Image.open(face[0]) as image:
        upright = image.convert("RGB").crop((0, 20, 200, 170))  # 200 x 150: turning it swaps width and height
    upright.save(tmp_path / "upright.jpg", "JPEG", quality=JPEG_QUALITY)
    sideways_copy(upright, orientation, tmp_path / "sideways.jpg")
    box = "12,8,188,140"  # x2 = 188 lies outside the 150-pixel-wide stored image
    path = write(tmp_path, f"{HEADER}\nupright.jpg,30,5,{box}\nsideways.jpg,30,5,{box}\n")
    records = Records(path, tmp_path)
    cached = build_crop_cache(records, 64, 0.0, tmp_path / "cache", 0, "x_train")  # the training path
    decoded = FaceDataset(records, 64, 0.0)  # val.py's path
    upright_crop, sideways_crop = (decoded[i]["image"].numpy().astype(int) for i in (0, 1))
    assert np.array_equal(cached[1].transpose(2, 0, 1), sideways_crop)
    assert np.abs(upright_crop - sideways_crop).mean() < JPEG_TOLERANCE
    assert np.abs(np.rot90(upright_crop, axes=(1, 2)) - sideways_crop).mean() > 5 * JPEG_TOLERANCE, "the test sees a turn"


def test_crop_cache_is_rebuilt_when_an_image_is_edited_in_place(tmp_path):
    rows = utkface_files()[:3]
    for index, row in enumerate(rows):
        shutil.copy(row[0], tmp_path / f"{index}.jpg")
    path = tmp_path / "e_train_align.csv"
    write_csv(path, [(tmp_path / f"{index}.jpg",) + row[1:] for index, row in enumerate(rows)])
    first = np.array(build_crop_cache(Records(path, tmp_path), 32, 0.0, tmp_path / "cache", 0, "e_train"))
    replacement = utkface_files()[100][0]
    assert replacement.stat().st_size != (tmp_path / "0.jpg").stat().st_size
    shutil.copy(replacement, tmp_path / "0.jpg")  # the CSV is unchanged
    edited = build_crop_cache(Records(path, tmp_path), 32, 0.0, tmp_path / "cache", 0, "e_train")
    assert not np.array_equal(first[0], edited[0])
    assert np.array_equal(edited[0], FaceDataset(Records(path, tmp_path), 32, 0.0)[0]["image"].numpy().transpose(1, 2, 0))
    assert np.array_equal(first[1:], edited[1:])
    stat = (tmp_path / "1.jpg").stat()
    os.utime(tmp_path / "1.jpg", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # same size, newer: a new key too
    build_crop_cache(Records(path, tmp_path), 32, 0.0, tmp_path / "cache", 0, "e_train")
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 3


@pytest.mark.parametrize("value", ["inf", "-inf"])
def test_infinite_angle_is_refused_with_file_and_line(tmp_path, face, value):
    path = write(tmp_path, f"{HEADER}\n{face[0]},30,0,0,0,200,200\n{face[0]},30,{value},0,0,200,200\n")
    with pytest.raises(DataError, match=r"line 3: deg -?inf is not a finite angle"):
        Records(path, tmp_path)


def test_finite_angles_are_folded_into_a_half_turn_either_way(tmp_path, face):
    degs = [10, 180, -180, 190, 370, 540, -190.5, 1e9]
    path = write(tmp_path, HEADER + "\n" + "".join(f"{face[0]},30,{deg},0,0,200,200\n" for deg in degs))
    records = Records(path, tmp_path)
    assert records.deg.tolist() == [10, 180, 180, -170, 10, 180, 169.5, -80]
    dataset = FaceDataset(records, 32, 0.0)
    assert np.array_equal(dataset[0]["image"], dataset[4]["image"])


def test_interrupted_cache_build_leaves_a_part_that_the_next_build_removes(tmp_path):
    path = tmp_path / "k_train_align.csv"
    write_csv(path, utkface_files()[:20])
    cache = tmp_path / "cache"
    killed = subprocess.run([sys.executable, "-c", DIE_MID_BUILD.format(root=str(ROOT), csv=str(path), cache=str(cache))],
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    leftover = list(cache.glob("*.part"))
    assert len(leftover) == 1 and leftover[0].stat().st_size > 0
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        in_progress = cache / f"k_train-48px-0123456789abcdef.{running.pid}@{socket.gethostname()}.part"
        other_machine = cache / f"k_train-48px-0123456789abcdef.{killed_pid_stand_in()}@elsewhere.example.part"
        for part in (in_progress, other_machine):
            part.write_bytes(b"a build in progress")
        build_crop_cache(Records(path, tmp_path), 32, 0.0, cache, 0, "k_train")
        assert sorted(cache.glob("*.part")) == sorted([in_progress, other_machine]), "only the dead local build's part goes"
    finally:
        running.kill()
        running.wait()


def killed_pid_stand_in():
    """The pid of a process that has ended: on another machine it may be running, so its part must stay."""
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    return int(ended.stdout)


DIE_MID_BUILD = """
import os, signal, sys
sys.path.insert(0, {root!r})
import crop_cache
from records import Records
real = crop_cache._cache_item
def dying(records, expand, size, index):
    if index == 10:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(records, expand, size, index)
crop_cache._cache_item = dying
crop_cache.build_crop_cache(Records({csv!r}, "/"), 32, 0.0, {cache!r}, 0, "k_train")
"""


def png_header_claiming(width, height):
    """A real PNG header (signature, IHDR, a little IDAT, IEND) for a huge RGB image, a few hundred bytes long."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(64))) + chunk(b"IEND", b"")


def test_huge_png_header_is_read_without_pil_bomb_error_and_named_when_undecodable(tmp_path):
    (tmp_path / "huge.png").write_bytes(png_header_claiming(20000, 10000))
    path = write(tmp_path, f"{HEADER}\nhuge.png,30,0,100,100,900,900\n")
    records = Records(path, tmp_path)  # the box check reads the 20000 x 10000 size from the header
    with pytest.raises(DataError, match="line 2: image .*huge.png cannot be decoded"):
        build_crop_cache(records, 32, 0.0, tmp_path / "cache", 0, "x_train")


def test_photo_that_is_a_folder_is_named_as_a_folder(tmp_path):
    (tmp_path / "album.jpg").mkdir()
    path = write(tmp_path, f"{HEADER}\nalbum.jpg,30,0,0,0,200,200\n")
    with pytest.raises(DataError, match="line 2: photo .*album.jpg is a folder, not an image"):
        Records(path, tmp_path)


def test_truncated_jpeg_without_the_cache_is_named_truthfully(tmp_path, face):
    data = face[0].read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[:len(data) // 2])
    records = Records(write(tmp_path, f"{HEADER}\ncut.jpg,30,0,0,0,200,200\n"), tmp_path)  # its header is whole
    with pytest.raises(DataError) as error:
        FaceDataset(records, 32, 0.0)[0]
    text = str(error.value)
    assert "line 2" in text and "cut.jpg cannot be decoded" in text and "reads only image headers" in text
    assert "was readable" not in text


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


@pytest.mark.parametrize("column", ["gender", "race"])
@pytest.mark.parametrize("value", ["inf", "-inf", "1e400", "Infinity", "2.5"])
def test_a_non_finite_or_fractional_class_code_names_file_and_line(tmp_path, face, column, value):
    """float('inf') has no int(): such a code used to escape as an OverflowError instead of naming the row."""
    codes = {"gender": "0", "race": "1", column: value}
    path = write(tmp_path, f"{HEADER},gender,race\n{face[0]},30,0,0,0,200,200,0,1\n"
                           f"{face[0]},40,0,0,0,200,200,{codes['gender']},{codes['race']}\n")
    with pytest.raises(DataError) as error:
        Records(path, tmp_path)
    text = str(error.value)
    assert str(path) in text and "line 3" in text and f"{column} " in text and "is not one of" in text


def test_a_detector_box_past_a_tight_crops_edges_is_accepted(tmp_path, face):
    """preprocessing/utkface.py's own box for one of UTKFace's 200 px crops: dlib, upsampled, framed the face 1.02
    times the photo's diagonal wide. What preprocessing writes, training reads."""
    path = write(tmp_path, f"{HEADER}\n{face[0]},26,-2.07564,-55.5575,-56.4268,232.442,231.573\n")
    assert len(Records(path, tmp_path)) == 1
