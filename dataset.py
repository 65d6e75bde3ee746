"""Aligned-face CSVs → checked records → uint8 face crops → batches.

The CSV (`photo, age, deg, box1..box4[, gender, race]`, in any order) is
checked whole before any training starts, so that a bad row stops the run in
seconds with its file and row named, not hours later.

Samples are uint8 CHW tensors: normalising on the device is cheaper than
shipping floats from the workers, and the same crops serve the cache.
"""
import functools
import hashlib
import math
import os
from multiprocessing.pool import ThreadPool
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

import temp_files
from defaults import MAX_AGE, NUM_RACES
from geometry import aligned_crop, image_size, read_rgb

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# OpenCV's own thread pool off (albumentations' advice for loaders): the cache
# threads and the loader's workers already parallelise over images, and a
# worker forked from a process whose OpenCV pool has run can wait forever.
cv2.setNumThreads(0)

# images a cache thread takes at a time: enough to make the hand-over negligible
CACHE_CHUNK_SIZE = 64
REQUIRED_COLUMNS = ("photo", "age", "deg", "box1", "box2", "box3", "box4")
BOX_COLUMNS = ["box1", "box2", "box3", "box4"]
# letters of the original scripts' CSVs; Hispanic has no class of its own and counts as Other
GENDER_CODES = {"m": 0, "male": 0, "f": 1, "female": 1}
RACE_CODES = {"w": 0, "b": 1, "a": 2, "i": 3, "h": 4, "o": 4}
GENDER_NAMES = ("male", "female")
RACE_NAMES = ("white", "black", "asian", "indian", "other")
UNKNOWN = -1
# the optional fallback column (1: no face was detected; the whole image or given crop is the box)
FALLBACK_VALUES = {"": False, "0": False, "0.0": False, "false": False, "1": True, "1.0": True, "true": True}
# a box may poke this many pixels past the image edge (rounding in detectors) before it is an error
BOX_TOLERANCE = 1.0
CACHE_VERSION = "1"
# deg is folded into (-HALF_TURN, HALF_TURN]
HALF_TURN = 180.0
# spacing between runs' augmentation seed ranges, larger than any epoch count
AUG_SEED_STRIDE = 100_003


class DataError(SystemExit):
    """Bad input; a SystemExit so that the scripts print it without a traceback."""


def csv_path(data_dir, dataset, split):
    return Path(data_dir) / f"{dataset}_{split}_align.csv"


def _row_error(path, index, message):
    # +2: a header line, and rows counted from 1 as an editor shows them
    return DataError(f"{path}, line {index + 2}: {message}")


def _parse_code(path, column, values, codes, num_classes):
    """Integer codes or the original's letters → 0..num_classes-1, UNKNOWN for blanks."""
    parsed = np.full(len(values), UNKNOWN, dtype=np.int64)
    for index, value in enumerate(values):
        if pd.isna(value) or str(value).strip() == "":
            continue
        text = str(value).strip().lower()
        if text in codes:
            parsed[index] = codes[text]
            continue
        try:
            number = float(text)
        except ValueError:
            number = None
        if number is None or not number.is_integer() or not 0 <= number < num_classes:
            raise _row_error(
                path, index,
                f"{column} {value!r} is not one of 0..{num_classes - 1} or {'/'.join(sorted(codes)).upper()}",
            )
        parsed[index] = int(number)
    return parsed


def _parse_numbers(path, frame, column):
    values = pd.to_numeric(frame[column], errors="coerce")
    bad = np.flatnonzero(values.isna().to_numpy())
    if len(bad):
        index = bad[0]
        raise _row_error(
            path, index,
            f"{column} {frame[column].iloc[index]!r} is not a number ({len(bad)} such rows); fix or remove the row",
        )
    return values.to_numpy(dtype=np.float64)


def _resolve_photos(path, data_dir, photos):
    resolved = []
    for index, photo in enumerate(photos):
        photo = str(photo)
        full = Path(photo) if os.path.isabs(photo) else Path(data_dir) / photo
        if full.is_dir():
            raise _row_error(path, index, f"photo {full} is a folder, not an image; name an image file")
        if not full.is_file():
            raise _row_error(path, index, f"image {full} does not exist; photo paths are relative to --data_dir {data_dir}")
        resolved.append(str(full))
    return resolved


