"""Train an age estimator over ages 0..100 with cross-entropy (the classification objective).

    python train.py --data_dir D --dataset NAME [--checkpoint DIR] [--resume CKPT] [--multi_gpu] [--aug] [--expand E] [KEY VALUE ...]

train-ldl.py (DLDL-v2 label distributions) and train-mt.py (age + gender +
ethnicity) are this same loop with another objective. Any key of defaults.py
can follow the flags, e.g. ``MODEL.ARCH tinyage TRAIN.LR 0.01``. Several GPUs on
one machine: --multi_gpu; several processes or machines: torchrun.
"""
import argparse
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from checkpoint import BEST_NAME, checkpoint_cfg, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from dataset import FaceDataset, Records, build_crop_cache, csv_path, normalize
from defaults import cfg_to_dict, get_cfg_defaults, merge_opts
from history import append_history, write_curves
from model import build_model, count_parameters, input_settings, load_pretrained_backbone
from objectives import OBJECTIVES, expected_age
from runtime import (EpochSampler, autocast, crash_point, make_loader, resolve_amp, seed_everything, setup_runtime, teardown,
                     unwrap)
from val import evaluation_loader, format_report, metrics, predict

EXIT_INTERRUPTED = 130
# tests set this to a callable(loss, epoch, step) -> loss, to inject numerical faults
loss_hook = None


class TrainingError(SystemExit):
    """A run that cannot go on; a SystemExit so that the message is printed without a traceback."""


class StopRequest:
    """SIGINT/SIGTERM ask the loop to stop after the current step; a second signal exits at once."""

    def __init__(self):
        self.signal = None

    def install(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.handle)

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
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", required=True, help="folder with <dataset>_train_align.csv and <dataset>_valid_align.csv")
    parser.add_argument("--dataset", required=True,
                        help="data set name, the CSVs' prefix; names containing 'megaage' pick the best epoch by CA(3), others by MAE")
    parser.add_argument("--checkpoint", default="checkpoint",
                        help="folder for last.pth, best.pth, history.csv and the crop cache (default: checkpoint)")
    parser.add_argument("--resume", help="checkpoint to continue from, at its epoch, step and learning rate")
    parser.add_argument("--multi_gpu", action="store_true", help="DataParallel over all visible GPUs of this machine")
    parser.add_argument("--aug", action="store_true", help="augment training crops (flip, colour, gamma, small affine); sets TRAIN.AUG")
    parser.add_argument("--expand", type=float,
                        help="enlarge each face box by EXPAND/2 of its size per side before cropping; sets DATA.EXPAND (default 0)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="force a device (default: cuda when available)")
    parser.add_argument("opts", nargs="*", metavar="KEY VALUE", help="config overrides as KEY VALUE pairs, e.g. MODEL.ARCH tinyage TRAIN.LR 0.01")
    return parser


def load_config(args):
    """Defaults, or the resumed run's config, then the flags, then KEY VALUE overrides."""
    resumed = load_checkpoint(args.resume) if args.resume else None
    cfg = checkpoint_cfg(resumed) if resumed else get_cfg_defaults()
    if args.aug:
        cfg.TRAIN.AUG = True
    if args.expand is not None:
        cfg.DATA.EXPAND = args.expand
    merge_opts(cfg, args.opts)
    check_config(cfg)
    cfg.freeze()
    return cfg, resumed


def check_config(cfg):
    choices = {"TRAIN.OPT": ("adam", "adamw", "sgd"), "TRAIN.SCHEDULER": ("step", "cosine"),
               "TRAIN.AMP": ("auto", "bf16", "fp16", "off"), "DATA.ON_BAD_IMAGE": ("error", "skip")}
    for key, allowed in choices.items():
        section, name = key.split(".")
        if cfg[section][name] not in allowed:
            raise SystemExit(f"{key} is {cfg[section][name]!r}; choose one of {', '.join(allowed)}")
    if cfg.DATA.EXPAND < 0:
        raise SystemExit(f"--expand / DATA.EXPAND must be >= 0, not {cfg.DATA.EXPAND}")


def best_rule(dataset):
    """The original's rule: MegaAge data sets keep the best CA(3), the others the best MAE."""
    return ("ca3", max) if "megaage" in dataset.lower() else ("mae", min)


def is_better(value, best, rule):
    _, pick = rule
    return best is None or (value != best and pick(value, best) == value)


def build_optimizer(model, cfg):
    if cfg.TRAIN.OPT == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.TRAIN.LR, momentum=cfg.TRAIN.MOMENTUM,
                               weight_decay=cfg.TRAIN.WEIGHT_DECAY)
    if cfg.TRAIN.OPT == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.TRAIN.LR, weight_decay=cfg.TRAIN.WEIGHT_DECAY)
    return torch.optim.Adam(model.parameters(), lr=cfg.TRAIN.LR, weight_decay=cfg.TRAIN.WEIGHT_DECAY)


