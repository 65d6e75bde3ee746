"""Checkpoints: plain dicts, written atomically, loaded without unpickling code.

A checkpoint carries everything `val.py` and `demo.py` need to rebuild the
model with no flags (objective, architecture, image size, expand, config), and
everything `--resume` needs to continue exactly (optimizer, scheduler, epoch,
RNG states).
"""
import contextlib
import fcntl
import io
import os
import pickle
import random
import secrets
import tempfile
from pathlib import Path

import numpy as np
import torch

from defaults import cfg_from_dict
from model import build_model

LAST_NAME = "last.pth"
BEST_NAME = "best.pth"
# the run folder's report of best.pth scored on the test CSV, where the data has one
TEST_REPORT_DIR = "test"
REQUIRED_KEYS = ("state_dict", "objective", "config")
# what --resume needs beyond the weights; a shipped half-precision copy lacks them
RESUME_KEYS = ("optimizer", "scheduler", "epoch", "best_metric", "rng")
# the file in a run's folder that holds its lock and names the holder's pid
LOCK_NAME = ".lock"
# mode of a new file before the umask, as open() uses
NEW_FILE_MODE = 0o666
# weight names quoted in a message about a checkpoint that does not fit the model
SHOWN_KEYS = 3
ONNX_SUFFIX = ".onnx"
# An ONNX file is a protobuf ModelProto whose first field is ir_version (field 1, a varint): tag byte 0x08.
# PyTorch checkpoints start with "PK" (zip) or 0x80 (pickle).
ONNX_FIRST_BYTE = b"\x08"


class CheckpointError(SystemExit):
    """Raised for an unusable checkpoint; a SystemExit so that scripts print it without a traceback."""


def atomic_write(path, write):
    """Write through ``write(handle)`` to a temp file in the same folder, fsync, then rename.

    A crash at any moment leaves either the previous file or the new one, never half of one.
    The new file gets the mode that open() would give it under the umask.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp, handle = _new_temp_file(path)
    try:
        with handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _new_temp_file(path):
    """A fresh ``.NAME.<random>.tmp`` beside ``path``, created with O_EXCL so that the kernel applies the umask."""
    while True:
        temp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, NEW_FILE_MODE)
        except FileExistsError:
            continue
        return temp, os.fdopen(descriptor, "wb")


def remove_stale_temp_files(folder, names):
    """Delete the temp files that a killed writer left beside ``names``; call it only while holding the folder's lock."""
    for name in names:
        for temp in Path(folder).glob(f".{name}.*.tmp"):
            temp.unlink(missing_ok=True)


def atomic_write_text(path, text):
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


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
        atomic_write(checkpoint_dir / BEST_NAME, lambda handle: handle.write(payload))
    last = checkpoint_dir / LAST_NAME
    atomic_write(last, lambda handle: handle.write(payload))
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


class OutputError(CheckpointError):
    """An output folder (--checkpoint, --output_dir) that is a file or cannot be written."""


def prepare_output_dir(path, flag="--checkpoint"):
    """Create the output folder and prove it writable now, so that a bad one fails before any long work.

    train.py, val.py and demo.py all check their folders here.
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise OutputError(f"{flag} {path} is a file, not a folder; name a folder (it is created when missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise OutputError(
            f"{flag} {path} cannot be written to ({error.strerror or error}); name a folder you can write to"
        ) from None
    return path


@contextlib.contextmanager
def folder_lock(folder):
    """Hold an exclusive lock on ``folder`` while the block runs: two runs never write one folder at once.

    flock is released by the kernel when the process dies, so a killed run never leaves the folder locked (only
    its lock file, which the next run takes over). However the block ends, the holder deletes the lock file
    before it lets the lock go, so that no finished run's pid is left behind.
    """
    path = Path(folder) / LOCK_NAME
    handle = _take_lock_file(path, folder)
    try:
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
    finally:
        path.unlink(missing_ok=True)
        handle.close()


def _take_lock_file(path, folder):
    """The lock file, open and flocked; CheckpointError naming the holder's pid while another run holds it.

    A run that opened the file just before its holder deleted it would lock a file nobody else can find: that
    lock is dropped and the file at ``path`` (made anew if need be) is taken instead.
    """
    while True:
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise CheckpointError(
                f"{folder} is in use by another training run (pid {holder}); wait for it to end, "
                f"or pass another --checkpoint folder"
            ) from None
        if _is_file_at(handle, path):
            return handle
        handle.close()


def _is_file_at(handle, path):
    try:
        return os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
    except FileNotFoundError:
        return False


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
    atomic_write(target, lambda handle: handle.write(buffer.getvalue()))


def parameter_names(state):
    """The names of a checkpoint's learned parameters (the rest of its state_dict are buffers), from its model
    built without weights."""
    cfg = checkpoint_cfg(state)
    with torch.device("meta"):
        model = build_model(cfg.MODEL.ARCH, multitask=state["objective"] == "mt", width=cfg.MODEL.WIDTH)
    return {name for name, _ in model.named_parameters()}


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(description="Shrink a training checkpoint for shipping: fp16 weights (buffers such "
                                                 "as BatchNorm statistics stay fp32), no optimizer, scheduler or RNG "
                                                 "state. It still loads in val.py and demo.py.")
    parser.add_argument("source", help="checkpoint written by a training script, e.g. checkpoint/best.pth")
    parser.add_argument("target", help="where the shipped file goes, e.g. weights/my_model.pth")
    parser.add_argument("--raw_weights", action="store_true",
                        help="for a TRAIN.EMA run: ship the trained weights instead of their moving average")
    args = parser.parse_args(argv)
    half_precision_copy(args.source, args.target, args.raw_weights)
    print(f"wrote {args.target} ({Path(args.target).stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
