"""Checkpoints: plain dicts, written atomically, loaded without unpickling code.

A checkpoint carries everything `val.py` and `demo.py` need to rebuild the
model with no flags (objective, architecture, image size, expand, config), and
everything `--resume` needs to continue exactly (optimizer, scheduler, epoch,
RNG states).
"""
import io
import os
import pickle
import random
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from defaults import cfg_from_dict
from runtime import crash_point

LAST_NAME = "last.pth"
BEST_NAME = "best.pth"
REQUIRED_KEYS = ("state_dict", "objective", "config")
ONNX_SUFFIX = ".onnx"
# An ONNX file is a protobuf ModelProto whose first field is ir_version (field 1, a varint): tag byte 0x08.
# PyTorch checkpoints start with "PK" (zip) or 0x80 (pickle).
ONNX_FIRST_BYTE = b"\x08"


class CheckpointError(SystemExit):
    """Raised for an unusable checkpoint; a SystemExit so that scripts print it without a traceback."""


def atomic_write(path, write):
    """Write through ``write(handle)`` to a temp file in the same folder, fsync, then rename.

    A crash at any moment leaves either the previous file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)
    try:
        with handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def atomic_write_text(path, text):
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def save_checkpoint(state, checkpoint_dir, is_best):
    """Save ``last.pth``, and copy it to ``best.pth`` when it is the best so far."""
    checkpoint_dir = Path(checkpoint_dir)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    half = len(payload) // 2

    def write(handle):
        handle.write(payload[:half])
        crash_point("save", state["epoch"], state.get("step", 0))
        handle.write(payload[half:])

    # best first: a crash between the two leaves last.pth one epoch behind, which resume simply redoes
    if is_best:
        atomic_write(checkpoint_dir / BEST_NAME, write)
    last = checkpoint_dir / LAST_NAME
    atomic_write(last, write)
    return last


def load_state(path):
    """``torch.load(weights_only=True)`` with errors that say what is wrong with the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if is_onnx_file(path):
        raise CheckpointError(
            f"{path} is an ONNX export, not a PyTorch checkpoint. To resume training, pass the .pth it was "
            f"exported from; val.py and demo.py take the .onnx as it is."
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path} was refused: it holds objects other than tensors and plain data, which could run code "
            f"when loaded ({first_line(error)}). Only load checkpoints from people you trust, "
            f"re-saved as plain dicts."
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as error:
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated or corrupt?): {first_line(error)}"
        ) from None


def is_onnx_file(path):
    """True for a file named .onnx or whose first byte is that of an ONNX model."""
    path = Path(path)
    if path.suffix.lower() == ONNX_SUFFIX:
        return True
    try:
        with open(path, "rb") as handle:
            return handle.read(1) == ONNX_FIRST_BYTE
    except OSError:
        return False


def first_line(error):
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def load_checkpoint(path):
    """A training checkpoint of this project, checked for the keys a rebuild needs."""
    state = load_state(path)
    missing = [key for key in REQUIRED_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise CheckpointError(
            f"{path} is not a checkpoint of this project: it lacks {', '.join(missing)}. "
            f"Pass a file written by train.py, train-ldl.py or train-mt.py."
        )
    return state


def checkpoint_cfg(state):
    return cfg_from_dict(state["config"])


def rng_state():
    """Python, NumPy and torch RNG states as plain data (weights_only cannot load numpy arrays)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state):
    random.setstate(_as_tuples(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(value):
    """``random.setstate`` wants the nested tuples that a round trip may turn into lists."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def half_precision_copy(source, target):
    """Shrink a checkpoint for shipping: fp16 weights, no optimizer or RNG state."""
    state = load_checkpoint(source)
    keep = {k: v for k, v in state.items() if k not in ("optimizer", "scheduler", "rng", "scaler")}
    keep["state_dict"] = {
        k: v.half() if v.is_floating_point() else v for k, v in state["state_dict"].items()
    }
    buffer = io.BytesIO()
    torch.save(keep, buffer)
    atomic_write(target, lambda handle: handle.write(buffer.getvalue()))



def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(description="Shrink a training checkpoint for shipping: fp16 weights, "
                                                 "no optimizer, scheduler or RNG state. It still loads in val.py and demo.py.")
    parser.add_argument("source", help="checkpoint written by a training script, e.g. checkpoint/best.pth")
    parser.add_argument("target", help="where the shipped file goes, e.g. weights/my_model.pth")
    args = parser.parse_args(argv)
    half_precision_copy(args.source, args.target)
    print(f"wrote {args.target} ({Path(args.target).stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
