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
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from checkpoint import BEST_NAME, LAST_NAME, rng_state, save_checkpoint, set_rng_state
from config import load_config
from crop_cache import CACHE_FOLDER
from defaults import cfg_to_dict
from epoch_tally import EpochTally
from files import atomic_write
from evaluation import score_best_on_test
from history import append_history, write_curves
from model import (ATTRIBUTE_HEADS, build_model, count_parameters, input_settings, load_pretrained_backbone,
                   pretrained_source, random_init_warning)
from normalize import normalize
from objectives import OBJECTIVES, config_key_help
from optimization import build_optimizer, build_scheduler
from precise_bn import StatisticsCrops, refresh_statistics, share_buffers
from progress import RunPace, run_files
from resume import (check_resume, nothing_left_to_do, restore_training_state, resume_position, resumed_best,
                    steps_in_epoch)
from run_folder import claim_checkpoint_dir, delete_replaced
import run_record
from runtime import autocast, precision_name, resolve_amp, seed_everything, setup_runtime, teardown, unwrap
from scoring import best_rule, evaluation_loader, format_report, is_better, metrics, score_model
from stopping import (StopRequest, TrainingError, agree_any, step_votes, stop_after_epoch_if_asked,
                      stop_on_non_finite_loss)
from tensorboard_log import open_log
from training_data import batch_augmenter, load_data, rank_batch_size, training_batches
from weight_average import make_ema, scored_weights, weight_sets

EXIT_INTERRUPTED = 130
# the loop reads its running sums from the device (and looks for a non-finite loss, and under DDP the ranks agree
# on a stop signal) once every this many steps and at the epoch's end: each read waits for the device to finish
LOG_EVERY_STEPS = 20


