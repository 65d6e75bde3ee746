"""Batches of labelled faces for training and evaluation, two ways.

`CachedBatches` gathers whole batches from the crop cache (crop_cache.py) by
index: the fast path. `FaceDataset` gives one sample at a time to a DataLoader,
from the cache or decoded per sample: the path for DATA.CACHE False and for
per-sample augmentation (AUG.BACKEND albumentations). Either gives uint8 CHW
images with their labels; normalisation happens on the device (normalize.py).
"""
import math

import numpy as np
import torch
from torch.utils.data import Dataset

from crop_cache import load_crop
from records import row_error

# spacing between runs' augmentation seed ranges, larger than any epoch count
AUG_SEED_STRIDE = 100_003


def sample_key(epoch, position, index, size):
    """One integer for a training sample of a data set of ``size`` faces: the epoch, the sample's position in that
    epoch's order and its face ``index`` (runtime.EpochSampler makes the keys; ``key % size`` is the face). The
    position tells apart the draws of one face in an epoch of balanced sampling, so each gets its own augmentation.
    Works on ints and on integer tensors alike."""
    return (epoch * size + position) * size + index


def split_key(key, size):
    """(epoch, position, index) of a `sample_key`."""
    rest = key // size
    return rest // size, rest % size, key % size


class FaceDataset(Dataset):
    """Face crops with their labels, one sample at a time: the loader path, for DATA.CACHE False and for
    AUG.BACKEND albumentations. From the crop cache when given, else decoded per sample.

    ``augment`` is a per-sample pipeline called as ``augment(crop, seed)`` (augment.SeededPipeline), seeded
    per (run, epoch, position in the epoch's order), or None.
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
        """``key`` is a `sample_key` (see runtime.EpochSampler); a plain face index is one at epoch 0, position 0."""
        epoch, position, index = split_key(int(key), len(self))
        try:
            crop = self.crop(index)
        except (OSError, ValueError) as error:
            if self.on_bad_image == "skip":
                return None
            raise row_error(
                self.records.path, index,
                f"{error}. The check before training reads only image headers, so a truncated or corrupt image "
                f"shows only now. Replace the image or remove the row, or set DATA.ON_BAD_IMAGE skip to count and "
                f"skip such images",
            ) from None
        if self.augment is not None:
            crop = self.augment(crop, ((self.seed * AUG_SEED_STRIDE + epoch) * len(self) + position) % 2**32)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(crop.transpose(2, 0, 1))),
            "age": int(self.records.age[index]),
            "gender": int(self.records.gender[index]),
            "race": int(self.records.ethnicity[index]),
            "index": index,
            "position": position,
        }


class CachedBatches:
    """Batches gathered from the crop cache by index: one fancy index per batch, no per-sample Python.

    The cache is (N, H, W, 3) uint8, so a gathered batch permuted to NCHW is
    already channels_last. On a GPU it is pinned and copied without blocking,
    and the next batch is gathered while the GPU works. Iterating gives the
    same dicts as the loader path (image, age, gender, race, index, position, skipped).
    """

    def __init__(self, records, crops, sampler, batch_size, runtime):
        self.dataset = records
        self.crops = crops
        self.sampler = sampler
        self.batch_size = batch_size
        self.pin = runtime.device.type == "cuda"
        # label keys as the model's heads are keyed (model.ATTRIBUTE_HEADS: "race" is the ethnicity head)
        labels = {"age": records.age, "gender": records.gender, "race": records.ethnicity}
        self.labels = {name: torch.from_numpy(codes) for name, codes in labels.items()}

    def __len__(self):
        return math.ceil(len(self.sampler) / self.batch_size)

    def __iter__(self):
        _, positions, indices = split_key(torch.tensor(list(self.sampler), dtype=torch.int64), len(self.dataset))
        for start in range(0, len(indices), self.batch_size):
            index, position = indices[start:start + self.batch_size], positions[start:start + self.batch_size]
            images = torch.from_numpy(self.crops[index.numpy()]).permute(0, 3, 1, 2)
            if self.pin:
                images = images.pin_memory()
            batch = {name: labels[index] for name, labels in self.labels.items()}
            yield {"image": images, **batch, "index": index, "position": position, "skipped": 0}


def collate(samples):
    """Stack samples, dropping the unreadable ones that DATA.ON_BAD_IMAGE skip let through, and count them."""
    kept = [s for s in samples if s is not None]
    batch = torch.utils.data.default_collate(kept) if kept else {}
    batch["skipped"] = len(samples) - len(kept)
    return batch
