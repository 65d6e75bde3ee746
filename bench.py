"""Where the training loop stands against the hardware, in one run.

    python bench.py --arch tinyage --img_size 112 [--batch 64] [--steps 40] [--rounds 3] [--baseline] [--fp32]
                    [--data_dir D --dataset NAME] [KEY VALUE ...]

Times, on real faces (UTKFace from ../shared/data, or any aligned CSV with
--data_dir/--dataset):

- the real training loop: crop cache → batch gather → augmentation on the
  device → normalisation → forward, loss, backward, optimizer step, with
  ``TRAIN.AMP`` as configured (auto: bf16 where the hardware has it);
- the compute limit: the same step on a normalised batch already in memory;
- validation;
- the FLOPs of one training image (``torch.utils.flop_counter``) and a matrix
  product in the training dtype (the peak), so the loop reads as a share of it;
- with ``--fp32``, the same loop in fp32, for the speed-up of mixed precision;
- with ``--baseline``, the original's per-sample path: PIL decode, rotate,
  crop and resize and the same augmentation per sample (albumentations), in
  fp32 and the default memory format, through a loader with
  ``--baseline_workers`` processes, as the original trained.

Every measure is taken once per round, one after another, ``--rounds`` times.
A ratio (loop to compute, bf16 to fp32, loop to baseline, loop to the matmul
peak) is taken between two windows of the same round, moments apart, so that a
host whose speed drifts (turbo, neighbours on a shared machine) moves both of
its sides together; each figure printed is the median over the rounds. The last
line is one JSON object.
"""
import argparse
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from augment import albumentations_pipeline
from crop_cache import build_crop_cache
from dataset import CachedBatches
from defaults import get_cfg_defaults, merge_opts
from epoch_tally import EpochTally
from model import input_settings
from normalize import normalize
from objectives import LabelDistributionObjective
from records import Records, csv_path
from runtime import EpochSampler, make_loader, resolve_amp, setup_runtime
from scoring import evaluation_loader, score_model
from train import prepare_model, train_step
from training_data import batch_augmenter

UTKFACE = Path(__file__).resolve().parent / ".." / "shared" / "data" / "UTKFace"
WARMUP_STEPS = 3
DEFAULT_STEPS = 40
DEFAULT_ROUNDS = 3
# the original trained with two loader processes
DEFAULT_BASELINE_WORKERS = 2
# side of the square matrices whose product measures the peak, and how long to time it
PEAK_MATRIX_SIDE = 2048
PEAK_SECONDS = 2.0
KIB_PER_MIB = 1024
GIGA = 1e9


def utkface_csv(directory, count):
    """A CSV over the first ``count`` UTKFace crops: deg 0, the whole crop as the box."""
    names = sorted(n for n in os.listdir(UTKFACE) if n.count("_") == 3 and n.split("_")[0].isdigit())[:count]
    lines = ["photo,age,deg,box1,box2,box3,box4"]
    for name in names:
        with Image.open(UTKFACE / name) as image:
            width, height = image.size
        lines.append(f"{UTKFACE / name},{name.split('_')[0]},0,0,0,{width},{height}")
    path = Path(directory) / "bench_train_align.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def bench_records(args, scratch, count):
    """Records of the data set to bench: the given aligned CSV, or the first UTKFace crops."""
    if args.data_dir:
        return Records(csv_path(args.data_dir, args.dataset, "train"), args.data_dir)
    return Records(utkface_csv(scratch, count), scratch)


class PILBaselineDataset(Dataset):
    """The original's per-sample path: PIL decode, rotate, crop and resize, then albumentations, every step."""

    def __init__(self, records, img_size, augment):
        self.records = records
        self.img_size = img_size
        self.augment = augment

    def __len__(self):
        return len(self.records)

    def __getitem__(self, key):
        index = int(key) % len(self)
        image = Image.open(self.records.files[index]).convert("RGB").rotate(float(self.records.deg[index]))
        x1, y1, x2, y2 = self.records.boxes[index]
        image = np.array(image.crop((x1, y1, x2, y2)).resize((self.img_size, self.img_size), Image.BILINEAR))
        if self.augment is not None:
            image = self.augment(image=image)["image"]
        return {"image": torch.from_numpy(image.transpose(2, 0, 1).copy()), "age": int(self.records.age[index]),
                "gender": 0, "race": 0, "index": index}


