"""The data a training run reads: its CSVs checked whole, their crop caches, and the training batches."""
import os
from pathlib import Path

import numpy as np
import torch

from augment import BatchAugmenter, SeededPipeline
from crop_cache import CACHE_FOLDER, build_crop_cache
from dataset import CachedBatches, FaceDataset
from preprocessing import split_record
from records import UNKNOWN, DataError, Records, age_bin_frequency, csv_path, ethnicity_age_mix_ratio
from runtime import EpochSampler, make_loader

# the CSVs the loop reads every epoch; a test CSV is read once, at the end
TRAINING_SPLITS = ("train", "valid")


def load_data(args, cfg, objective, runtime):
    """Check the CSVs whole (and that they are one preprocessing run's split), then build (or reuse) the crop
    caches, before any training. A test CSV, where there is one, is checked too and scored once at the end."""
    split_record.check(args.data_dir, args.dataset)
    splits = TRAINING_SPLITS + (("test",) if csv_path(args.data_dir, args.dataset, "test").is_file() else ())
    records = {split: Records(csv_path(args.data_dir, args.dataset, split), args.data_dir,
                              need_attributes=objective.multitask)
               for split in splits}
    for rec in records.values():
        if len(rec) == 0:
            raise DataError(f"{rec.path} has no rows: training needs faces in both the train and the valid CSV, the "
                            f"valid ones to score every epoch, and in a test CSV where there is one. Add rows, or "
                            f"split again with preprocessing/<name>.py")
    if cfg.TRAIN.BALANCE_RACE != 0 and np.all(records["train"].ethnicity == UNKNOWN):
        raise DataError(f"{records['train'].path} has no race labels, and TRAIN.BALANCE_RACE {cfg.TRAIN.BALANCE_RACE} "
                        f"evens out each ethnicity's age mix by them; add a race column, or leave TRAIN.BALANCE_RACE "
                        f"at 0")
    if runtime.is_main:
        for split, rec in records.items():
            clamped = f", {rec.ages_out_of_range} ages outside 0..100 clamped" if rec.ages_out_of_range else ""
            print(f"{split}: {len(rec)} faces from {rec.path}{clamped}")
    crops = {split: None for split in TRAINING_SPLITS}
    if cfg.DATA.CACHE:
        cache_dir = Path(args.checkpoint) / CACHE_FOLDER
        for split in TRAINING_SPLITS:
            crops[split] = machine_crop_cache(records[split], cfg, cache_dir, f"{args.dataset}_{split}", runtime)
    return records, crops


def machine_crop_cache(records, cfg, cache_dir, name, runtime):
    """The crop cache, built by one process per machine (LOCAL_RANK 0) while the others wait, then read by all."""
    builder = runtime.local_rank == 0
    if builder:
        crops = build_crop_cache(records, cfg.MODEL.IMG_SIZE, cfg.DATA.EXPAND, cache_dir, os.cpu_count() or 1, name)
    if runtime.distributed:
        torch.distributed.barrier()
    if not builder:
        crops = build_crop_cache(records, cfg.MODEL.IMG_SIZE, cfg.DATA.EXPAND, cache_dir, 0, name)
    return crops


def training_batches(records, crops, cfg, runtime):
    """The training batches and their sampler: gathered from the crop cache, or through a loader per sample.

    The loader path serves DATA.CACHE False and AUG.BACKEND albumentations;
    either way batches hold uint8 crops, and batched augmentation (when on)
    runs in train_step, on the training device.
    """
    per_rank_batch = rank_batch_size(cfg, runtime)
    sampler = EpochSampler(len(records), seed=cfg.TRAIN.SEED, rank=runtime.rank, world_size=runtime.world_size,
                           batch_size=per_rank_batch, weights=sampling_weights(records, cfg))
    per_sample_aug = cfg.TRAIN.AUG and cfg.AUG.BACKEND == "albumentations"
    if crops is not None and not per_sample_aug:
        return CachedBatches(records, crops, sampler, per_rank_batch, runtime), sampler
    augment = SeededPipeline(cfg.AUG, cfg.MODEL.IMG_SIZE) if per_sample_aug else None
    dataset = FaceDataset(records, cfg.MODEL.IMG_SIZE, cfg.DATA.EXPAND, augment=augment, crops=crops,
                          on_bad_image=cfg.DATA.ON_BAD_IMAGE, seed=cfg.TRAIN.SEED)
    return make_loader(dataset, sampler, per_rank_batch, cfg.TRAIN.WORKERS, runtime, seed=cfg.TRAIN.SEED), sampler


def sampling_weights(records, cfg):
    """Each training face's chance to be drawn: (faces in its TRAIN.AGE_BIN)^-TRAIN.BALANCE times the ethnicity
    balance^TRAIN.BALANCE_RACE, or None for the plain shuffle."""
    if cfg.TRAIN.BALANCE == 0 and cfg.TRAIN.BALANCE_RACE == 0:
        return None
    weights = age_bin_frequency(records.age, cfg.TRAIN.AGE_BIN) ** -cfg.TRAIN.BALANCE
    if cfg.TRAIN.BALANCE_RACE != 0:
        weights *= ethnicity_age_mix_ratio(records.age, records.ethnicity, cfg.TRAIN.AGE_BIN) ** cfg.TRAIN.BALANCE_RACE
    return weights


def rank_batch_size(cfg, runtime):
    """Each rank's share of TRAIN.BATCH_SIZE, which stays the global batch; it must split evenly."""
    if cfg.TRAIN.BATCH_SIZE % runtime.world_size:
        raise SystemExit(f"TRAIN.BATCH_SIZE {cfg.TRAIN.BATCH_SIZE} is the global batch and must split evenly over the "
                         f"{runtime.world_size} processes; use a multiple of {runtime.world_size}")
    return cfg.TRAIN.BATCH_SIZE // runtime.world_size


def batch_augmenter(cfg):
    """The batched augmentation of train_step, or None when augmentation is off or done per sample."""
    if cfg.TRAIN.AUG and cfg.AUG.BACKEND == "batch":
        return BatchAugmenter(cfg.AUG, cfg.TRAIN.SEED)
    return None