def build_scheduler(optimizer, cfg):
    if cfg.TRAIN.SCHEDULER == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.TRAIN.EPOCHS)
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.TRAIN.LR_DECAY_STEP, gamma=cfg.TRAIN.LR_DECAY_RATE)


def prepare_model(cfg, objective, runtime):
    model = build_model(cfg.MODEL.ARCH, multitask=objective.multitask)
    if cfg.MODEL.PRETRAINED:
        loaded = load_pretrained_backbone(model, cfg.MODEL.PRETRAINED, cfg.MODEL.PRETRAINED_SHA256)
        if runtime.is_main:
            print(f"loaded {loaded} pretrained tensors from {cfg.MODEL.PRETRAINED}")
    model.to(runtime.device)
    if cfg.MODEL.CHANNELS_LAST:
        model.to(memory_format=torch.channels_last)
    return model


def wrap_model(model, cfg, runtime, multi_gpu):
    """DDP under torchrun, DataParallel for --multi_gpu, optionally compiled."""
    if runtime.distributed:
        device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    elif multi_gpu and torch.cuda.device_count() > 1:
        model = torch.nn.DataParallel(model)
    if cfg.TRAIN.COMPILE:
        model = torch.compile(model)
    return model


def load_data(args, cfg, objective, runtime):
    """Check both CSVs whole, then build (or reuse) the crop caches, before any training."""
    records = {split: Records(csv_path(args.data_dir, args.dataset, split), args.data_dir, need_attributes=objective.multitask)
               for split in ("train", "valid")}
    if len(records["train"]) == 0:
        raise SystemExit(f"{records['train'].path} has no rows to train on")
    if runtime.is_main:
        for split, rec in records.items():
            clamped = f", {rec.ages_out_of_range} ages outside 0..100 clamped" if rec.ages_out_of_range else ""
            print(f"{split}: {len(rec)} faces from {rec.path}{clamped}")
    crops = {split: None for split in records}
    if cfg.DATA.CACHE:
        cache_dir = Path(args.checkpoint) / "cache"
        for split, rec in records.items():
            if runtime.is_main:
                crops[split] = build_crop_cache(rec, cfg.MODEL.IMG_SIZE, cfg.DATA.EXPAND, cache_dir,
                                                os.cpu_count() or 1, f"{args.dataset}_{split}")
            if runtime.distributed:
                torch.distributed.barrier()
            if not runtime.is_main:
                crops[split] = build_crop_cache(rec, cfg.MODEL.IMG_SIZE, cfg.DATA.EXPAND, cache_dir, 0, f"{args.dataset}_{split}")
    return records, crops


def train_step(model, batch, objective, optimizer, scaler, runtime, cfg, position=(0, 0)):
    """Forward, loss, backward and update for one batch; refuses to apply a non-finite loss."""
    images = normalize(batch["image"].to(runtime.device, non_blocking=True), input_settings(cfg.MODEL.ARCH),
                       channels_last=cfg.MODEL.CHANNELS_LAST)
    labels = {k: batch[k].to(runtime.device, non_blocking=True) for k in ("age", "gender", "race")}
    with autocast(runtime, cfg.TRAIN.AMP):
        outputs = model(images)
        loss, _ = objective(outputs, labels)
    if loss_hook is not None:
        loss = loss_hook(loss, *position)
    if not torch.isfinite(loss):
        epoch, step = position
        raise TrainingError(
            f"loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}; training stopped and the last good "
            f"checkpoint was kept. Try a lower TRAIN.LR, or TRAIN.AMP off."
        )
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss, outputs, labels