def fresh_model(cfg, runtime):
    """The model as training builds it, from the run's seed, so every timed model starts alike."""
    torch.manual_seed(cfg.TRAIN.SEED)
    return prepare_model(cfg, LabelDistributionObjective(cfg), runtime)


class Trainer:
    """One model, optimizer and objective, stepped through train_step on any stream of batches."""

    def __init__(self, cfg, runtime, augment=True):
        self.cfg = cfg
        self.runtime = runtime
        self.model = fresh_model(cfg, runtime)
        if cfg.TRAIN.COMPILE:
            self.model = torch.compile(self.model)
        self.objective = LabelDistributionObjective(cfg)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.TRAIN.LR)
        self.scaler = torch.amp.GradScaler("cuda", enabled=resolve_amp(cfg.TRAIN.AMP, runtime.device) == "fp16")
        self.augmenter = batch_augmenter(cfg) if augment else None

    def images_per_second(self, batches, steps):
        """Images per second over ``steps`` batches after a warm-up, whatever feeds them included, with the
        training loop's running sums kept on the device and read once at the end, as the loop reads them."""
        self.model.train()
        seen, started, tally = 0, None, EpochTally(self.runtime.device)
        for index, batch in enumerate(batches):
            batch.pop("skipped", None)
            if index == WARMUP_STEPS:
                synchronize(self.runtime)
                started, seen = time.perf_counter(), 0
            loss, outputs, labels = train_step(self.model, batch, self.objective, self.optimizer, self.scaler,
                                               self.runtime, self.cfg, self.augmenter)
            tally.add(loss, outputs, labels, index)
            seen += len(batch["age"])
            if index + 1 == WARMUP_STEPS + steps:
                break
        tally.read()
        synchronize(self.runtime)
        return seen / (time.perf_counter() - started)


def compute_batches(batch, runtime, count):
    """The same batch, already on the device, ``count`` times: the step (normalisation included) with nothing
    to gather or augment."""
    held = {k: v.to(runtime.device) if torch.is_tensor(v) else v for k, v in batch.items()}
    for _ in range(count):
        yield dict(held)


def synchronize(runtime):
    if runtime.device.type == "cuda":
        torch.cuda.synchronize()


def time_validation(model, records, crops, cfg, runtime):
    loader = evaluation_loader(records, cfg, runtime, crops=crops)
    synchronize(runtime)
    started = time.perf_counter()
    score_model(model, loader, runtime, cfg, desc="bench validate")
    synchronize(runtime)
    return len(records) / (time.perf_counter() - started)