def _fold_angles(path, deg):
    """Angles in (-180, 180]; a non-finite one is a broken row (it would train on a blank crop)."""
    bad = np.flatnonzero(~np.isfinite(deg))
    if len(bad):
        raise _row_error(path, bad[0], f"deg {deg[bad[0]]} is not a finite angle ({len(bad)} such rows); "
                                       f"deg is the rotation in degrees that levels the eyes")
    inside = (deg > -HALF_TURN) & (deg <= HALF_TURN)
    return np.where(inside, deg, HALF_TURN - np.mod(HALF_TURN - deg, 2 * HALF_TURN))


def _check_boxes(path, photos, boxes):
    """Boxes must lie inside their image, upright as decoded; only image headers are read, so this is quick."""
    for index, (photo, (x1, y1, x2, y2)) in enumerate(zip(photos, boxes)):
        try:
            width, height = image_size(photo)
        except OSError as error:
            raise _row_error(path, index, f"image {photo} cannot be read ({error}); replace it or remove the row") from None
        inside = (
            -BOX_TOLERANCE <= x1 < x2 <= width + BOX_TOLERANCE
            and -BOX_TOLERANCE <= y1 < y2 <= height + BOX_TOLERANCE
        )
        if not inside:
            raise _row_error(
                path, index,
                f"box ({x1:g}, {y1:g}, {x2:g}, {y2:g}) is not inside the {width}x{height} image {photo}; "
                f"boxes are x1, y1, x2, y2 with x1 < x2 and y1 < y2",
            )


class Records:
    """A checked CSV: absolute photo paths, ages clamped to 0..100, geometry and optional labels."""

    def __init__(self, path, data_dir, need_attributes=False):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(
                f"{self.path} not found. --data_dir must hold <dataset>_train_align.csv and "
                f"<dataset>_valid_align.csv; make them with preprocessing/<name>.py"
            )
        try:
            # round_trip: deg and box read back as the very floats preprocessing wrote, so that a face is cropped
            # here exactly as demo.py crops it (a box 1e-14 px wider can take geometry.aligned_crop's ceil a pixel up)
            frame = pd.read_csv(self.path, skipinitialspace=True, float_precision="round_trip")
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
            raise DataError(f"{self.path} is not a readable CSV: {error}") from None
        frame.columns = [str(c).strip().lower() for c in frame.columns]
        missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
        if missing:
            raise DataError(
                f"{self.path} lacks the column(s) {', '.join(missing)}; it needs "
                f"{', '.join(REQUIRED_COLUMNS)} (gender, race optional), in any order"
            )
        if need_attributes:
            absent = [c for c in ("gender", "race") if c not in frame.columns]
            if absent:
                raise DataError(f"{self.path} lacks {', '.join(absent)}, which the multitask objective needs")
        raw_age = _parse_numbers(self.path, frame, "age")
        self.ages_out_of_range = int(((raw_age < 0) | (raw_age > MAX_AGE)).sum())
        self.age = np.clip(np.rint(raw_age), 0, MAX_AGE).astype(np.int64)
        self.deg = _fold_angles(self.path, _parse_numbers(self.path, frame, "deg"))
        self.boxes = np.stack([_parse_numbers(self.path, frame, c) for c in BOX_COLUMNS], axis=1)
        self.photo = [str(p) for p in frame["photo"]]
        self.files = _resolve_photos(self.path, data_dir, self.photo)
        _check_boxes(self.path, self.files, self.boxes)
        self.gender = self._codes(frame, "gender", GENDER_CODES, len(GENDER_NAMES))
        self.race = self._codes(frame, "race", RACE_CODES, NUM_RACES)
        if need_attributes:
            for name, codes in (("gender", self.gender), ("race", self.race)):
                blank = np.flatnonzero(codes == UNKNOWN)
                if len(blank):
                    raise _row_error(self.path, blank[0], f"{name} is blank ({len(blank)} rows); the multitask objective needs it on every row")
        self.has_gender = bool((self.gender != UNKNOWN).any())
        self.has_race = bool((self.race != UNKNOWN).any())
        self.fallback = self._fallback_flags(frame)

    def _codes(self, frame, column, codes, num_classes):
        if column not in frame.columns:
            return np.full(len(frame), UNKNOWN, dtype=np.int64)
        return _parse_code(self.path, column, frame[column].tolist(), codes, num_classes)

    def _fallback_flags(self, frame):
        """The optional ``fallback`` column: True where no face was found and the whole image (or given crop) is the box.

        Blank or absent means a detected face, so CSVs from before the column existed read as all detected.
        """
        if "fallback" not in frame.columns:
            return np.zeros(len(frame), dtype=bool)
        flags = np.zeros(len(frame), dtype=bool)
        for index, value in enumerate(frame["fallback"].tolist()):
            text = "" if pd.isna(value) else str(value).strip().lower()
            if text not in FALLBACK_VALUES:
                raise _row_error(self.path, index, f"fallback {value!r} is not 0 or 1 (1: no face was detected, "
                                                   f"the whole image is the box; 0 or blank: a detected face)")
            flags[index] = FALLBACK_VALUES[text]
        return flags

    def __len__(self):
        return len(self.files)

    def fingerprint(self, img_size, expand):
        """Key of the crop cache: any change of CSV, images' paths, size or expand gives a new one.

        Each image's size and modification time stand for its content (an image
        edited in place gets a new key) at the cost of one stat per file.
        """
        digest = hashlib.sha256()
        digest.update(self.path.read_bytes())
        digest.update("\n".join(self.files).encode())
        for file in self.files:
            stat = os.stat(file)
            digest.update(f"|{stat.st_size}:{stat.st_mtime_ns}".encode())
        digest.update(f"{img_size}|{expand:.6f}|{CACHE_VERSION}".encode())
        return digest.hexdigest()[:16]


