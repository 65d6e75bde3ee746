"""Train an age estimator over ages 0..100 with cross-entropy (the classification objective).

    python train.py --data_dir D --dataset NAME [--checkpoint DIR] [--config FILE.yaml] [--resume CKPT]
        [--overwrite] [--multi_gpu] [--aug] [--expand E] [--device cpu|cuda] [KEY VALUE ...]

train-ldl.py (DLDL-v2 label distributions) and train-mt.py (age + gender +
ethnicity) are this same loop with another objective. Any key of defaults.py
can follow the flags, e.g. ``MODEL.ARCH tinyage TRAIN.LR 0.01``. Several GPUs on
one machine: --multi_gpu; several processes or machines: torchrun.
"""
import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from augment import BatchAugmenter, SeededPipeline
from checkpoint import (BEST_NAME, LAST_NAME, TEST_REPORT_DIR, check_resumable, check_training_state, checkpoint_cfg,
                        load_checkpoint, load_state, rng_state, save_checkpoint, set_rng_state)
from crop_cache import CACHE_FOLDER, build_crop_cache
from dataset import CachedBatches, FaceDataset, collate
import defaults
from defaults import cfg_to_dict, config_value, get_cfg_defaults, merge_file, merge_opts
from estimator import load_model_file
from files import atomic_write, check_output_dir, folder_lock, remove_stale_temp_files
from history import HISTORY_NAME, append_history, write_curves
from model import (ATTRIBUTE_HEADS, backbone_lr_scale, build_model, check_arch, check_input_size, check_weights_source,
                   count_parameters, head_modules, input_settings, load_pretrained_backbone, pretrained_source,
                   random_init_warning)
from normalize import normalize
from objectives import OBJECTIVES, config_key_help, expected_age, refuse_ignored_settings
from preprocessing import split_record
from progress import RunPace, run_files
from records import DataError, Records, csv_path
import run_record
from runtime import (EpochSampler, autocast, gather_objects, make_loader, precision_name, resolve_amp, seed_everything,
                     setup_runtime, teardown, unwrap)
from tensorboard_log import EVENTS_DIR, open_log
from val import evaluate, evaluation_loader, format_report, metrics, score_model

EXIT_INTERRUPTED = 130
# the CSVs the loop reads every epoch; a test CSV is read once, at the end
TRAINING_SPLITS = ("train", "valid")
# the files that make a run: a fresh run refuses a folder holding any of them (see --overwrite)
RUN_FILES = (LAST_NAME, BEST_NAME, HISTORY_NAME, run_record.RECORD_NAME)
# the folders a run writes besides: --overwrite replaces them with the files, so no report or event of the old run stays
RUN_FOLDERS = (TEST_REPORT_DIR, EVENTS_DIR)
# what the network is and sees, and the optimizer's kind and parameter groups (TRAIN.BACKBONE_LR decides whether the
# backbone has a group of its own, which the saved optimizer state must match): a resumed run keeps these values
FROZEN_ON_RESUME = ("MODEL.ARCH", "MODEL.WIDTH", "MODEL.IMG_SIZE", "MODEL.PRETRAINED", "MODEL.PRETRAINED_SHA256", "DATA.EXPAND",
                    "TRAIN.OPT", "TRAIN.SCHEDULER", "TRAIN.BACKBONE_LR")
# settings the restored optimizer and scheduler keep in their own state; changed on resume, they are put there
SCHEDULE_KEYS = {"step": ("TRAIN.LR", "TRAIN.MOMENTUM", "TRAIN.WEIGHT_DECAY", "TRAIN.LR_DECAY_STEP", "TRAIN.LR_DECAY_RATE"),
                 "cosine": ("TRAIN.LR", "TRAIN.MOMENTUM", "TRAIN.WEIGHT_DECAY", "TRAIN.EPOCHS")}
# the loop reads its running sums from the device (and looks for a non-finite loss, and under DDP the ranks agree
# on a stop signal) once every this many steps and at the epoch's end: each read waits for the device to finish
LOG_EVERY_STEPS = 20
# the BatchNorm statistics of the weights that are scored and saved are recomputed from this many training crops
# (about the same statistics as from 2,048; see refresh_statistics)
BN_STATISTICS_FACES = 512


class TrainingError(SystemExit):
    """A run that cannot go on; a SystemExit so that the message is printed without a traceback."""


class StopRequest:
    """SIGINT/SIGTERM ask the loop to stop after the current step; a second signal exits at once.

    Under DDP a signal that reached only some ranks stops all of them (see agree_any); ``signal`` names it, or
    says that it came through another rank.
    """

    def __init__(self):
        self.signal = None
        self.previous = {}

    def install(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self.handle)

    def restore(self):
        """Put back the handlers that were there before: a caller of fit() gets its own Ctrl-C back."""
        for sig, handler in self.previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)

    def handle(self, signum, _frame):
        if self.signal is not None:
            raise SystemExit(f"second {signal.Signals(signum).name}: exiting at once")
        self.signal = signal.Signals(signum).name
        print(f"\n{self.signal} received: finishing this step and saving a checkpoint "
              f"(send it again to exit at once)", file=sys.stderr, flush=True)