def count_correct_heads(outputs, labels, correct):
    """Add a multitask model's right gender and ethnicity guesses to ``correct``: the original's per-epoch "accu"."""
    for head in ("gender", "race"):
        if head in outputs:
            correct[head] = correct.get(head, 0) + (outputs[head].detach().argmax(1) == labels[head]).sum().item()


def train_one_epoch(model, loader, objective, optimizer, scaler, runtime, cfg, epoch, start_step, stop):
    """One pass over the training shard; returns mean loss and MAE, or None when stopped early."""
    model.train()
    total_loss = total_error = seen = 0.0
    step = start_step
    skipped = 0
    correct = {}
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.TRAIN.EPOCHS}", unit="batch", disable=not runtime.is_main,
               dynamic_ncols=True, mininterval=1 if sys.stderr.isatty() else 30, initial=start_step,
               total=start_step + len(loader))
    for batch in bar:
        skipped += batch.pop("skipped")
        if "image" not in batch:
            continue
        loss, outputs, labels = train_step(model, batch, objective, optimizer, scaler, runtime, cfg, (epoch, step))
        step += 1
        crash_point("train", epoch, step)
        with torch.no_grad():
            mean, _ = expected_age(outputs["age"].detach())
            count = len(mean)
            total_loss += loss.item() * count
            total_error += (mean - labels["age"].float()).abs().sum().item()
            seen += count
            count_correct_heads(outputs, labels, correct)
        bar.set_postfix(loss=f"{total_loss / seen:.3f}", mae=f"{total_error / seen:.2f}", refresh=False)
        if stop.signal is not None:
            bar.close()
            return None, step
    bar.close()
    if skipped and runtime.is_main:
        print(f"epoch {epoch + 1}: skipped {skipped} unreadable images (DATA.ON_BAD_IMAGE skip)")
    return {"train_loss": total_loss / max(seen, 1), "train_mae": total_error / max(seen, 1),
            **{f"train_{head}_accuracy": hits / max(seen, 1) for head, hits in correct.items()}}, step


def make_state(model, optimizer, scheduler, scaler, cfg, objective, args, runtime, epoch, step, best, result, interrupted):
    """Everything val.py and demo.py need to rebuild the model, and --resume needs to continue exactly."""
    return {
        "state_dict": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": epoch,
        "step": step,
        "best_metric": best,
        "metrics": {k: v for k, v in (result or {}).items() if isinstance(v, (int, float))},
        "config": cfg_to_dict(cfg),
        "objective": objective.name,
        "arch": cfg.MODEL.ARCH,
        "img_size": cfg.MODEL.IMG_SIZE,
        "expand": cfg.DATA.EXPAND,
        "input": input_settings(cfg.MODEL.ARCH),
        "amp": resolve_amp(cfg.TRAIN.AMP, runtime.device),
        "dataset": args.dataset,
        "rng": rng_state(),
        "interrupted": interrupted,
    }


def resume_position(resumed, steps_per_epoch):
    """(epoch, step within it) to continue at; a checkpoint saved at an epoch's end continues at the next."""
    if resumed is None:
        return 0, 0
    epoch, step = resumed["epoch"], resumed.get("step", 0)
    if step >= steps_per_epoch:
        return epoch + 1, 0
    return epoch, step