def gflop_per_image(cfg, runtime, batch):
    """Forward and backward FLOPs of one training image, counted by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode

    model = fresh_model(cfg, runtime)
    images = normalize(batch["image"][:2].to(runtime.device), input_settings(cfg.MODEL.ARCH),
                       channels_last=cfg.MODEL.CHANNELS_LAST)
    with FlopCounterMode(display=False) as counter:
        model(images)["age"].float().logsumexp(1).sum().backward()
    return counter.get_total_flops() / len(images) / GIGA


def peak_gflops(runtime, amp):
    """GFLOP/s of a large matrix product in the training dtype: what the hardware can do at best."""
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16 if amp == "fp16" else torch.float32
    a = torch.randn(PEAK_MATRIX_SIDE, PEAK_MATRIX_SIDE, device=runtime.device, dtype=dtype)
    b = torch.randn_like(a)
    torch.mm(a, b)
    synchronize(runtime)
    products, started = 0, time.perf_counter()
    while time.perf_counter() - started < PEAK_SECONDS:
        torch.mm(a, b)
        products += 1
        if runtime.device.type == "cuda" and products % 10:
            continue
        synchronize(runtime)
    synchronize(runtime)
    return 2 * PEAK_MATRIX_SIDE**3 * products / (time.perf_counter() - started) / GIGA


def peak_rss_mb():
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / KIB_PER_MIB


def device_name(runtime):
    """The GPU's name, or the CPU's model name with its bf16 support and cores."""
    if runtime.device.type == "cuda":
        return torch.cuda.get_device_name(runtime.device)
    name = platform.processor() or "CPU"
    try:
        with open("/proc/cpuinfo") as handle:
            info = handle.read()
        name = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
        flags = next(line for line in info.splitlines() if line.startswith("flags")).split()
        name += " (AVX-512 BF16)" if "avx512_bf16" in flags else " (AVX-512)" if "avx512f" in flags else " (AVX2)"
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} cores"


def timed_rounds(rounds, measures):
    """Every named measure taken once per round, one after another: {name: [its value in each round]}."""
    values = {name: [] for name in measures}
    for _ in range(rounds):
        for name, measure in measures.items():
            values[name].append(measure())
    return values


def median_ratio(numerators, denominators, scale=1.0):
    """The median over rounds of each round's own ratio, so that both sides come from the same moment."""
    return float(np.median(np.asarray(numerators) * scale / np.asarray(denominators)))


def with_overrides(cfg, *opts):
    changed = cfg.clone()
    changed.defrost()
    merge_opts(changed, list(opts))
    return changed


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="tinyage", help="MODEL.ARCH to measure (default: tinyage)")
    parser.add_argument("--img_size", type=int, default=112, help="MODEL.IMG_SIZE (default: 112)")
    parser.add_argument("--batch", type=int, default=64, help="training and validation batch size (default: 64)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                        help=f"timed training steps per window, after {WARMUP_STEPS} warm-up steps (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS,
                        help="rounds of timed windows, every measure once per round; ratios within a round, "
                             "medians over rounds (default: %(default)s)")
    parser.add_argument("--baseline", action="store_true",
                        help="also time the original's per-sample path (PIL + albumentations, fp32) and report the speed-up")
    parser.add_argument("--baseline_workers", type=int, default=DEFAULT_BASELINE_WORKERS,
                        help="loader processes of the per-sample baseline (default: %(default)s, as the original)")
    parser.add_argument("--fp32", action="store_true", help="also time the loop in fp32, for the speed-up of TRAIN.AMP")
    parser.add_argument("--data_dir", help="bench this folder's <dataset>_train_align.csv instead of the shared UTKFace")
    parser.add_argument("--dataset", help="the CSVs' prefix, with --data_dir")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="force a device (default: cuda when available)")
    parser.add_argument("opts", nargs="*", metavar="KEY VALUE", help="config overrides as KEY VALUE pairs, e.g. TRAIN.AMP off")
    return parser


def loop_measures(args, cfg, runtime, records, crops, amp):
    """The timed windows, by name: the loop and its compute limit (also in fp32 with --fp32), the per-sample
    baseline with --baseline, and the matmul peak in each training dtype."""
    sampler = EpochSampler(len(records), batch_size=args.batch)
    first = next(iter(CachedBatches(records, crops, sampler, args.batch, runtime)))

    def loop_and_compute(prefix, loop_cfg):
        loop, compute = Trainer(loop_cfg, runtime), Trainer(loop_cfg, runtime, augment=False)
        return {
            f"{prefix}train_img_s": lambda: loop.images_per_second(
                CachedBatches(records, crops, sampler, args.batch, runtime), args.steps),
            f"{prefix}compute_img_s": lambda: compute.images_per_second(
                compute_batches(first, runtime, WARMUP_STEPS + args.steps), args.steps),
        }, loop

    measures, loop = loop_and_compute("", cfg)
    if args.fp32:
        measures.update(loop_and_compute("fp32_", with_overrides(cfg, "TRAIN.AMP", "off"))[0])
    if args.baseline:
        naive_cfg = with_overrides(cfg, "MODEL.CHANNELS_LAST", "False", "TRAIN.AMP", "off", "TRAIN.AUG", "False")
        naive = Trainer(naive_cfg, runtime)
        baseline_set = PILBaselineDataset(records, args.img_size, albumentations_pipeline(cfg.AUG, args.img_size))
        measures["baseline_train_img_s"] = lambda: naive.images_per_second(
            make_loader(baseline_set, sampler, args.batch, args.baseline_workers, runtime), args.steps)
    measures["peak_gflops"] = lambda: peak_gflops(runtime, amp)
    if args.fp32:
        measures["fp32_peak_gflops"] = lambda: peak_gflops(runtime, "off")
    return measures, loop.model, first