def build_parser(objective):
    description = {"cls": __doc__,
                   "ldl": __doc__.replace("with cross-entropy (the classification objective)",
                                          "with DLDL-v2: Gaussian label distributions, KL + L1 loss"),
                   "mt": __doc__.replace("with cross-entropy (the classification objective)",
                                         "jointly with gender and ethnicity (DLDL-v2 loss + two cross-entropies)")}[objective]
    script = OBJECTIVES[objective].script
    parser = argparse.ArgumentParser(prog=script, epilog=config_key_help(objective),
                                     description=description.replace("python train.py", f"python {script}"),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(objective=objective)
    parser.add_argument("--data_dir", required=True, help="folder with <dataset>_train_align.csv and <dataset>_valid_align.csv")
    parser.add_argument("--dataset", required=True,
                        help="data set name, the CSVs' prefix; names containing 'megaage' pick the best epoch by CA(3), others by MAE")
    parser.add_argument("--checkpoint", default="checkpoint",
                        help="folder for last.pth, best.pth, history.csv and the crop cache (default: checkpoint)")
    parser.add_argument("--config", metavar="FILE.yaml",
                        help="a recipe of config keys (see configs/), merged before the flags and KEY VALUE pairs, which win")
    parser.add_argument("--resume", help="checkpoint to continue from, at its epoch, step and learning rate; MODEL.* and "
                                         "--expand cannot change, a new TRAIN.LR or schedule is applied")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run already in --checkpoint (its last.pth, best.pth, history.csv, run_record.json, "
                             "test/ and tensorboard/, deleted "
                             "when the new run saves its first checkpoint; the crop cache and other files stay); without "
                             "it, a fresh run refuses a folder that holds one. Not with --resume of a file in that folder")
    parser.add_argument("--multi_gpu", action="store_true", help="DataParallel over all visible GPUs of this machine")
    parser.add_argument("--aug", action="store_true", help="augment training crops (flip, colour, gamma, small affine); sets TRAIN.AUG")
    parser.add_argument("--expand", type=float,
                        help="enlarge each face box by EXPAND/2 of its size per side before cropping; sets DATA.EXPAND (default 0)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="force a device (default: cuda when available)")
    parser.add_argument("opts", nargs="*", metavar="KEY VALUE", help="config overrides as KEY VALUE pairs, e.g. MODEL.ARCH tinyage TRAIN.LR 0.01")
    return parser


def load_config(args):
    """Defaults, or the resumed run's config, then the --config recipe, then the flags, then KEY VALUE overrides."""
    resumed = load_checkpoint(args.resume) if args.resume else None
    base = checkpoint_cfg(resumed) if resumed else get_cfg_defaults()
    cfg = base.clone()
    if args.config:
        merge_file(cfg, args.config)
    if args.aug:
        cfg.TRAIN.AUG = True
    if args.expand is not None:
        cfg.DATA.EXPAND = args.expand
    merge_opts(cfg, args.opts)
    if resumed:
        refuse_model_changes(args.resume, base, cfg)
    check_config(cfg)
    refuse_ignored_settings(args.objective, base, cfg, args.config, args.opts)
    cfg.freeze()
    return cfg, resumed


def refuse_model_changes(path, saved, cfg):
    """A resumed run keeps its network, input crops and optimizer kind: the saved weights and state mean nothing otherwise."""
    for key in FROZEN_ON_RESUME:
        if config_value(cfg, key) != config_value(saved, key):
            raise SystemExit(
                f"{key} cannot change on --resume: {path} was trained with {config_value(saved, key)!r}, not "
                f"{config_value(cfg, key)!r}. Drop the override, or start a new run in another --checkpoint folder."
            )


def check_config(cfg):
    """Refuse values that would crash or silently misbehave later, before any data is read: each key's rule in
    defaults.py, then the keys whose check needs the model zoo or the file system (defaults.CheckedElsewhere)."""
    defaults.check_config(cfg)
    check_arch(cfg.MODEL.ARCH)
    check_input_size(cfg.MODEL.ARCH, cfg.MODEL.IMG_SIZE)
    check_weights_source(cfg.MODEL.PRETRAINED, cfg.MODEL.PRETRAINED_SHA256)


def best_rule(dataset):
    """The original's rule: MegaAge data sets keep the best CA(3), the others the best MAE."""
    return ("ca3", max) if "megaage" in dataset.lower() else ("mae", min)


def is_better(value, best, rule):
    _, pick = rule
    return best is None or (value != best and pick(value, best) == value)


def build_optimizer(model, cfg):
    groups = parameter_groups(model, cfg)
    if cfg.TRAIN.OPT == "sgd":
        return torch.optim.SGD(groups, lr=cfg.TRAIN.LR, momentum=cfg.TRAIN.MOMENTUM, weight_decay=cfg.TRAIN.WEIGHT_DECAY)
    if cfg.TRAIN.OPT == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.TRAIN.LR, weight_decay=cfg.TRAIN.WEIGHT_DECAY)
    return torch.optim.Adam(groups, lr=cfg.TRAIN.LR, weight_decay=cfg.TRAIN.WEIGHT_DECAY)


def parameter_groups(model, cfg):
    """The new heads at TRAIN.LR first (history logs the first group's rate), then a pretrained backbone at its scale.

    Each group carries its ``lr_scale``, so that a schedule changed on resume is
    put into every group in proportion. One group when the scale is 1.
    """
    scale = backbone_lr_scale(cfg.MODEL.ARCH, cfg.MODEL.PRETRAINED, cfg.TRAIN.BACKBONE_LR)
    if scale == 1.0:
        return [{"params": list(model.parameters()), "lr_scale": 1.0}]
    head = [p for module in head_modules(model) for p in module.parameters()]
    head_ids = {id(p) for p in head}
    backbone = [p for p in model.parameters() if id(p) not in head_ids]
    return [{"params": head, "lr_scale": 1.0}, {"params": backbone, "lr": cfg.TRAIN.LR * scale, "lr_scale": scale}]


def build_scheduler(optimizer, cfg):
    if cfg.TRAIN.SCHEDULER == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.TRAIN.EPOCHS)
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.TRAIN.LR_DECAY_STEP, gamma=cfg.TRAIN.LR_DECAY_RATE)


def prepare_model(cfg, objective, runtime):
    model = build_model(cfg.MODEL.ARCH, multitask=objective.multitask, width=cfg.MODEL.WIDTH)
    source = pretrained_source(cfg.MODEL.ARCH, cfg.MODEL.PRETRAINED)
    if source:
        loaded = load_pretrained_backbone(model, source, cfg.MODEL.PRETRAINED_SHA256)
        if runtime.is_main:
            print(f"loaded {loaded} pretrained tensors from {source}")
    model.to(runtime.device)
    if cfg.MODEL.CHANNELS_LAST:
        model.to(memory_format=torch.channels_last)
    return model


