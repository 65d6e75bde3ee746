"""Run under ``torchrun --nproc_per_node 2`` by test_distributed.py: one DDP training step and one gathered validation.

Every rank builds the same model and the same 32 real faces; rank r trains on
its contiguous slice of them, exactly as EpochSampler hands out a global batch.
Rank 0 saves the weight update, the gathered predictions of an odd number of
faces, and what agree_any returned on each rank, for the test to compare with
one process.

    torchrun --nproc_per_node 2 tests/ddp_step.py DATA_DIR OUT.pth
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import optimization  # noqa: E402
import stopping  # noqa: E402
import train  # noqa: E402
from crop_cache import build_crop_cache  # noqa: E402
from dataset import CachedBatches  # noqa: E402
from defaults import get_cfg_defaults, merge_opts  # noqa: E402
from objectives import LabelDistributionObjective  # noqa: E402
from records import Records  # noqa: E402
from runtime import EpochSampler, setup_runtime, teardown, unwrap  # noqa: E402
from scoring import evaluation_loader, score_model  # noqa: E402

GLOBAL_BATCH = 32
CONFIG = ["MODEL.ARCH", "tinyage", "MODEL.IMG_SIZE", "32", "TRAIN.AMP", "off", "TRAIN.OPT", "sgd", "TRAIN.LR", "0.1",
          "TRAIN.BATCH_SIZE", str(GLOBAL_BATCH), "TEST.BATCH_SIZE", "8"]


def config():
    return merge_opts(get_cfg_defaults(), CONFIG)


def fresh_model(cfg, runtime):
    torch.manual_seed(0)
    return train.prepare_model(cfg, LabelDistributionObjective(cfg), runtime)


def first_batch(records, crops, runtime, per_rank):
    """This rank's slice of the first global batch, in a fixed (unshuffled) order."""
    sampler = EpochSampler(len(records), shuffle=False, rank=runtime.rank, world_size=runtime.world_size,
                           batch_size=per_rank)
    batch = next(iter(CachedBatches(records, crops, sampler, per_rank, runtime)))
    batch.pop("skipped")
    return batch


def step_update(cfg, runtime, batch, wrap):
    """The weight change of one train_step on ``batch``, with BatchNorm in eval mode so ranks agree."""
    model = fresh_model(cfg, runtime)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trained = train.wrap_model(model, cfg, runtime, multi_gpu=False) if wrap else model
    trained.eval()
    optimizer = optimization.build_optimizer(trained, cfg)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    train.train_step(trained, batch, LabelDistributionObjective(cfg), optimizer, scaler, runtime, cfg)
    return {k: unwrap(trained).state_dict()[k] - before[k] for k in before if before[k].is_floating_point()}


def main(data_dir, out):
    cfg = config()
    runtime = setup_runtime("cpu")
    records = {split: Records(Path(data_dir) / f"utk_{split}_align.csv", data_dir) for split in ("train", "valid")}
    crops = {split: build_crop_cache(rec, cfg.MODEL.IMG_SIZE, 0.0, Path(data_dir) / f"cache{runtime.rank}", 0, split)
             for split, rec in records.items()}
    update = step_update(cfg, runtime, first_batch(records["train"], crops["train"], runtime,
                                                   GLOBAL_BATCH // runtime.world_size), wrap=True)
    model = fresh_model(cfg, runtime)
    predictions = score_model(model, evaluation_loader(records["valid"], cfg, runtime, crops["valid"]), runtime, cfg)
    votes = stopping.agree_any(runtime, runtime.rank == 0, runtime.rank == 1, False)
    if runtime.is_main:
        torch.save({"update": update, "age": torch.from_numpy(predictions["age"]), "votes": list(votes)}, out)
    teardown(runtime)


if __name__ == "__main__":
    main(*sys.argv[1:])