def build_parser(objective):
    objective_line = {"cls": "with cross-entropy (the classification objective)",
                      "ldl": "with DLDL-v2: Gaussian label distributions, KL + L1 loss",
                      "mt": "jointly with gender and ethnicity (DLDL-v2 loss + two cross-entropies)"}[objective]
    script = OBJECTIVES[objective].script
    description = __doc__.replace("with cross-entropy (the classification objective)", objective_line)
    parser = argparse.ArgumentParser(prog=script, epilog=config_key_help(objective),
                                     description=description.replace("python train.py", f"python {script}"),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(objective=objective)
    parser.add_argument("--data_dir", required=True,
                        help="folder with <dataset>_train_align.csv and <dataset>_valid_align.csv")
    parser.add_argument("--dataset", required=True,
                        help="data set name, the CSVs' prefix; names containing 'megaage' pick the best epoch by "
                             "CA(3), others by MAE")
    parser.add_argument("--checkpoint", default="checkpoint",
                        help="folder for last.pth, best.pth, history.csv and the crop cache (default: checkpoint)")
    parser.add_argument("--config", metavar="FILE.yaml",
                        help="a recipe of config keys (see configs/), merged before the flags and KEY VALUE pairs, "
                             "which win")
    parser.add_argument("--resume", help="checkpoint to continue from, at its epoch, step and learning rate; MODEL.* "
                                         "and --expand cannot change, a new TRAIN.LR or schedule is applied")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run already in --checkpoint (its last.pth, best.pth, history.csv, "
                             "run_record.json, test/ and tensorboard/, deleted when the new run saves its first "
                             "checkpoint; the crop cache and other files stay); without it, a fresh run refuses a "
                             "folder that holds one. Not with --resume of a file in that folder")
    parser.add_argument("--multi_gpu", action="store_true", help="DataParallel over all visible GPUs of this machine")
    parser.add_argument("--aug", action="store_true",
                        help="augment training crops (flip, colour, gamma, small affine); sets TRAIN.AUG")
    parser.add_argument("--expand", type=float,
                        help="enlarge each face box by EXPAND/2 of its size per side before cropping; sets DATA.EXPAND "
                             "(default 0)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="force a device (default: cuda when available)")
    parser.add_argument("opts", nargs="*", metavar="KEY VALUE",
                        help="config overrides as KEY VALUE pairs, e.g. MODEL.ARCH tinyage TRAIN.LR 0.01")
    return parser


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
    """DDP under torchrun (with synchronised BatchNorm when asked), DataParallel for --multi_gpu, maybe compiled."""
    if runtime.distributed and cfg.TRAIN.SYNC_BN:
        if runtime.device.type != "cuda":
            raise SystemExit("TRAIN.SYNC_BN needs CUDA GPUs (PyTorch's SyncBatchNorm runs only there); "
                             "drop it on a CPU")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if runtime.distributed:
        device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    elif multi_gpu and torch.cuda.device_count() > 1:
        model = torch.nn.DataParallel(model)
    if cfg.TRAIN.COMPILE:
        model = torch.compile(model)
    return model


def warn_random_init(cfg, resumed, runtime):
    warning = random_init_warning(cfg.MODEL.ARCH)
    if warning and not (resumed or pretrained_source(cfg.MODEL.ARCH, cfg.MODEL.PRETRAINED)) and runtime.is_main:
        print(warning, file=sys.stderr, flush=True)


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
    sampler: object
    valid_loader: object
    statistics_crops: StatisticsCrops
    rule: tuple
    best: float
    replaced: list
    stop: StopRequest = dataclasses.field(default_factory=StopRequest)
    result: dict = None
    pace: RunPace = None
    record: dict = None
    tensorboard: object = None

    @property
    def checkpoint_dir(self):
        return Path(self.args.checkpoint)

    @property
    def steps_per_epoch(self):
        return math.ceil(len(self.sampler) / self.sampler.batch_size)


def build_run(args, cfg, resumed, objective, runtime, records, crops, replaced):
    """The model (restored when resuming), its optimizer, schedule, average and the batches it trains on.

    ``replaced``: the old run's files that --overwrite deletes when this run writes its first file.
    """
    model = prepare_model(cfg, objective, runtime)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    scaler = torch.amp.GradScaler("cuda", enabled=resolve_amp(cfg.TRAIN.AMP, runtime.device) == "fp16")
    if resumed:
        restore_training_state(resumed, model, optimizer, scheduler, scaler, cfg)
    ema = make_ema(model, cfg, resumed)
    model = wrap_model(model, cfg, runtime, args.multi_gpu)
    batches, sampler = training_batches(records["train"], crops["train"], cfg, runtime)
    rule = best_rule(args.dataset)
    return Run(args, cfg, runtime, objective, model, optimizer, scheduler, scaler, ema, batch_augmenter(cfg), records,
               batches, sampler, evaluation_loader(records["valid"], cfg, runtime, crops=crops["valid"]),
               StatisticsCrops(records["train"], crops["train"], cfg, rank_batch_size(cfg, runtime)), rule,
               best=resumed_best(resumed, None if args.overwrite else args.checkpoint, rule), replaced=replaced)


def start_run(args, cfg, resumed, objective, argv, cleanup):
    """Everything before the first epoch: claim the run folder, read the data, build the run, say what it is.

    Returns the run and the (epoch, step) it starts at.
    """
    runtime = setup_runtime(args.device)
    replaced = claim_checkpoint_dir(args, runtime, cleanup)
    warn_random_init(cfg, resumed, runtime)
    seed_everything(cfg.TRAIN.SEED, cfg.TRAIN.DETERMINISTIC)
    records, crops = load_data(args, cfg, objective, runtime)
    objective.see_training_ages(records["train"].age)
    start = resume_position(args, resumed, len(records["train"]), cfg.TRAIN.BATCH_SIZE)
    run = build_run(args, cfg, resumed, objective, runtime, records, crops, replaced)
    run.pace = RunPace(cfg.TRAIN.EPOCHS, run.steps_per_epoch, cfg.TRAIN.BATCH_SIZE)
    if resumed:
        set_rng_state(resumed["rng"])
    if runtime.is_main:
        print(f"{cfg.MODEL.ARCH} ({count_parameters(unwrap(run.model)) / 1e6:.2f} M parameters), "
              f"objective {objective.name}, {cfg.MODEL.IMG_SIZE}px, on {runtime.device}"
              + (f" x{runtime.world_size} processes" if runtime.distributed else "")
              + f" in {precision_name(cfg.TRAIN.AMP, runtime.device)} (TRAIN.AMP {cfg.TRAIN.AMP})"
              + (f"; resuming at epoch {start[0] + 1}, step {start[1]}" if resumed else ""))
        print(run_files(args.checkpoint, Path(args.checkpoint) / CACHE_FOLDER if cfg.DATA.CACHE else None))
    run.record = run_record.collect(sys.argv[1:] if argv is None else argv, cfg_to_dict(cfg), args.data_dir,
                                    args.dataset, runtime.device, resolve_amp(cfg.TRAIN.AMP, runtime.device))
    run.tensorboard = open_log(cfg.LOG.TENSORBOARD, run.checkpoint_dir, runtime.is_main)
    if run.tensorboard is not None:
        cleanup.callback(run.tensorboard.close)
    run.stop.install()
    cleanup.callback(run.stop.restore)
    return run, start


def fit(objective_name, argv=None):
    """Build the run, then for each epoch train, validate and save; score the best epoch on a test CSV at the end.

    The folder lock and the signal handlers are released however the run ends.
    """
    args = build_parser(objective_name).parse_intermixed_args(argv)
    cfg, resumed = load_config(args)
    objective = OBJECTIVES[objective_name](cfg)
    check_resume(args, resumed, cfg, objective_name)
    finished = nothing_left_to_do(args, cfg, resumed)
    if finished:
        return finished
    with contextlib.ExitStack() as cleanup:
        run, (start_epoch, start_step) = start_run(args, cfg, resumed, objective, argv, cleanup)
        for epoch in range(start_epoch, cfg.TRAIN.EPOCHS):
            started = time.time()
            first_step = start_step if epoch == start_epoch else 0
            summary, step = train_one_epoch(run, epoch, first_step)
            if summary is None:
                stop_with_checkpoint(run, epoch, step)
            run.pace.trained(step - first_step, time.time() - started)
            run.result = validate(run)
            lr = run.optimizer.param_groups[0]["lr"]  # the rate this epoch trained with, before the scheduler moves it
            run.scheduler.step()
            improved = is_better(run.result[run.rule[0]], run.best, run.rule)
            if improved:
                run.best = run.result[run.rule[0]]
            save(run, epoch, run.steps_per_epoch, interrupted=run.stop.signal is not None, is_best=improved)
            log_epoch(run, epoch, summary, lr, improved, started)
            stop_after_epoch_if_asked(run.runtime, run.stop, epoch, run.checkpoint_dir / LAST_NAME)
        if run.runtime.is_main and run.result is not None:
            print(format_report(run.result, f"last epoch, {args.dataset} valid"))
            print(f"best {run.rule[0]} {run.best:.4f}: {run.checkpoint_dir / BEST_NAME}")
        if "test" in run.records:
            score_best_on_test(run.checkpoint_dir, run.rule, run.records["test"], run.runtime, args.dataset,
                               run.cfg.TEST.TTA)
        teardown(run.runtime)
        return {"best": run.best, "last": run.result, "checkpoint_dir": str(run.checkpoint_dir)}


def train_one_epoch(run, epoch, start_step):
    """One pass over this rank's training shard: (mean loss, MAE and head accuracies, step), or (None, step) when a
    signal stopped it.

    ``step`` counts the batches taken from the sampler, a batch whose images were all skipped included, so that a
    resumed run skips exactly the faces this one went through.
    """
    run.sampler.set_epoch(epoch, skip=start_step * run.sampler.batch_size)
    run.model.train()
    tally = EpochTally(run.runtime.device)
    step, skipped = start_step, 0
    bar = tqdm(run.batches, desc=f"epoch {epoch + 1}/{run.cfg.TRAIN.EPOCHS}", unit="batch",
               disable=not run.runtime.is_main, dynamic_ncols=True, mininterval=1 if sys.stderr.isatty() else 30,
               initial=start_step, total=start_step + len(run.batches))
    for batch in bar:
        skipped += batch.pop("skipped")
        stopping, empty = step_votes(run.runtime, run.stop, "image" not in batch, run.cfg.DATA.ON_BAD_IMAGE == "skip")
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


def check_in(run, tally, epoch, bar):
    """Every LOG_EVERY_STEPS steps, at the epoch's end and before stopping: read the running sums, stop on a
    non-finite loss, show the means so far. Under DDP the ranks agree, in one all-reduce, on a non-finite loss and
    on a stop signal.

    Returns the epoch's summary and whether a signal (to any rank) asks to stop.
    """
    values = tally.read()
    stop, diverged = agree_any(run.runtime, run.stop.signal is not None, values["first_bad_step"] >= 0)
    if diverged:
        stop_on_non_finite_loss(run.runtime, values, epoch)
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


def validate(run):
    """Score the validation CSV with the weights that ship (the average under TRAIN.EMA), and the raw ones too.

    Each set of weights first gets BatchNorm statistics of its own (precise_bn.py), the same on every rank.
    """
    refresh_statistics(weight_sets(run.model, run.ema), run.statistics_crops, run.cfg, run.runtime)
    scored = scored_weights(run.model, run.ema)
    share_buffers(scored, run.runtime)
    predictions = score_model(scored, run.valid_loader, run.runtime, run.cfg, tta=run.cfg.TEST.TTA)
    result = metrics(predictions, run.records["valid"])
    if run.ema is not None:
        share_buffers(run.model, run.runtime)
        raw = score_model(unwrap(run.model), run.valid_loader, run.runtime, run.cfg, tta=run.cfg.TEST.TTA,
                          desc="validate raw weights")
        result["raw_mae"] = metrics(raw, run.records["valid"])["mae"]
    return result


def save(run, epoch, step, interrupted, is_best=False):
    """Rank 0 writes last.pth (and best.pth); the other ranks write nothing and get None.

    The first save deletes the run that --overwrite replaces: this run's first file is written right after.
    """
    if not run.runtime.is_main:
        return None
    delete_replaced(run.replaced)
    run.replaced = []
    atomic_write(run.checkpoint_dir / run_record.RECORD_NAME, json.dumps(run.record, indent=2) + "\n")
    return save_checkpoint(make_state(run, epoch, step, interrupted), run.checkpoint_dir, is_best)


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
        "state_dict": scored_weights(run.model, run.ema).state_dict(),
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


def log_epoch(run, epoch, summary, lr, improved, started):
    """history.csv's row, curves.png and the printed line of a finished epoch (rank 0 only)."""
    if not run.runtime.is_main:
        return
    result, cfg = run.result, run.cfg
    seconds = time.time() - started
    append_history(run.checkpoint_dir, {"epoch": epoch + 1, "lr": lr, **summary, **result, "seconds": seconds})
    write_curves(run.checkpoint_dir, *run.rule)
    pace, slowdown = run.pace.epoch_done(epoch, time.time() - started)
    if run.tensorboard is not None:
        run.tensorboard.epoch(epoch + 1, result)
    print(f"epoch {epoch + 1}/{cfg.TRAIN.EPOCHS}: "
          f"train loss {summary['train_loss']:.3f} MAE {summary['train_mae']:.2f} | "
          f"valid MAE {result['mae']:.3f} CA(3) {result['ca3']:.3f} CA(5) {result['ca5']:.3f} CA(7) {result['ca7']:.3f}"
          + (f" (raw weights: MAE {result['raw_mae']:.3f})" if "raw_mae" in result else "")
          + f"{' (best)' if improved else ''} | {time.time() - started:.0f}s, {pace}", flush=True)
    if slowdown:
        print(slowdown, file=sys.stderr, flush=True)


def stop_with_checkpoint(run, epoch, step):
    """A signal stopped the epoch at ``step``: save where it stopped (rank 0 says how to continue), then exit."""
    refresh_statistics(weight_sets(run.model, run.ema), run.statistics_crops, run.cfg, run.runtime)
    path = save(run, epoch, step, interrupted=True)
    teardown(run.runtime)
    raise SystemExit(EXIT_INTERRUPTED) if path is None else TrainingError(
        f"stopped by {run.stop.signal} at epoch {epoch + 1}, step {step}; saved {path}. Continue with --resume {path}")


def main(argv=None):
    return fit("cls", argv)


if __name__ == "__main__":
    main()