def wrap_model(model, cfg, runtime, multi_gpu):
    """DDP under torchrun (with synchronised BatchNorm when asked), DataParallel for --multi_gpu, optionally compiled."""
    if runtime.distributed and cfg.TRAIN.SYNC_BN:
        if runtime.device.type != "cuda":
            raise SystemExit("TRAIN.SYNC_BN needs CUDA GPUs (PyTorch's SyncBatchNorm runs only there); drop it on a CPU")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if runtime.distributed:
        device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    elif multi_gpu and torch.cuda.device_count() > 1:
        model = torch.nn.DataParallel(model)
    if cfg.TRAIN.COMPILE:
        model = torch.compile(model)
    return model


def load_data(args, cfg, objective, runtime):
    """Check the CSVs whole (and that they are one preprocessing run's split), then build (or reuse) the crop
    caches, before any training. A test CSV, where there is one, is checked too and scored once at the end."""
    split_record.check(args.data_dir, args.dataset)
    splits = TRAINING_SPLITS + (("test",) if csv_path(args.data_dir, args.dataset, "test").is_file() else ())
    records = {split: Records(csv_path(args.data_dir, args.dataset, split), args.data_dir, need_attributes=objective.multitask)
               for split in splits}
    for rec in records.values():
        if len(rec) == 0:
            raise DataError(f"{rec.path} has no rows: training needs faces in both the train and the valid CSV, the "
                            f"valid ones to score every epoch, and in a test CSV where there is one. Add rows, or "
                            f"split again with preprocessing/<name>.py")
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
                           batch_size=per_rank_batch, weights=age_balance_weights(records.age, cfg))
    per_sample_aug = cfg.TRAIN.AUG and cfg.AUG.BACKEND == "albumentations"
    if crops is not None and not per_sample_aug:
        return CachedBatches(records, crops, sampler, per_rank_batch, runtime), sampler
    augment = SeededPipeline(cfg.AUG, cfg.MODEL.IMG_SIZE) if per_sample_aug else None
    dataset = FaceDataset(records, cfg.MODEL.IMG_SIZE, cfg.DATA.EXPAND, augment=augment, crops=crops,
                          on_bad_image=cfg.DATA.ON_BAD_IMAGE, seed=cfg.TRAIN.SEED)
    return make_loader(dataset, sampler, per_rank_batch, cfg.TRAIN.WORKERS, runtime, seed=cfg.TRAIN.SEED), sampler


def age_balance_weights(ages, cfg):
    """Sampling weights (faces in the same TRAIN.AGE_BIN)^-TRAIN.BALANCE, or None for the plain shuffle."""
    if cfg.TRAIN.BALANCE == 0:
        return None
    bins = np.asarray(ages) // cfg.TRAIN.AGE_BIN
    counts = np.bincount(bins)
    return counts[bins].astype(np.float64) ** -cfg.TRAIN.BALANCE


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


def train_step(model, batch, objective, optimizer, scaler, runtime, cfg, augmenter=None, epoch=0):
    """Augment (on the device), forward, loss, backward and update for one batch; nothing here waits for the device.

    ``epoch`` and each sample's position in the epoch's order seed the augmentation. A non-finite loss is not looked
    at here: the loop's EpochTally notes it, and the loop stops at its next check-in, before anything is saved.
    """
    images = batch["image"].to(runtime.device, non_blocking=True)
    if augmenter is not None:
        images = augmenter(images, epoch, batch["position"])
    images = normalize(images, input_settings(cfg.MODEL.ARCH), channels_last=cfg.MODEL.CHANNELS_LAST)
    labels = {k: batch[k].to(runtime.device, non_blocking=True) for k in ("age", *ATTRIBUTE_HEADS)}
    with autocast(runtime, cfg.TRAIN.AMP):
        outputs = model(images)
        loss, _ = objective(outputs, labels)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss, outputs, labels


class EpochTally:
    """An epoch's running sums, kept on the training device, so that adding a step's numbers never waits for it.

    ``read`` fetches them in one transfer, at the loop's check-ins. The first step whose loss was not finite, and
    that loss, are kept on the device the same way, so the loop can name them without looking at every loss.
    """

    def __init__(self, device):
        self.seen = 0
        self.step = None  # the last step added, for the check-in's log
        self.sums = {}
        self.first_bad_step = torch.full((), -1.0, dtype=torch.float64, device=device)
        self.bad_loss = torch.zeros((), dtype=torch.float64, device=device)

    def add(self, loss, outputs, labels, step):
        with torch.no_grad():
            loss = loss.detach().double()
            mean, _ = expected_age(outputs["age"].detach())
            parts = {"loss": loss * len(mean), "error": (mean.double() - labels["age"].double()).abs().sum()}
            for head in ATTRIBUTE_HEADS:
                if head in outputs:
                    parts[head] = (outputs[head].detach().argmax(1) == labels[head]).sum().double()
            for name, value in parts.items():
                self.sums[name] = self.sums.get(name, 0.0) + value
            first = ~torch.isfinite(loss) & (self.first_bad_step < 0)
            self.first_bad_step = torch.where(first, float(step), self.first_bad_step)
            self.bad_loss = torch.where(first, loss, self.bad_loss)
        self.seen += len(mean)
        self.step = step

    def read(self):
        """The sums, the first non-finite step (-1: none) and its loss, as numbers: one wait for the device."""
        values = torch.stack([*self.sums.values(), self.first_bad_step, self.bad_loss]).tolist()
        return dict(zip([*self.sums, "first_bad_step", "bad_loss"], values))

    def summary(self, values):
        """Mean loss, MAE and head accuracies over the faces seen, from ``read``'s numbers."""
        seen = max(self.seen, 1)
        return {"train_loss": values.get("loss", 0.0) / seen, "train_mae": values.get("error", 0.0) / seen,
                **{f"train_{head}_accuracy": values[head] / seen for head in ATTRIBUTE_HEADS if head in values}}


def check_in(run, tally, epoch, bar):
    """Every LOG_EVERY_STEPS steps, at the epoch's end and before stopping: read the running sums, stop on a
    non-finite loss, show the means so far. Under DDP the ranks agree, in one all-reduce, on a non-finite loss and
    on a stop signal.

    Returns the epoch's summary and whether a signal (to any rank) asks to stop.
    """
    values = tally.read()
    stop, diverged = agree_any(run.runtime, run.stop.signal is not None, values["first_bad_step"] >= 0)
    if diverged:
        stop_on_non_finite_loss(run, values, epoch)
    if stop:
        run.stop.signal = run.stop.signal or "a signal to another rank"
    summary = tally.summary(values)
    if run.tensorboard is not None and tally.step is not None:
        run.tensorboard.check_in(global_step(run, epoch, tally.step), summary, run.optimizer.param_groups[0]["lr"])
    bar.set_postfix(loss=f"{summary['train_loss']:.3f}", mae=f"{summary['train_mae']:.2f}", refresh=False)
    return summary, stop