def ratios(rounds, gflop_per_img):
    """Each ratio from the windows of one round, as the median over the rounds."""
    pairs = {"ratio": ("train_img_s", "compute_img_s"), "fp32_ratio": ("fp32_train_img_s", "fp32_compute_img_s"),
             "amp_speedup": ("train_img_s", "fp32_train_img_s"), "speedup": ("train_img_s", "baseline_train_img_s"),
             "fp32_speedup": ("fp32_train_img_s", "baseline_train_img_s")}
    shares = {"peak_share": ("train_img_s", "peak_gflops"), "fp32_peak_share": ("fp32_train_img_s", "fp32_peak_gflops")}
    result = {name: median_ratio(rounds[a], rounds[b]) for name, (a, b) in pairs.items() if a in rounds and b in rounds}
    result.update({name: median_ratio(rounds[a], rounds[b], gflop_per_img)
                   for name, (a, b) in shares.items() if a in rounds and b in rounds})
    return result


def main(argv=None):
    args = build_parser().parse_intermixed_args(argv)
    if bool(args.data_dir) != bool(args.dataset):
        raise SystemExit("--data_dir and --dataset go together")
    cfg = merge_opts(get_cfg_defaults(), ["MODEL.ARCH", args.arch, "MODEL.IMG_SIZE", str(args.img_size),
                                          "TRAIN.BATCH_SIZE", str(args.batch), "TEST.BATCH_SIZE", str(args.batch),
                                          "TRAIN.AUG", "True"] + args.opts)
    runtime = setup_runtime(args.device)
    amp = resolve_amp(cfg.TRAIN.AMP, runtime.device)
    result = {"arch": args.arch, "img_size": args.img_size, "batch": args.batch, "device": str(runtime.device),
              "device_name": device_name(runtime), "amp": amp, "channels_last": cfg.MODEL.CHANNELS_LAST,
              "threads": torch.get_num_threads(), "steps": args.steps, "rounds": args.rounds}
    with tempfile.TemporaryDirectory() as scratch:
        records = bench_records(args, scratch, args.batch * (WARMUP_STEPS + args.steps))
        started = time.perf_counter()
        crops = build_crop_cache(records, args.img_size, cfg.DATA.EXPAND, Path(scratch) / "cache", os.cpu_count() or 1, "bench")
        result["cache_img_s"] = len(records) / (time.perf_counter() - started)
        result["cache_peak_rss_mb"] = peak_rss_mb()
        measures, model, first = loop_measures(args, cfg, runtime, records, crops, amp)
        rounds = timed_rounds(args.rounds, measures)
        result.update({name: float(np.median(values)) for name, values in rounds.items()})
        result["val_img_s"] = time_validation(model, records, crops, cfg, runtime)
        result["peak_rss_mb"] = peak_rss_mb()
        result["gflop_per_img"] = gflop_per_image(cfg, runtime, first)
        result["train_gflops"] = result["train_img_s"] * result["gflop_per_img"]
        result.update(ratios(rounds, result["gflop_per_img"]))
    for key, value in result.items():
        print(f"{key:>22}: {value:.3f}" if isinstance(value, float) else f"{key:>22}: {value}")
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}))
    return result

if __name__ == "__main__":
    main()
