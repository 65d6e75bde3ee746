"""Writing a set of output files that belong together, and stopping cleanly.

A preprocessing run writes its train CSV, valid CSV, report and split record
as one set: a training run that read a new train CSV beside an old valid CSV
would validate on faces it trained on. Each file is first written whole under
a temporary name in the output folder and synced to disk; then all are renamed
into place in one batch. A signal at any earlier moment leaves the folder's
previous files as they were. Only a hard kill (SIGKILL, power loss) inside the
batch of renames can leave a mixed set, and the split record
(`split_record.py`), renamed last, makes that detectable. A hard kill also
leaves the temporary files (named after their writer by `files`), which
the next run into the folder removes.

SIGINT and SIGTERM only set a flag (`StopSignals`), which the run checks at
safe points: between images, before and after the batch of renames. So no
signal lands inside a rename batch, a half-built progress bar or the worker
pool's start. Blocking the signals with ``signal.pthread_sigmask`` instead
would not do: a mask applies to one thread, the kernel hands a process's
SIGTERM to any thread that does not block it (tqdm's monitor, the pool's
helpers), and Python then runs the handler in the main thread all the same.
"""
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

import files

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# A process stopped by a signal exits with 128 + its number, as shells report it.
SIGNAL_EXIT_BASE = 128


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived; raised at a safe point by `StopSignals.check`
    so that the with-blocks on the way out (the worker pool, staged files)
    clean up. A BaseException, so that no ``except Exception`` swallows it."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self):
        return signal.Signals(self.signum).name

    @property
    def exit_status(self):
        return SIGNAL_EXIT_BASE + self.signum


class StopSignals:
    """Within the context, SIGINT and SIGTERM are recorded instead of ending
    the process, and `check` raises `Interrupted` once one has arrived.
    Installs nothing outside the main thread, where Python cannot set
    handlers."""

    def __init__(self):
        self.received = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._record)
        return self

    def __exit__(self, *exc_info):
        for signum, handler in self._previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()
        return False

    def _record(self, signum, _frame):
        self.received = self.received or signum

    def check(self):
        if self.received:
            raise Interrupted(self.received)


@contextmanager
def ignoring_sigint():
    """SIGINT ignored inside the block. Processes started here inherit the
    ignored signal across exec, so a Ctrl-C sent to the terminal's whole
    process group stops only the parent, which then ends them, instead of
    each printing a KeyboardInterrupt traceback while it starts up."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)


class FileSet:
    """Files staged under temporary names in one folder, renamed into place
    together by `commit`. Leaving the context removes whatever is still
    staged, so an interruption leaves no temporary file behind; the temporary
    files a killed run left for ``names`` (`files` names their writer) are
    removed on entering it."""

    def __init__(self, folder, names=()):
        self.folder = Path(folder)
        self.names = names
        self.committed = False
        self._staged = []

    def __enter__(self):
        files.remove_stale_temp_files(self.folder, self.names)
        return self

    def __exit__(self, *exc_info):
        self.discard()
        return False

    def add(self, name, data):
        """Write ``data`` (bytes) whole under a temporary name, synced to disk,
        with the mode a plainly created file gets under the umask."""
        temporary = files.claim(self.folder / name)
        self._staged.append((temporary, self.folder / name))
        files.write_new_file(temporary, data)
        files.sync_file(temporary)

    def commit(self):
        """Rename every staged file into place, in the order added (call it
        with stop signals recorded, not acted on: see the module's docstring)."""
        while self._staged:
            temporary, path = self._staged[0]
            files.put_in_place(temporary, path)
            self._staged.pop(0)
        files.sync_folder(self.folder)
        self.committed = True

    def discard(self):
        for temporary, _ in self._staged:
            temporary.unlink(missing_ok=True)
            files.release(temporary)
        self._staged.clear()