def global_step(run, epoch, step):
    """Steps taken since the run began, after ``step`` (0-based) of ``epoch``: TensorBoard's x axis."""
    return epoch * steps_in_epoch(len(run.records["train"]), run.cfg.TRAIN.BATCH_SIZE) + step + 1


def stop_on_non_finite_loss(run, values, epoch):
    """Stop every rank at once, with one message naming the first step whose loss was not finite on any rank.

    Nothing of this epoch is saved: the last good checkpoint stays as it is.
    """
    firsts = [(step, loss) for step, loss in gather_objects(run.runtime, (values["first_bad_step"], values["bad_loss"]))
              if step >= 0]
    step, loss = min(firsts)
    teardown(run.runtime)
    if not run.runtime.is_main:
        raise SystemExit(1)
    raise TrainingError(
        f"loss became {loss} at epoch {epoch + 1}, step {int(step) + 1}; training stopped and the last good "
        f"checkpoint was kept. Try a lower TRAIN.LR, or TRAIN.AMP off."
    )


def step_votes(run, empty):
    """(stop now, skip this batch), before a step.

    In one process both are known for free. Under DDP the ranks must agree, and an all-reduce waits for the
    device, so it is taken every step only when a batch can lose all its images (DATA.ON_BAD_IMAGE skip); a stop
    signal otherwise waits for the next check-in, where every rank stops at the same step.
    """
    if not run.runtime.distributed:
        return run.stop.signal is not None, empty
    if run.cfg.DATA.ON_BAD_IMAGE == "skip":
        return agree_any(run.runtime, run.stop.signal is not None, empty)
    return False, empty


def train_one_epoch(run, epoch, start_step):
    """One pass over this rank's training shard; (mean loss, MAE and head accuracies, step), or (None, step) when stopped.

    ``step`` counts the batches taken from the sampler, a batch whose images were all skipped included, so that a
    resumed run skips exactly the faces this one went through.
    """
    run.model.train()
    tally = EpochTally(run.runtime.device)
    step, skipped = start_step, 0
    bar = tqdm(run.batches, desc=f"epoch {epoch + 1}/{run.cfg.TRAIN.EPOCHS}", unit="batch", disable=not run.runtime.is_main,
               dynamic_ncols=True, mininterval=1 if sys.stderr.isatty() else 30, initial=start_step,
               total=start_step + len(run.batches))
    for batch in bar:
        skipped += batch.pop("skipped")
        stopping, empty = step_votes(run, "image" not in batch)
        if (stopping or (step > start_step and step % LOG_EVERY_STEPS == 0)) and check_in(run, tally, epoch, bar)[1]:
            bar.close()
            return None, step
        if not empty:
            loss, outputs, labels = train_step(run.model, batch, run.objective, run.optimizer, run.scaler, run.runtime,
                                               run.cfg, run.augmenter, epoch)
            if run.ema is not None:
                run.ema.update_parameters(unwrap(run.model))
            tally.add(loss, outputs, labels, step)
        step += 1
    summary, _ = check_in(run, tally, epoch, bar)
    bar.close()
    if skipped and run.runtime.is_main:
        print(f"epoch {epoch + 1}: skipped {skipped} unreadable images (DATA.ON_BAD_IMAGE skip)")
    return summary, step


def agree_any(runtime, *flags):
    """Each flag, True on every rank when it is True on any (one all-reduce); the flags as they are in one process."""
    if not runtime.distributed:
        return flags
    votes = torch.tensor([float(flag) for flag in flags], device=runtime.device)
    torch.distributed.all_reduce(votes, op=torch.distributed.ReduceOp.MAX)
    return tuple(bool(vote) for vote in votes.tolist())


def make_ema(model, cfg, resumed):
    """The exponential moving average of the weights for TRAIN.EMA > 0, else None.

    A resumed run continues the average it saved. Its BatchNorm statistics are recomputed for the averaged weights
    before they are scored or saved (refresh_statistics).
    """
    if cfg.TRAIN.EMA == 0:
        return None
    ema = WeightAverage(unwrap(model), cfg.TRAIN.EMA)
    if resumed and "ema_updates" in resumed:
        ema.module.load_state_dict(resumed["state_dict"])
        ema.updates = resumed["ema_updates"]
    return ema


class WeightAverage:
    """An exponential moving average of a model's weights and floating-point buffers, updated by one foreach lerp.

    torch's AveragedModel computes the same, but keeps its count of updates in a tensor that it reads or copies to
    the device on every update, which makes a GPU's host wait each step; here the count is a host int.
    """

    def __init__(self, model, decay):
        self.module = copy.deepcopy(model).requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update_parameters(self, model):
        pairs = zip([*self.module.parameters(), *self.module.buffers()], [*model.parameters(), *model.buffers()])
        averaged, copied = [], []  # copied: everything at the first update, then counters (num_batches_tracked)
        for ours, theirs in pairs:
            (averaged if self.updates and ours.is_floating_point() else copied).append((ours, theirs))
        if averaged:
            torch._foreach_lerp_([ours for ours, _ in averaged], [theirs for _, theirs in averaged], 1.0 - self.decay)
        for ours, theirs in copied:
            ours.copy_(theirs)
        self.updates += 1