def load_crop(files, deg, boxes, index, expand, size):
    image = read_rgb(files[index])
    if image is None:
        raise OSError(f"image {files[index]} cannot be decoded")
    return aligned_crop(image, deg[index], boxes[index], expand, size)


def _cache_item(records, expand, size, index):
    try:
        return index, load_crop(records.files, records.deg, records.boxes, index, expand, size), None
    except (OSError, ValueError) as error:
        return index, None, str(error)


def build_crop_cache(records, img_size, expand, cache_dir, workers, name):
    """Decode, rotate, crop and resize every image once; reuse the file while its key matches.

    The file is written under a temporary name (temp_files) and renamed when
    complete, so a crash never leaves a cache that looks finished; the
    half-built files of killed builds are deleted by the next build.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / f"{name}-{img_size}px-{records.fingerprint(img_size, expand)}.npy"
    if target.is_file():
        return np.load(target, mmap_mode="r")
    temp_files.remove_stale(cache_dir)  # killed builds' leftovers, often gigabytes
    with temp_files.writing(target) as partial:
        errors = _fill_cache(partial, records, img_size, expand, workers, name)
        if errors:
            index, message = min(errors)
            raise _row_error(records.path, index, f"{message}; replace the image or remove the row ({len(errors)} such rows)")
        os.replace(partial, target)
    return np.load(target, mmap_mode="r")


def _fill_cache(partial, records, img_size, expand, workers, name):
    """Write every crop into the memory-mapped file ``partial``; returns the (row, message) of unreadable images."""
    crops = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=(len(records), img_size, img_size, 3))
    item = functools.partial(_cache_item, records, expand, img_size)
    errors = []
    bar = tqdm(total=len(records), desc=f"caching {name} crops", unit="img", dynamic_ncols=True)
    if workers > 0:
        # Threads, not processes: OpenCV decodes and warps without the GIL, and
        # nothing is forked from a process whose OpenCV or OpenMP threads could
        # leave a child waiting forever on a lock.
        with ThreadPool(workers) as pool:
            for result in pool.imap_unordered(item, range(len(records)), chunksize=CACHE_CHUNK_SIZE):
                _store(crops, errors, *result, bar)
    else:
        for index in range(len(records)):
            _store(crops, errors, *item(index), bar)
    bar.close()
    crops.flush()
    del crops
    return errors


def _store(crops, errors, index, crop, error, bar):
    if error is None:
        crops[index] = crop
    else:
        errors.append((index, error))
    bar.update()


class FaceDataset(Dataset):
    """Face crops with their labels, one sample at a time: the loader path, for DATA.CACHE False and for
    AUG.BACKEND albumentations. From the crop cache when given, else decoded per sample.

    ``augment`` is a per-sample pipeline called as ``augment(crop, seed)`` (augment.SeededPipeline), seeded
    per (run, epoch, sample), or None.
    """

    def __init__(self, records, img_size, expand, augment=None, crops=None, on_bad_image="error", seed=0):
        self.records = records
        self.seed = seed
        self.img_size = img_size
        self.expand = expand
        self.crops = crops
        self.on_bad_image = on_bad_image
        self.augment = augment

    def __len__(self):
        return len(self.records)

    def crop(self, index):
        if self.crops is not None:
            return np.asarray(self.crops[index])
        records = self.records
        return load_crop(records.files, records.deg, records.boxes, index, self.expand, self.img_size)

    def __getitem__(self, key):
        """``key`` is ``epoch * len(self) + index`` (see runtime.EpochSampler)."""
        epoch, index = divmod(int(key), len(self))
        try:
            crop = self.crop(index)
        except (OSError, ValueError) as error:
            if self.on_bad_image == "skip":
                return None
            raise DataError(
                f"{self.records.path}, line {index + 2}: {error}. The check before training reads only image "
                f"headers, so a truncated or corrupt image shows only now. Replace the image or remove the row, "
                f"or set DATA.ON_BAD_IMAGE skip to count and skip such images"
            ) from None
        if self.augment is not None:
            crop = self.augment(crop, ((self.seed * AUG_SEED_STRIDE + epoch) * len(self) + index) % 2**32)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(crop.transpose(2, 0, 1))),
            "age": int(self.records.age[index]),
            "gender": int(self.records.gender[index]),
            "race": int(self.records.race[index]),
            "index": index,
        }


class CachedBatches:
    """Batches gathered from the crop cache by index: one fancy index per batch, no per-sample Python.

    The cache is (N, H, W, 3) uint8, so a gathered batch permuted to NCHW is
    already channels_last. On a GPU it is pinned and copied without blocking,
    and the next batch is gathered while the GPU works. Iterating gives the
    same dicts as the loader path (image, age, gender, race, index, skipped).
    """

    def __init__(self, records, crops, sampler, batch_size, runtime):
        self.dataset = records
        self.crops = crops
        self.sampler = sampler
        self.batch_size = batch_size
        self.pin = runtime.device.type == "cuda"
        self.labels = {name: torch.from_numpy(getattr(records, name)) for name in ("age", "gender", "race")}

    def __len__(self):
        return math.ceil(len(self.sampler) / self.batch_size)

    def __iter__(self):
        size = len(self.dataset)
        indices = torch.tensor(list(self.sampler), dtype=torch.int64) % size
        for start in range(0, len(indices), self.batch_size):
            index = indices[start:start + self.batch_size]
            images = torch.from_numpy(self.crops[index.numpy()]).permute(0, 3, 1, 2)
            if self.pin:
                images = images.pin_memory()
            batch = {name: labels[index] for name, labels in self.labels.items()}
            yield {"image": images, **batch, "index": index, "skipped": 0}


def collate(samples):
    """Stack samples, dropping the unreadable ones that DATA.ON_BAD_IMAGE skip let through, and count them."""
    kept = [s for s in samples if s is not None]
    batch = torch.utils.data.default_collate(kept) if kept else {}
    batch["skipped"] = len(samples) - len(kept)
    return batch


def normalize(images, settings, dtype=torch.float32, channels_last=False):
    """uint8 RGB NCHW on the device → the float input the network expects, in the memory format it runs in.

    ``settings`` is ``model.input_settings(arch)`` (or a checkpoint's "input"):
    colour order, value range, mean and std.

    The arithmetic runs on contiguous NCHW planes, where each channel's
    constants broadcast over a whole plane: on channels_last data (three
    channels innermost) the same broadcast does not vectorise and takes about
    six times as long on a CPU. One ``x * (1 / std) - mean / std`` pass, then
    one conversion to channels_last.
    """
    scale = 255.0 / settings["range"]
    mean = device_constant(tuple(settings["mean"]), images.device, dtype).view(1, 3, 1, 1) * scale
    std = device_constant(tuple(settings["std"]), images.device, dtype).view(1, 3, 1, 1) * scale
    images = float_planes(images.flip(1) if settings["space"] == "BGR" else images, dtype)
    images = torch.addcmul(-mean / std, images, 1.0 / std, out=images)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


@functools.lru_cache(maxsize=None)
def device_constant(values, device, dtype=torch.float32):
    """Fixed numbers (nested tuples) as a tensor on ``device``, made once: a tensor built from host numbers every
    step would make a GPU's host wait for each copy. Shared by every caller, so never changed in place."""
    return torch.tensor(values, dtype=dtype).to(device)


def float_planes(images, dtype=torch.float32):
    """Any-layout images as contiguous NCHW floats, converted and laid out in one copy.

    A uint8 channels_last batch (what the crop cache gives) turned into floats
    first and made contiguous after takes several times as long on a CPU.
    """
    if images.dtype == dtype and images.is_contiguous():
        return images.clone()
    planes = torch.empty(images.shape, dtype=dtype, device=images.device)
    return planes.copy_(images)
