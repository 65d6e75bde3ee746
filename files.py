"""Writing files whole, and the output folders they go in.

Every file the project writes for keeps (checkpoints, reports, exports, crop
caches, downloads, preprocessing outputs) is first written under a temporary
name beside its target, ``.<name>.<random>.<pid>@<host>.part``, synced to disk
and then renamed over the target, so a reader never sees half a file and a
crash leaves the previous file as it was. The name says who wrote it: a kill -9
or a power cut leaves the temporary file behind, and the next writer on the
same machine calls `remove_stale_temp_files`, which deletes every such file
whose pid no longer runs. The random part keeps two live writers of one target
apart; files from other machines (a folder shared over the network) are left to
them. A file of this very process counts as live only while `writing` holds it,
so a leftover whose pid the system has since given to this process (a
restarted container) still goes.

Standard library only: preprocessing's worker processes import it.
"""
import contextlib
import csv
import fcntl
import glob
import io
import os
import secrets
import socket
import tempfile
from pathlib import Path

PART_SUFFIX = ".part"
TOKEN_BYTES = 4
# the file in a run's folder that holds its lock and names the holder's pid
LOCK_NAME = ".lock"
# the files this process is writing now, as `claim` handed them out
_held = set()


class OutputError(SystemExit):
    """An output folder that is a file, cannot be written, or is in use by another run; a SystemExit so that
    scripts print it without a traceback."""


def atomic_write(target, content):
    """Put ``content`` at ``target`` whole or not at all, and return what writing it returned.

    ``content`` is bytes, a str (written as UTF-8) or a function that writes the file at the path it is given
    (``fig.savefig``, ``torch.onnx.export``, a memory map). A function that raises leaves the previous file and
    no temporary one. The new file gets the mode that open() gives it under the umask.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with writing(target) as temp:
        result = content(temp) if callable(content) else write_new_file(temp, content)
        sync_file(temp)
        put_in_place(temp, target)
    sync_folder(target.parent)
    return result


def csv_text(rows):
    """The CSV text of ``rows`` (sequences of fields), lines ended by a newline alone, as every CSV here is written."""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


def write_new_file(path, content):
    """Create ``path`` (never over an existing file) holding ``content``, bytes or str, with the umask's mode."""
    with open(path, "xb") as handle:
        handle.write(content.encode("utf-8") if isinstance(content, str) else content)


def claim(target):
    """A fresh temporary path beside ``target``, named after this writer and held by this process until
    `release`."""
    target = Path(target)
    owner = f"{secrets.token_hex(TOKEN_BYTES)}.{os.getpid()}@{socket.gethostname()}"
    path = target.parent / f".{target.name}.{owner}{PART_SUFFIX}"
    _held.add(path)
    return path


def release(path):
    """Stop holding ``path`` (renamed into place or deleted)."""
    _held.discard(Path(path))


@contextlib.contextmanager
def writing(target):
    """A temporary path for ``target``, deleted when the block fails (Ctrl-C included)."""
    path = claim(target)
    try:
        yield path
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    finally:
        release(path)


def put_in_place(temp, target):
    """Rename the complete temporary file ``temp`` over ``target``: readers see the old file or the new one."""
    os.replace(temp, target)
    release(temp)


def sync_file(path):
    """Put the file's content on disk before it is renamed into place, so that a power cut cannot leave the new
    name over an empty file."""
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def sync_folder(folder):
    """Put the folder's renames on disk (POSIX; elsewhere a rename is as durable as the file system makes it)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    handle = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def remove_stale_temp_files(folder, names=("",)):
    """Delete the temporary files in ``folder`` (of targets whose name starts with one of ``names``) whose writer
    on this machine no longer runs."""
    for name in names:
        for path in Path(folder).glob(f".{glob.escape(name)}*{PART_SUFFIX}"):
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


def check_output_dir(path, flag="--output_dir"):
    """Create the output folder and prove it writable now, so that a bad one fails before any long work; the
    temporary files that killed writers left in it go."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise OutputError(f"{flag} {path} is a file, not a folder; name a folder (it is created when missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise OutputError(f"{flag} {path} cannot be written to ({error.strerror or error}); "
                          f"name a folder you can write to") from None
    remove_stale_temp_files(path)
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
    """The lock file, open and flocked; OutputError naming the holder's pid while another run holds it.

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
            raise OutputError(
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
