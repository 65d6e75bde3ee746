"""Measure training and evaluation speed on real UTKFace faces.

    python bench.py --arch tinyage --img_size 112 [--batch 64] [--steps 20] [--baseline]

Prints (a) images/s of the real training loop (CSV → data set → loader →
model → loss → optimizer step), (b) images/s of the same model and loss on
tensors already in memory, the compute limit, their ratio a/b, and (c)
images/s of validation. ``--baseline`` also runs the naive loop that decodes,
rotates, crops and resizes every image with PIL on every step, in fp32 and
the default memory format, and reports our speed-up over it. The last line
is one JSON object.
"""
import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from dataset import FaceDataset, Records, build_crop_cache
from defaults import get_cfg_defaults, merge_opts
from model import build_model
from objectives import LabelDistributionObjective
from runtime import EpochSampler, make_loader, resolve_amp, resolve_workers, setup_runtime
from train import train_step
from val import evaluation_loader, predict

UTKFACE = Path(__file__).resolve().parent / ".." / "shared" / "data" / "UTKFace"
WARMUP_STEPS = 3


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


class PILBaselineDataset(Dataset):
    """The naive per-sample path: PIL decode, rotate, crop and resize on every step."""

    def __init__(self, records, img_size):
        self.records = records
        self.img_size = img_size

    def __len__(self):
        return len(self.records)

    def __getitem__(self, key):
        index = int(key) % len(self)
        image = Image.open(self.records.files[index]).convert("RGB").rotate(float(self.records.deg[index]))
        x1, y1, x2, y2 = self.records.boxes[index]
        image = image.crop((x1, y1, x2, y2)).resize((self.img_size, self.img_size), Image.BILINEAR)
        return {"image": torch.from_numpy(np.array(image).transpose(2, 0, 1).copy()), "age": int(self.records.age[index]),
                "gender": 0, "race": 0, "index": index}


def fresh_model(cfg, runtime):
    torch.manual_seed(cfg.TRAIN.SEED)
    model = build_model(cfg.MODEL.ARCH).to(runtime.device)
    if cfg.MODEL.CHANNELS_LAST:
        model.to(memory_format=torch.channels_last)
    return model


def time_training(model, loader, cfg, runtime, steps):
    """Images per second over ``steps`` batches after a warm-up, loader included."""
    objective = LabelDistributionObjective(cfg)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.TRAIN.LR)
    scaler = torch.amp.GradScaler("cuda", enabled=resolve_amp(cfg.TRAIN.AMP, runtime.device) == "fp16")
    model.train()
    seen, started = 0, None
    for index, batch in enumerate(loader):
        batch.pop("skipped")
        if index == WARMUP_STEPS:
            synchronize(runtime)
            started, seen = time.perf_counter(), 0
        train_step(model, batch, objective, optimizer, scaler, runtime, cfg)
        seen += len(batch["age"])
        if index + 1 == WARMUP_STEPS + steps:
            break
    synchronize(runtime)
    return seen / (time.perf_counter() - started)


def time_compute(model, batch, cfg, runtime, steps):
    """The same step on one batch held in memory: what the model alone can do."""
    return time_training(model, [dict(batch, skipped=0) for _ in range(WARMUP_STEPS + steps)], cfg, runtime, steps)


def synchronize(runtime):
    if runtime.device.type == "cuda":
        torch.cuda.synchronize()


def time_validation(model, records, crops, cfg, runtime):
    loader = evaluation_loader(records, cfg, runtime, crops=crops)
    synchronize(runtime)
    started = time.perf_counter()
    predict(model, loader, runtime, cfg, desc="bench validate")
    synchronize(runtime)
    return len(records) / (time.perf_counter() - started)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="tinyage", help="MODEL.ARCH to measure (default: tinyage)")
    parser.add_argument("--img_size", type=int, default=112, help="MODEL.IMG_SIZE (default: 112)")
    parser.add_argument("--batch", type=int, default=64, help="training and validation batch size (default: 64)")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps after warm-up (default: 20)")
    parser.add_argument("--baseline", action="store_true", help="also time the naive PIL-per-step loop and report the speed-up")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="force a device (default: cuda when available)")
    parser.add_argument("opts", nargs="*", metavar="KEY VALUE", help="config overrides as KEY VALUE pairs, e.g. TRAIN.WORKERS 0")
    return parser


def main(argv=None):
    args = build_parser().parse_intermixed_args(argv)
    cfg = get_cfg_defaults()
    merge_opts(cfg, ["MODEL.ARCH", args.arch, "MODEL.IMG_SIZE", str(args.img_size), "TRAIN.BATCH_SIZE", str(args.batch),
                     "TEST.BATCH_SIZE", str(args.batch), "TRAIN.AUG", "True"] + args.opts)
    runtime = setup_runtime(args.device)
    count = args.batch * (WARMUP_STEPS + args.steps)
    result = {"arch": args.arch, "img_size": args.img_size, "batch": args.batch, "device": str(runtime.device),
              "workers": resolve_workers(cfg.TRAIN.WORKERS, runtime), "channels_last": cfg.MODEL.CHANNELS_LAST, "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as scratch:
        records = Records(utkface_csv(scratch, count), scratch)
        started = time.perf_counter()
        crops = build_crop_cache(records, args.img_size, cfg.DATA.EXPAND, Path(scratch) / "cache", os.cpu_count() or 1, "bench")
        result["cache_img_s"] = len(records) / (time.perf_counter() - started)
        dataset = FaceDataset(records, args.img_size, cfg.DATA.EXPAND, augment=cfg.TRAIN.AUG, crops=crops)
        loader = make_loader(dataset, EpochSampler(len(dataset)), args.batch, cfg.TRAIN.WORKERS, runtime)
        model = fresh_model(cfg, runtime)
        result["train_img_s"] = time_training(model, loader, cfg, runtime, args.steps)
        first = next(iter(make_loader(dataset, EpochSampler(len(dataset)), args.batch, 0, runtime)))
        result["compute_img_s"] = time_compute(fresh_model(cfg, runtime), first, cfg, runtime, args.steps)
        result["ratio"] = result["train_img_s"] / result["compute_img_s"]
        result["val_img_s"] = time_validation(model, records, crops, cfg, runtime)
        if args.baseline:
            naive = cfg.clone()
            naive.defrost()
            merge_opts(naive, ["MODEL.CHANNELS_LAST", "False", "TRAIN.AMP", "off"])
            baseline_loader = make_loader(PILBaselineDataset(records, args.img_size), EpochSampler(len(records)),
                                          args.batch, cfg.TRAIN.WORKERS, runtime)
            result["baseline_train_img_s"] = time_training(fresh_model(naive, runtime), baseline_loader, naive, runtime, args.steps)
            result["speedup"] = result["train_img_s"] / result["baseline_train_img_s"]
    for key, value in result.items():
        print(f"{key:>22}: {value:.3f}" if isinstance(value, float) else f"{key:>22}: {value}")
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}))
    return result


if __name__ == "__main__":
    main()