class StatisticsCrops:
    """The training crops that give the scored weights their BatchNorm statistics: BN_STATISTICS_FACES of them, evenly
    spread over the training CSV, without augmentation, the same ones every time; uint8 batches.

    Batches are this rank's share of TRAIN.BATCH_SIZE, which its memory holds in training (every rank reads all the
    crops). A last batch of one face joins the one before it: BatchNorm in training mode cannot normalise a single
    value per channel, as one face gives on 1x1 maps (TinyAgeNet at 16 px).
    """

    def __init__(self, records, crops, cfg, runtime):
        count = min(BN_STATISTICS_FACES, len(records))
        self.indices = np.unique(np.linspace(0, len(records) - 1, count).round().astype(np.int64))
        self.dataset = FaceDataset(records, cfg.MODEL.IMG_SIZE, cfg.DATA.EXPAND, crops=crops,
                                   on_bad_image=cfg.DATA.ON_BAD_IMAGE)
        self.batch_size = rank_batch_size(cfg, runtime)

    def batches(self):
        """The crops' indices, cut into batches."""
        starts = list(range(0, len(self.indices), self.batch_size))
        if len(starts) > 1 and len(self.indices) - starts[-1] == 1:
            starts.pop()
        return np.split(self.indices, starts[1:])

    def __iter__(self):
        for indices in self.batches():
            batch = collate([self.dataset[int(index)] for index in indices])
            if "image" in batch:
                yield batch["image"]


class LayerInputs:
    """Per-channel mean and variance of everything one BatchNorm layer is fed, batch after batch, each value counting
    once however the batches are cut: each batch's mean and squared deviations, merged in float64 by Chan, Golub and
    LeVeque's pairwise update. A forward pre-hook."""

    def __init__(self):
        self.count, self.mean, self.squares = 0, 0.0, 0.0

    def __call__(self, _layer, inputs):
        values = inputs[0].detach().float()
        variance, mean = torch.var_mean(values, dim=[0, *range(2, values.dim())], correction=0)
        count = values.numel() // values.shape[1]
        total = self.count + count
        delta = mean.double() - self.mean
        self.mean = self.mean + delta * (count / total)
        self.squares = self.squares + variance.double() * count + delta**2 * (self.count * count / total)
        self.count = total

    def store(self, layer):
        """Into the layer's running statistics, as BatchNorm keeps them: the mean and the unbiased variance."""
        layer.running_mean.copy_(self.mean)
        layer.running_var.copy_(self.squares / max(self.count - 1, 1))


def batchnorm_layers(model):
    """The BatchNorm layers (SyncBatchNorm included) that keep running statistics."""
    return [layer for layer in model.modules()
            if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm) and layer.track_running_stats]


def precise_batchnorm(model, batches):
    """Set every BatchNorm layer's running statistics to the mean and variance of its inputs over ``batches``, with
    the model in training mode (each batch normalised by its own statistics, as in training)."""
    layers = batchnorm_layers(model)
    inputs = [LayerInputs() for _ in layers]
    hooks = [layer.register_forward_pre_hook(statistics) for layer, statistics in zip(layers, inputs)]
    was_training = model.training
    try:
        for layer in layers:
            layer.reset_running_stats()  # num_batches_tracked then counts these batches, whatever came before
        model.train()
        for images in batches:
            model(images)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    for layer, statistics in zip(layers, inputs):
        if statistics.count:  # a layer that saw no face (every crop unreadable) keeps reset statistics
            statistics.store(layer)


def refresh_statistics(run):
    """Give the weights that are scored and saved BatchNorm statistics of their own ("precise BN").

    Running statistics are a moving average over the last few dozen training batches, each taken with the weights
    of its step. While the weights still move (the last epoch of a 3-epoch cosine run trains at a quarter of
    TRAIN.LR), the average trails them: in the per-sample path's run of issue 21 the saved statistics scored 10.13
    where the same final weights with statistics of their own scored 9.13-9.19, and the batch path's saved
    statistics were off by up to 0.18 either way. The statistics are recomputed from scratch, as the mean and
    variance of each layer's inputs over all of StatisticsCrops' faces (read once, whether one model or two), each
    face weighing alike whatever the batch it came in, for the averaged weights (TRAIN.EMA) and the raw ones alike,
    with the RNG put back afterwards, so that a run killed and resumed still ends bit-identical. In training mode
    BatchNorm normalises with each batch's own statistics, so this changes nothing the optimizer sees. A model
    without BatchNorm has nothing to recompute.
    """
    models = [model for model in [unwrap(run.model)] + ([run.ema.module] if run.ema is not None else [])
              if batchnorm_layers(model)]
    if not models:
        return
    settings, device = input_settings(run.cfg.MODEL.ARCH), run.runtime.device
    generators = [device] if device.type == "cuda" else []
    batches = list(run.statistics_crops)
    for model in models:
        inputs = (normalize(images.to(device, non_blocking=True), settings, channels_last=run.cfg.MODEL.CHANNELS_LAST)
                  for images in batches)
        with torch.random.fork_rng(devices=generators), torch.no_grad(), autocast(run.runtime, run.cfg.TRAIN.AMP):
            precise_batchnorm(model, inputs)


def scored_model(model, ema):
    """What validation scores and the checkpoint ships: the averaged weights when TRAIN.EMA is on."""
    return ema.module if ema is not None else unwrap(model)


def share_buffers(model, runtime):
    """Give every rank rank 0's buffers bit for bit: each rank recomputes the statistics from the same crops, but a
    model without BatchNorm keeps the running statistics its own last step left, and ranks on different devices
    may round apart; either way the ranks would validate their shards with models other than the one rank 0 saves."""
    if runtime.distributed:
        for buffer in unwrap(model).buffers():
            torch.distributed.broadcast(buffer, src=0)


def make_state(run, epoch, step, interrupted):
    """Everything val.py and demo.py need to rebuild the model, and --resume needs to continue exactly.

    With TRAIN.EMA, ``state_dict`` holds the averaged weights (what val.py and demo.py load) and
    ``train_state_dict`` the weights the optimizer is stepping.
    """
    cfg = run.cfg
    averaged = {} if run.ema is None else {"train_state_dict": unwrap(run.model).state_dict(),
                                           "ema_updates": run.ema.updates}
    return {
        **averaged,
        "state_dict": scored_model(run.model, run.ema).state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "epoch": epoch,
        "step": step,
        "best_metric": run.best,
        "metrics": {k: v for k, v in (run.result or {}).items() if isinstance(v, (int, float))},
        "config": cfg_to_dict(cfg),
        "objective": run.objective.name,
        "arch": cfg.MODEL.ARCH,
        "img_size": cfg.MODEL.IMG_SIZE,
        "expand": cfg.DATA.EXPAND,
        "input": input_settings(cfg.MODEL.ARCH),
        "amp": resolve_amp(cfg.TRAIN.AMP, run.runtime.device),
        "dataset": run.args.dataset,
        "rng": rng_state(),
        "interrupted": interrupted,
        "record": run.record,
    }


