"""The crop cache: every face of a CSV decoded, rotated, cropped and resized once, into one uint8 file.

Training and evaluation gather batches from it by index (dataset.CachedBatches);
the file is keyed on everything that shapes a crop, so a stale one is never used.
"""
import functools
import hashlib
import os
import shutil
from multiprocessing.pool import ThreadPool
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

import files
from geometry import aligned_crop, expand_box, inside_frame, read_rgb
from records import row_error

# OpenCV's own thread pool off (albumentations' advice for loaders): the cache
# threads and the loader's workers already parallelise over images, and a
# worker forked from a process whose OpenCV pool has run can wait forever.
cv2.setNumThreads(0)

# images a cache thread takes at a time: enough to make the hand-over negligible
CACHE_CHUNK_SIZE = 64
CACHE_VERSION = "1"
# room for the .npy header (128 bytes for a crop cache) on top of the crops themselves
NPY_HEADER_ALLOWANCE = 4096
BYTES_PER_KILOBYTE = 1000
SIZE_UNITS = ("bytes", "kB", "MB", "GB", "TB")
# keys a cache holding a crop whose expanded box extends past its rotated frame: such crops are padded from the photo
# now, where they were once squeezed into the frame; caches of boxes inside their frames crop as before and keep
# their keys
PADDED_CROPS = "padded"
# the crop caches' folder inside a run folder
CACHE_FOLDER = "cache"


def cache_key(records, img_size, expand):
    """Key of the crop cache: any change of CSV, images' paths, size or expand gives a new one.

    Each image's size and modification time stand for its content (an image
    edited in place gets a new key) at the cost of one stat per file.
    """
    digest = hashlib.sha256()
    digest.update(records.path.read_bytes())
    digest.update("\n".join(records.files).encode())
    for file in records.files:
        stat = os.stat(file)
        digest.update(f"|{stat.st_size}:{stat.st_mtime_ns}".encode())
    digest.update(f"{img_size}|{expand:.6f}|{CACHE_VERSION}".encode())
    if any(not inside_frame(expand_box(box, expand), *size) for box, size in zip(records.boxes, records.sizes)):
        digest.update(PADDED_CROPS.encode())
    return digest.hexdigest()[:16]


def load_crop(files, deg, boxes, index, expand, size):
    """Face ``index`` as the model sees it: decoded upright, rotated by its deg, cropped to its expanded box and
    resized to ``size``, RGB uint8 (size, size, 3)."""
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

    The file is written whole (files.atomic_write), so a crash never leaves a
    cache that looks finished; the half-built files of killed builds are
    deleted by the next build.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / f"{name}-{img_size}px-{cache_key(records, img_size, expand)}.npy"
    if target.is_file():
        return np.load(target, mmap_mode="r")
    files.remove_stale_temp_files(cache_dir)  # killed builds' leftovers, often gigabytes
    check_free_space(cache_dir, len(records), img_size, name)
    files.atomic_write(target, lambda partial: _fill_cache_or_refuse(partial, records, img_size, expand, workers, name))
    return np.load(target, mmap_mode="r")


def _fill_cache_or_refuse(path, records, img_size, expand, workers, name):
    errors = _fill_cache(path, records, img_size, expand, workers, name)
    if errors:
        index, message = min(errors)
        raise row_error(records.path, index, f"{message}; replace the image or remove the row ({len(errors)} such rows)")


def check_free_space(cache_dir, count, img_size, name):
    """Refuse a cache that the disk cannot hold, before any of it is written.

    The cache is a memory-mapped file that grows as crops land in it: on a full disk the kernel cannot back a page
    that is written, and the process dies of SIGBUS, with no message, minutes into the build.
    """
    needed = count * img_size * img_size * 3 + NPY_HEADER_ALLOWANCE
    free = shutil.disk_usage(cache_dir).free
    if free < needed:
        raise SystemExit(
            f"the {name} crop cache needs {readable_size(needed)} ({count} crops of {img_size}x{img_size} px) in "
            f"{cache_dir}, which has {readable_size(free)} free. Free some space there, or set DATA.CACHE False to "
            f"decode every image per sample instead."
        )


def readable_size(size):
    """``size`` bytes in the largest decimal unit that keeps it at 1 or more: 1.5 GB, 300.0 kB, 12 bytes."""
    for unit in SIZE_UNITS[:-1]:
        if size < BYTES_PER_KILOBYTE:
            break
        size /= BYTES_PER_KILOBYTE
    else:
        unit = SIZE_UNITS[-1]
    return f"{size:.0f} {unit}" if unit == SIZE_UNITS[0] else f"{size:.1f} {unit}"


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
