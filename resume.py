"""What --resume keeps, changes and refuses: the checkpoint must fit the run, the network and optimizer kind stay, a new
learning-rate schedule is put into the restored state, and the run continues at the very face where it stopped.
"""
import math
from pathlib import Path

import torch

from checkpoint import BEST_NAME, check_resumable, check_training_state, checkpoint_cfg, load_state
from defaults import config_value
from model import build_model
from objectives import OBJECTIVES
from scoring import is_better

# what the network is and sees, and the optimizer's kind and parameter groups (TRAIN.BACKBONE_LR decides whether the
# backbone has a group of its own, which the saved optimizer state must match): a resumed run keeps these values
FROZEN_ON_RESUME = ("MODEL.ARCH", "MODEL.WIDTH", "MODEL.IMG_SIZE", "MODEL.PRETRAINED", "MODEL.PRETRAINED_SHA256",
                    "DATA.EXPAND", "TRAIN.OPT", "TRAIN.SCHEDULER", "TRAIN.BACKBONE_LR")
# settings the restored optimizer and scheduler keep in their own state; changed on resume, they are put there
SCHEDULE_KEYS = {"step": ("TRAIN.LR", "TRAIN.MOMENTUM", "TRAIN.WEIGHT_DECAY", "TRAIN.LR_DECAY_STEP",
                          "TRAIN.LR_DECAY_RATE"),
                 "cosine": ("TRAIN.LR", "TRAIN.MOMENTUM", "TRAIN.WEIGHT_DECAY", "TRAIN.EPOCHS")}


def refuse_model_changes(path, saved, cfg):
    """A resumed run keeps its network, input crops and optimizer kind: the saved weights and state mean nothing
    otherwise."""
    for key in FROZEN_ON_RESUME:
        if config_value(cfg, key) != config_value(saved, key):
            raise SystemExit(
                f"{key} cannot change on --resume: {path} was trained with {config_value(saved, key)!r}, not "
                f"{config_value(cfg, key)!r}. Drop the override, or start a new run in another --checkpoint folder."
            )


def check_resume(args, resumed, cfg, objective_name):
    """Refuse a checkpoint of another objective, without training state, or whose weights do not fit, before any
    long work."""
    if resumed is None:
        return
    check_training_state(args.resume, resumed)
    if resumed["objective"] != objective_name:
        raise SystemExit(f"{args.resume} was trained with the {resumed['objective']!r} objective; "
                         f"resume it with that script")
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


def restore_training_state(resumed, model, optimizer, scheduler, scaler, cfg):
    """Put the resumed run's weights, optimizer, schedule and gradient scaler back, then this command line's
    learning-rate settings."""
    model.load_state_dict(resumed.get("train_state_dict", resumed["state_dict"]))
    optimizer.load_state_dict(resumed["optimizer"])
    scheduler.load_state_dict(resumed["scheduler"])
    apply_schedule_overrides(optimizer, scheduler, cfg, checkpoint_cfg(resumed))
    scaler.load_state_dict(resumed.get("scaler", {}) or scaler.state_dict())


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
    changes = ", ".join(f"{key} {config_value(saved, key)} -> {config_value(cfg, key)}" for key in changed)
    print(f"changed on resume: {changes}; "
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
