"""Checkpoints: plain dicts, written whole (files.atomic_write), loaded without unpickling code.

A checkpoint carries everything `val.py` and `demo.py` need to rebuild the
model with no flags (objective, architecture, image size, expand, config), and
everything `--resume` needs to continue exactly (optimizer, scheduler, epoch,
RNG states).
"""
import io
import pickle
import random
from pathlib import Path

import numpy as np
import torch

from defaults import cfg_from_dict
from files import atomic_write

LAST_NAME = "last.pth"
BEST_NAME = "best.pth"
# the run folder's report of best.pth scored on the test CSV, where the data has one
TEST_REPORT_DIR = "test"
REQUIRED_KEYS = ("state_dict", "objective", "config")
# what --resume needs beyond the weights; a shipped half-precision copy lacks them
RESUME_KEYS = ("optimizer", "scheduler", "epoch", "best_metric", "rng")
# weight names quoted in a message about a checkpoint that does not fit the model
SHOWN_KEYS = 3
ONNX_SUFFIX = ".onnx"
# An ONNX file is a protobuf ModelProto whose first field is ir_version (field 1, a varint): tag byte 0x08.
# PyTorch checkpoints start with "PK" (zip) or 0x80 (pickle).
ONNX_FIRST_BYTE = b"\x08"


class CheckpointError(SystemExit):
    """Raised for an unusable checkpoint; a SystemExit so that scripts print it without a traceback."""


def save_checkpoint(state, checkpoint_dir, is_best):
    """Save ``last.pth``, and ``best.pth`` when this is the best so far.

    best.pth is written first. A crash between the two writes leaves last.pth
    one epoch behind, which resume redoes; resume then takes the best metric
    from best.pth too (see train.resumed_best), so the redone epoch cannot
    replace best.pth with a worse model.
    """
    checkpoint_dir = Path(checkpoint_dir)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    if is_best:
        atomic_write(checkpoint_dir / BEST_NAME, payload)
    last = checkpoint_dir / LAST_NAME
    atomic_write(last, payload)
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
    except Exception as error:  # torch.load fails on a foreign file with any of a dozen exception types
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated or corrupt, or not written by torch.save?): "
            f"{type(error).__name__}: {first_line(error)}"
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


def check_training_state(path, state):
    """Refuse a shipped copy first: without optimizer and scheduler it resumes under no script."""
    missing = [key for key in RESUME_KEYS if key not in state]
    if missing:
        raise CheckpointError(
            f"{path} cannot be resumed: it lacks {', '.join(missing)} (a shipped copy without training state?). "
            f"Resume from a last.pth or best.pth written by a training run."
        )


def check_resumable(path, state, model, arch):
    """Refuse, naming the file, a checkpoint that lacks training state or whose weights do not fit ``model``.

    Checked right after loading, so that a wrong file stops the run before the
    crop caches are built rather than as a size-mismatch list afterwards.
    """
    check_training_state(path, state)
    problems = weight_problems(model, state["state_dict"])
    if problems:
        raise CheckpointError(
            f"{path} does not hold a {arch} model of this project: its weights have "
            f"{describe_weight_problems(problems)}. Resume from a checkpoint written by this run's training script."
        )


def weight_problems(model, weights):
    """What keeps the state dict ``weights`` from loading into ``model``: {"missing" | "unexpected" | "of another
    shape": sorted names}, only the kinds that occur."""
    own = {name: tuple(value.shape) for name, value in model.state_dict().items()}
    weights = weights if isinstance(weights, dict) else {}
    theirs = {name: tuple(value.shape) for name, value in weights.items() if hasattr(value, "shape")}
    problems = {
        "missing": sorted(own.keys() - theirs.keys()),
        "unexpected": sorted(theirs.keys() - own.keys()),
        "of another shape": sorted(k for k in own.keys() & theirs.keys() if own[k] != theirs[k]),
    }
    return {kind: names for kind, names in problems.items() if names}


def describe_weight_problems(problems):
    return "; ".join(f"{len(names)} {kind} ({', '.join(names[:SHOWN_KEYS])}"
                     f"{', ...' if len(names) > SHOWN_KEYS else ''})" for kind, names in problems.items())


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