def fit(objective_name, argv=None):
    args = build_parser(objective_name).parse_intermixed_args(argv)
    cfg, resumed = load_config(args)
    objective = OBJECTIVES[objective_name](cfg)
    if resumed and resumed["objective"] != objective_name:
        raise SystemExit(f"{args.resume} was trained with the {resumed['objective']!r} objective; resume it with that script")
    runtime = setup_runtime(args.device)
    seed_everything(cfg.TRAIN.SEED, cfg.TRAIN.DETERMINISTIC)
    records, crops = load_data(args, cfg, objective, runtime)

    model = prepare_model(cfg, objective, runtime)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    scaler = torch.amp.GradScaler("cuda", enabled=resolve_amp(cfg.TRAIN.AMP, runtime.device) == "fp16")
    if resumed:
        model.load_state_dict(resumed["state_dict"])
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        scaler.load_state_dict(resumed.get("scaler", {}) or scaler.state_dict())
    model = wrap_model(model, cfg, runtime, args.multi_gpu)

    train_set = FaceDataset(records["train"], cfg.MODEL.IMG_SIZE, cfg.DATA.EXPAND, augment=cfg.TRAIN.AUG,
                            crops=crops["train"], on_bad_image=cfg.DATA.ON_BAD_IMAGE, seed=cfg.TRAIN.SEED)
    per_rank_batch = max(1, cfg.TRAIN.BATCH_SIZE // runtime.world_size)
    sampler = EpochSampler(len(train_set), seed=cfg.TRAIN.SEED, rank=runtime.rank, world_size=runtime.world_size)
    drop_last = len(sampler) > per_rank_batch
    train_loader = make_loader(train_set, sampler, per_rank_batch, cfg.TRAIN.WORKERS, runtime, drop_last=drop_last,
                               seed=cfg.TRAIN.SEED)
    valid_loader = evaluation_loader(records["valid"], cfg, runtime, crops=crops["valid"])
    steps_per_epoch = len(sampler) // per_rank_batch if drop_last else math.ceil(len(sampler) / per_rank_batch)

    rule = best_rule(args.dataset)
    best = resumed["best_metric"] if resumed else None
    start_epoch, start_step = resume_position(resumed, steps_per_epoch)
    if resumed:
        set_rng_state(resumed["rng"])
    if runtime.is_main:
        print(f"{cfg.MODEL.ARCH} ({count_parameters(unwrap(model)) / 1e6:.2f} M parameters), objective {objective_name}, "
              f"{cfg.MODEL.IMG_SIZE}px, on {runtime.device}" + (f" x{runtime.world_size} processes" if runtime.distributed else "")
              + (f"; resuming at epoch {start_epoch + 1}, step {start_step}" if resumed else ""))
    stop = StopRequest()
    stop.install()
    checkpoint_dir = Path(args.checkpoint)
    result = None

    def save(epoch, step, interrupted, is_best=False):
        if runtime.is_main:
            state = make_state(model, optimizer, scheduler, scaler, cfg, objective, args, runtime, epoch, step, best, result,
                               interrupted)
            return save_checkpoint(state, checkpoint_dir, is_best)
        return None

    for epoch in range(start_epoch, cfg.TRAIN.EPOCHS):
        started = time.time()
        sampler.set_epoch(epoch, skip=start_step * per_rank_batch)
        summary, step = train_one_epoch(model, train_loader, objective, optimizer, scaler, runtime, cfg, epoch,
                                        start_step, stop)
        start_step = 0
        if summary is None:
            path = save(epoch, step, interrupted=True)
            teardown(runtime)
            raise SystemExit(EXIT_INTERRUPTED) if path is None else TrainingError(
                f"stopped by {stop.signal} at epoch {epoch + 1}, step {step}; saved {path}. "
                f"Continue with --resume {path}")
        predictions = predict(model, valid_loader, runtime, cfg, tta=cfg.TEST.TTA,
                          on_batch=lambda done, epoch=epoch: crash_point("validate", epoch, done))
        result = metrics(predictions, records["valid"])
        scheduler.step()
        value = result[rule[0]]
        improved = is_better(value, best, rule)
        if improved:
            best = value
        save(epoch, steps_per_epoch, interrupted=stop.signal is not None, is_best=improved)
        if runtime.is_main:
            row = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], **summary, **result, "seconds": time.time() - started}
            append_history(checkpoint_dir, row)
            write_curves(checkpoint_dir, *rule)
            print(f"epoch {epoch + 1}/{cfg.TRAIN.EPOCHS}: train loss {summary['train_loss']:.3f} MAE {summary['train_mae']:.2f} | "
                  f"valid MAE {result['mae']:.3f} CA(3) {result['ca3']:.3f} CA(5) {result['ca5']:.3f} CA(7) {result['ca7']:.3f}"
                  f"{' (best)' if improved else ''} | {time.time() - started:.0f}s", flush=True)
        if stop.signal is not None:
            teardown(runtime)
            raise TrainingError(f"stopped by {stop.signal} after epoch {epoch + 1}; continue with --resume {checkpoint_dir / 'last.pth'}")
    if runtime.is_main and result is not None:
        print(format_report(result, f"last epoch, {args.dataset} valid"))
        print(f"best {rule[0]} {best:.4f}: {checkpoint_dir / BEST_NAME}")
    teardown(runtime)
    return {"best": best, "last": result, "checkpoint_dir": str(checkpoint_dir)}


def main(argv=None):
    return fit("cls", argv)


if __name__ == "__main__":
    main()