def check_resume(args, resumed, cfg, objective_name):
    """Refuse a checkpoint of another objective, without training state, or whose weights do not fit, before any long work."""
    if resumed is None:
        return
    check_training_state(args.resume, resumed)
    if resumed["objective"] != objective_name:
        raise SystemExit(f"{args.resume} was trained with the {resumed['objective']!r} objective; resume it with that script")
    with torch.device("meta"):  # shapes only: no weights are made
        model = build_model(cfg.MODEL.ARCH, multitask=OBJECTIVES[objective_name].multitask, width=cfg.MODEL.WIDTH)
    check_resumable(args.resume, resumed, model, cfg.MODEL.ARCH)


def nothing_left_to_do(args, cfg, resumed):
    """A resumed run that has finished TRAIN.EPOCHS: say so plainly, and fit() returns (exit status 0)."""
    if resumed is None:
        return None
    done = resumed["scheduler"]["last_epoch"]  # the scheduler steps once per finished epoch
    if done < cfg.TRAIN.EPOCHS:
        return None
    print(f"nothing to do: {args.resume} has finished {done} epochs and TRAIN.EPOCHS is {cfg.TRAIN.EPOCHS}. "
          f"To train longer, resume with a larger TRAIN.EPOCHS, e.g. TRAIN.EPOCHS {done + 10}.")
    return {"best": resumed["best_metric"], "last": None, "checkpoint_dir": str(args.checkpoint)}


@contextlib.contextmanager
def sigterm_unwinds():
    """SIGTERM before the loop's StopRequest takes over ends the run as Ctrl-C does, by an exception, not by the
    default instant death: the folder's lock file is then removed on the way out, not left with a dead pid."""
    def stop(_signum, _frame):
        raise TrainingError("SIGTERM received before the first training step: stopped, nothing saved")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def claim_checkpoint_dir(args, runtime, cleanup):
    """Check the folder is writable and lock it for the run's lifetime; never mix two runs' files in it.

    Returns the files of the run that --overwrite replaces. They are deleted only when this run writes its first
    file (see save), so a run refused by its checks, or stopped before its first checkpoint, leaves them whole.
    """
    if not runtime.is_main:
        return []
    folder = check_output_dir(args.checkpoint, "--checkpoint")
    cleanup.enter_context(folder_lock(folder))
    cleanup.enter_context(sigterm_unwinds())
    present = [name for name in RUN_FILES if (folder / name).exists()]
    continuing = args.resume is not None and Path(args.resume).resolve().parent == folder.resolve()
    if continuing and args.overwrite:
        raise SystemExit(
            f"--overwrite would delete the run that --resume {args.resume} continues, before it is read. Drop "
            f"--overwrite to continue that run in {folder}, or pass another --checkpoint folder for a new run from it."
        )
    if present and not (continuing or args.overwrite):
        raise SystemExit(
            f"{folder} already holds a run ({', '.join(present)}). Continue it with --resume {folder / LAST_NAME}, "
            f"pass another --checkpoint folder, or pass --overwrite to replace that run's files."
        )
    remove_stale_temp_files(folder, RUN_FILES)
    if not args.overwrite:
        return []
    return [folder / name for name in present] + [folder / name for name in RUN_FOLDERS if (folder / name).is_dir()]


def warn_random_init(cfg, resumed, runtime):
    warning = random_init_warning(cfg.MODEL.ARCH)
    if warning and not (resumed or pretrained_source(cfg.MODEL.ARCH, cfg.MODEL.PRETRAINED)) and runtime.is_main:
        print(warning, file=sys.stderr, flush=True)


def apply_schedule_overrides(optimizer, scheduler, cfg, saved):
    """Put this command line's learning-rate settings into the restored optimizer and scheduler, which keep their own.

    Untouched when nothing changed, so that a plain resume stays bit-exact.
    """
    changed = [key for key in SCHEDULE_KEYS[cfg.TRAIN.SCHEDULER] if config_value(cfg, key) != config_value(saved, key)]
    if not changed:
        return
    scheduler.base_lrs = [cfg.TRAIN.LR * group.get("lr_scale", 1.0) for group in optimizer.param_groups]
    if cfg.TRAIN.SCHEDULER == "cosine":
        scheduler.T_max = cfg.TRAIN.EPOCHS
    else:
        scheduler.step_size, scheduler.gamma = cfg.TRAIN.LR_DECAY_STEP, cfg.TRAIN.LR_DECAY_RATE
    lr = scheduled_lr(cfg, scheduler.last_epoch)
    for group in optimizer.param_groups:
        scale = group.get("lr_scale", 1.0)
        group.update(lr=lr * scale, initial_lr=cfg.TRAIN.LR * scale, weight_decay=cfg.TRAIN.WEIGHT_DECAY)
        if "momentum" in group:
            group["momentum"] = cfg.TRAIN.MOMENTUM
    print(f"changed on resume: {', '.join(f'{key} {config_value(saved, key)} -> {config_value(cfg, key)}' for key in changed)}; "
          f"the learning rate continues at {lr:.6g}")


