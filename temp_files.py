"""Temporary files that name their writer, so that a killed writer's leftovers can be told from a live one's.

A file is written whole under ``<name>.<random>.<pid>@<host>.part`` beside its
target and renamed over it when complete, so a reader never sees half a file.
A kill -9 or a power cut leaves the temporary file behind: the next writer on
the same machine calls `remove_stale`, which deletes every such file whose pid
no longer runs. The random part keeps two live writers of one target (two
downloads of the same weights) apart; files from other machines (a folder
shared over the network) are left to them. A file of this very process counts
as live only while `writing` (or `claim`) holds it, so a leftover whose pid
the system has since given to this process (a restarted container) still goes.

The crop cache (crop_cache.py), downloads (model.py) and the preprocessing
scripts' output set (preprocessing/outputs.py) all name their temporary files
here. Standard library only: preprocessing's worker processes import it.
"""
import contextlib
import os
import secrets
import socket
from pathlib import Path

PART_SUFFIX = ".part"
TOKEN_BYTES = 4
# the files this process is writing now, as `claim` handed them out
_held = set()


def claim(target, hidden=False):
    """A fresh temporary path beside ``target`` (``.``-prefixed when ``hidden``), held by this process until
    `release`."""
    target = Path(target)
    owner = f"{secrets.token_hex(TOKEN_BYTES)}.{os.getpid()}@{socket.gethostname()}"
    path = target.parent / f"{'.' if hidden else ''}{target.name}.{owner}{PART_SUFFIX}"
    _held.add(path)
    return path


def release(path):
    """Stop holding ``path`` (renamed into place or deleted)."""
    _held.discard(Path(path))


@contextlib.contextmanager
def writing(target, hidden=False):
    """A temporary path for ``target``, deleted when the block fails (Ctrl-C included); rename it in the block."""
    path = claim(target, hidden)
    try:
        yield path
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    finally:
        release(path)


def remove_stale(folder, name=""):
    """Delete the temporary files in ``folder`` (of targets whose name starts with ``name``, hidden or not) whose
    writer on this machine no longer runs."""
    for pattern in (f"{name}*{PART_SUFFIX}", f".{name}*{PART_SUFFIX}"):
        for path in Path(folder).glob(pattern):
            if is_stale(path):
                path.unlink(missing_ok=True)


def is_stale(path):
    """True for a temporary file of this machine whose writer has ended."""
    owner, _, host = path.name[:-len(PART_SUFFIX)].rpartition("@")
    pid = owner.rpartition(".")[2]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return Path(path) not in _held
    return not process_alive(int(pid))


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True
