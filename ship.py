"""Make the shipped copy of a trained model: half the size of the checkpoint, and still loaded by every script.

    python ship.py runs/utkface_multitask/last.pth weights/utkface_multitask.pth
"""
import argparse
import io
from pathlib import Path

import torch

from checkpoint import CheckpointError, checkpoint_cfg, load_checkpoint
from defaults import MEGA
from files import atomic_write
from model import build_model


def half_precision_copy(source, target, raw_weights=False):
    """Shrink a checkpoint for shipping: fp16 weights, no optimizer or RNG state.

    Only the learned parameters are halved. Buffers (BatchNorm's running mean and variance) stay in fp32: the
    running variance of a network fed 0..255 pixels (bninception) can pass fp16's largest number, 65,504, and
    an infinite variance spoils every prediction.
    ``raw_weights`` ships a TRAIN.EMA run's trained weights (``train_state_dict``) instead of their average.
    """
    state = load_checkpoint(source)
    if raw_weights and "train_state_dict" not in state:
        raise CheckpointError(f"{source} has no raw weights apart from its state_dict (it was trained without TRAIN.EMA); "
                              f"drop --raw_weights")
    weights = state["train_state_dict"] if raw_weights else state["state_dict"]
    dropped = ("optimizer", "scheduler", "rng", "scaler", "train_state_dict", "ema_updates")
    keep = {k: v for k, v in state.items() if k not in dropped}
    learned = parameter_names(state)
    keep["state_dict"] = {k: v.half() if k in learned and v.is_floating_point() else v for k, v in weights.items()}
    buffer = io.BytesIO()
    torch.save(keep, buffer)
    atomic_write(target, buffer.getvalue())


def parameter_names(state):
    """The names of a checkpoint's learned parameters (the rest of its state_dict are buffers), from its model
    built without weights."""
    cfg = checkpoint_cfg(state)
    with torch.device("meta"):
        model = build_model(cfg.MODEL.ARCH, multitask=state["objective"] == "mt", width=cfg.MODEL.WIDTH)
    return {name for name, _ in model.named_parameters()}


def main(argv=None):
    parser = argparse.ArgumentParser(description="Shrink a training checkpoint for shipping: fp16 weights (buffers such "
                                                 "as BatchNorm statistics stay fp32), no optimizer, scheduler or RNG "
                                                 "state. It still loads in val.py and demo.py.")
    parser.add_argument("source", help="checkpoint written by a training script, e.g. checkpoint/best.pth")
    parser.add_argument("target", help="where the shipped file goes, e.g. runs/my_run/shipped.pth")
    parser.add_argument("--raw_weights", action="store_true",
                        help="for a TRAIN.EMA run: ship the trained weights instead of their moving average")
    args = parser.parse_args(argv)
    half_precision_copy(args.source, args.target, args.raw_weights)
    print(f"wrote {args.target} ({Path(args.target).stat().st_size / MEGA:.2f} MB)")


if __name__ == "__main__":
    main()