def scheduled_lr(cfg, epochs_done):
    """The learning rate of the epoch after ``epochs_done`` finished ones, in closed form."""
    if cfg.TRAIN.SCHEDULER == "cosine":
        return cfg.TRAIN.LR * (1 + math.cos(math.pi * epochs_done / cfg.TRAIN.EPOCHS)) / 2
    return cfg.TRAIN.LR * cfg.TRAIN.LR_DECAY_RATE ** (epochs_done // cfg.TRAIN.LR_DECAY_STEP)


def resumed_best(resumed, checkpoint_dir, rule):
    """The best metric so far, from the resumed checkpoint and best.pth, whichever is better.

    best.pth is written before last.pth: after a crash between the two it is an
    epoch ahead of last.pth, and the redone epoch must not replace it unless it beats it.
    ``checkpoint_dir`` is None when --overwrite replaces the folder's run, whose best.pth is not this run's.
    """
    if resumed is None:
        return None
    best = resumed["best_metric"]
    path = None if checkpoint_dir is None else Path(checkpoint_dir) / BEST_NAME
    if path is not None and path.is_file():
        recorded = load_state(path).get("best_metric")
        if recorded is not None and is_better(recorded, best, rule):
            best = recorded
    return best


def steps_in_epoch(faces, batch_size):
    """Steps of an epoch over ``faces`` training faces in global batches of ``batch_size``: EpochSampler drops the
    incomplete last batch unless it is the only one."""
    return max(1, faces // batch_size)


def resume_position(args, resumed, faces, batch_size):
    """(epoch, step within it) to continue at; a checkpoint saved at an epoch's end continues at the next.

    A mid-epoch checkpoint's step counts global batches of its own TRAIN.BATCH_SIZE (whatever the number of
    processes). With a new size the resumed run skips the same faces, which must make whole batches of it.
    """
    if resumed is None:
        return 0, 0
    epoch, step = resumed["epoch"], resumed.get("step", 0)
    saved_batch = checkpoint_cfg(resumed).TRAIN.BATCH_SIZE
    if step >= steps_in_epoch(faces, saved_batch):
        return epoch + 1, 0
    done = step * saved_batch
    if done % batch_size:
        raise SystemExit(
            f"{args.resume} stopped in epoch {epoch + 1} after {done} faces, in batches of {saved_batch}; with "
            f"TRAIN.BATCH_SIZE {batch_size} the run cannot continue at the same face. Resume with TRAIN.BATCH_SIZE "
            f"{saved_batch} (or a size that divides {done}) and change it from the checkpoint of the epoch's end."
        )
    return epoch, done // batch_size


def fit(objective_name, argv=None):
    """Train; the folder lock and the signal handlers are released however the run ends."""
    with contextlib.ExitStack() as cleanup:
        return run_training(objective_name, argv, cleanup)


@dataclasses.dataclass
class Run:
    """A training run's moving parts, so that the loop's functions take one argument instead of a dozen."""

    args: argparse.Namespace
    cfg: object
    runtime: object
    objective: object
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: object
    ema: object
    augmenter: object
    records: dict
    batches: object
    sampler: EpochSampler
    valid_loader: object
    rule: tuple
    stop: StopRequest
    replaced: list
    statistics_crops: StatisticsCrops
    best: float = None
    result: dict = None
    pace: RunPace = None
    record: dict = None
    tensorboard: object = None

    @property
    def checkpoint_dir(self):
        return Path(self.args.checkpoint)


def build_run(args, cfg, resumed, objective, runtime, records, crops, replaced):
    """The model (restored when resuming), its optimizer, schedule, average and the batches it trains on.

    ``replaced``: the old run's files that --overwrite deletes when this run writes its first file.
    """
    model = prepare_model(cfg, objective, runtime)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    scaler = torch.amp.GradScaler("cuda", enabled=resolve_amp(cfg.TRAIN.AMP, runtime.device) == "fp16")
    if resumed:
        model.load_state_dict(resumed.get("train_state_dict", resumed["state_dict"]))
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        apply_schedule_overrides(optimizer, scheduler, cfg, checkpoint_cfg(resumed))
        scaler.load_state_dict(resumed.get("scaler", {}) or scaler.state_dict())
    ema = make_ema(model, cfg, resumed)
    model = wrap_model(model, cfg, runtime, args.multi_gpu)
    batches, sampler = training_batches(records["train"], crops["train"], cfg, runtime)
    rule = best_rule(args.dataset)
    return Run(args, cfg, runtime, objective, model, optimizer, scheduler, scaler, ema, batch_augmenter(cfg), records,
               batches, sampler, evaluation_loader(records["valid"], cfg, runtime, crops=crops["valid"]), rule,
               StopRequest(), replaced, StatisticsCrops(records["train"], crops["train"], cfg, runtime),
               best=resumed_best(resumed, None if args.overwrite else args.checkpoint, rule))


def save(run, epoch, step, interrupted, is_best=False):
    """Rank 0 writes last.pth (and best.pth); the other ranks write nothing and get None.

    The first save deletes the run that --overwrite replaces: this run's first file is written right after.
    """
    if not run.runtime.is_main:
        return None
    for path in run.replaced:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    run.replaced = []
    atomic_write(run.checkpoint_dir / run_record.RECORD_NAME, json.dumps(run.record, indent=2) + "\n")
    return save_checkpoint(make_state(run, epoch, step, interrupted), run.checkpoint_dir, is_best)


def validate(run):
    """Score the validation CSV with the weights that ship (the average under TRAIN.EMA), and the raw ones too."""
    refresh_statistics(run)
    scored = scored_model(run.model, run.ema)
    share_buffers(scored, run.runtime)
    result = metrics(score_model(scored, run.valid_loader, run.runtime, run.cfg, tta=run.cfg.TEST.TTA), run.records["valid"])
    if run.ema is not None:
        share_buffers(run.model, run.runtime)
        raw = score_model(unwrap(run.model), run.valid_loader, run.runtime, run.cfg, tta=run.cfg.TEST.TTA,
                          desc="validate raw weights")
        result["raw_mae"] = metrics(raw, run.records["valid"])["mae"]
    return result


def log_epoch(run, epoch, summary, lr, improved, started):
    """history.csv's row, curves.png and the printed line of a finished epoch (rank 0 only)."""
    if not run.runtime.is_main:
        return
    result, cfg = run.result, run.cfg
    append_history(run.checkpoint_dir, {"epoch": epoch + 1, "lr": lr, **summary, **result, "seconds": time.time() - started})
    write_curves(run.checkpoint_dir, *run.rule)
    pace, slowdown = run.pace.epoch_done(epoch, time.time() - started)
    if run.tensorboard is not None:
        run.tensorboard.epoch(epoch + 1, result)
    print(f"epoch {epoch + 1}/{cfg.TRAIN.EPOCHS}: train loss {summary['train_loss']:.3f} MAE {summary['train_mae']:.2f} | "
          f"valid MAE {result['mae']:.3f} CA(3) {result['ca3']:.3f} CA(5) {result['ca5']:.3f} CA(7) {result['ca7']:.3f}"
          + (f" (raw weights: MAE {result['raw_mae']:.3f})" if "raw_mae" in result else "")
          + f"{' (best)' if improved else ''} | {time.time() - started:.0f}s, {pace}", flush=True)
    if slowdown:
        print(slowdown, file=sys.stderr, flush=True)


def run_epoch(run, epoch, start_step, steps_per_epoch):
    """Train, validate, checkpoint and log one epoch; stop (with a checkpoint) when a signal asked for it."""
    started = time.time()
    run.sampler.set_epoch(epoch, skip=start_step * run.sampler.batch_size)
    summary, step = train_one_epoch(run, epoch, start_step)
    if summary is None:
        refresh_statistics(run)
        path = save(run, epoch, step, interrupted=True)
        teardown(run.runtime)
        raise SystemExit(EXIT_INTERRUPTED) if path is None else TrainingError(
            f"stopped by {run.stop.signal} at epoch {epoch + 1}, step {step}; saved {path}. Continue with --resume {path}")
    run.pace.trained(step - start_step, time.time() - started)
    run.result = validate(run)
    lr = run.optimizer.param_groups[0]["lr"]  # the rate this epoch trained with, before the scheduler moves it
    run.scheduler.step()
    improved = is_better(run.result[run.rule[0]], run.best, run.rule)
    if improved:
        run.best = run.result[run.rule[0]]
    save(run, epoch, steps_per_epoch, interrupted=run.stop.signal is not None, is_best=improved)
    log_epoch(run, epoch, summary, lr, improved, started)
    if agree_any(run.runtime, run.stop.signal is not None)[0]:
        run.stop.signal = run.stop.signal or "a signal to another rank"
        teardown(run.runtime)
        raise TrainingError(f"stopped by {run.stop.signal} after epoch {epoch + 1}; continue with --resume "
                            f"{run.checkpoint_dir / LAST_NAME}")


def score_best_on_test(run):
    """Score best.pth, the epoch chosen on valid, once on the test CSV: TEST_REPORT_DIR/report.json (with errors.csv
    and the plots) says which split and rule chose it and that epoch's valid figures, beside the test ones."""
    best = load_model_file(run.checkpoint_dir / BEST_NAME)
    metric, pick = run.rule
    chosen = best.state["metrics"]
    selection = {"split": "valid", "rule": f"{pick.__name__} {metric}", "epoch": best.state["epoch"] + 1,
                 "valid": {key: chosen.get(key) for key in ("n", "mae", "ca3", "ca5", "ca7")}}
    output_dir = run.checkpoint_dir / TEST_REPORT_DIR
    if run.runtime.is_main:
        output_dir.mkdir(exist_ok=True)
        print(f"\nthe model chosen on valid (best {metric}, epoch {selection['epoch']}), scored once on test:")
    evaluate(best, best.cfg, run.records["test"], run.runtime, output_dir, (run.args.dataset, "test"),
             tta=run.cfg.TEST.TTA, extra={"model_selection": selection})


def run_training(objective_name, argv, cleanup):
    args = build_parser(objective_name).parse_intermixed_args(argv)
    cfg, resumed = load_config(args)
    objective = OBJECTIVES[objective_name](cfg)
    check_resume(args, resumed, cfg, objective_name)
    finished = nothing_left_to_do(args, cfg, resumed)
    if finished:
        return finished
    runtime = setup_runtime(args.device)
    replaced = claim_checkpoint_dir(args, runtime, cleanup)
    warn_random_init(cfg, resumed, runtime)
    seed_everything(cfg.TRAIN.SEED, cfg.TRAIN.DETERMINISTIC)
    records, crops = load_data(args, cfg, objective, runtime)
    start_epoch, start_step = resume_position(args, resumed, len(records["train"]), cfg.TRAIN.BATCH_SIZE)
    run = build_run(args, cfg, resumed, objective, runtime, records, crops, replaced)
    steps_per_epoch = math.ceil(len(run.sampler) / run.sampler.batch_size)
    run.pace = RunPace(cfg.TRAIN.EPOCHS, steps_per_epoch, cfg.TRAIN.BATCH_SIZE)
    if resumed:
        set_rng_state(resumed["rng"])
    if runtime.is_main:
        print(f"{cfg.MODEL.ARCH} ({count_parameters(unwrap(run.model)) / 1e6:.2f} M parameters), objective {objective_name}, "
              f"{cfg.MODEL.IMG_SIZE}px, on {runtime.device}" + (f" x{runtime.world_size} processes" if runtime.distributed else "")
              + f" in {precision_name(cfg.TRAIN.AMP, runtime.device)} (TRAIN.AMP {cfg.TRAIN.AMP})"
              + (f"; resuming at epoch {start_epoch + 1}, step {start_step}" if resumed else ""))
        print(run_files(args.checkpoint, Path(args.checkpoint) / CACHE_FOLDER if cfg.DATA.CACHE else None))
    run.record = run_record.collect(sys.argv[1:] if argv is None else argv, cfg_to_dict(cfg), args.data_dir,
                                    args.dataset, runtime.device, resolve_amp(cfg.TRAIN.AMP, runtime.device))
    run.tensorboard = open_log(cfg.LOG.TENSORBOARD, run.checkpoint_dir, runtime.is_main)
    if run.tensorboard is not None:
        cleanup.callback(run.tensorboard.close)
    run.stop.install()
    cleanup.callback(run.stop.restore)
    for epoch in range(start_epoch, cfg.TRAIN.EPOCHS):
        run_epoch(run, epoch, start_step if epoch == start_epoch else 0, steps_per_epoch)
    if runtime.is_main and run.result is not None:
        print(format_report(run.result, f"last epoch, {args.dataset} valid"))
        print(f"best {run.rule[0]} {run.best:.4f}: {run.checkpoint_dir / BEST_NAME}")
    if "test" in run.records:
        score_best_on_test(run)
    teardown(runtime)
    return {"best": run.best, "last": run.result, "checkpoint_dir": str(run.checkpoint_dir)}


def main(argv=None):
    return fit("cls", argv)


if __name__ == "__main__":
    main()
