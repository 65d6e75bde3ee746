"""The page's private upload folder: where Gradio puts an upload, how long it stays, and how much it may hold.

An upload lands in a folder of its own (mode 700; in memory where there is room), is deleted once a request has read
it or after UNCLAIMED_S unread, and is admitted only while the folder's budget holds its declared size.
"""
import collections
import contextlib
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

from starlette.responses import PlainTextResponse

from defaults import MEGA

# the bytes the upload folder may hold at once (uploads in progress count with their declared size)
UPLOAD_BUDGET_BYTES = 1_000_000_000
# an upload that no request has read this long after it arrived (a client that left, a file sent to Gradio's upload
# route alone) is deleted; the folder is checked this often
UNCLAIMED_S = 120
SWEEP_EVERY_S = 10
# Gradio's upload route, behind which UploadBudget stands
UPLOAD_ROUTE = "/gradio_api/upload"
HTTP_OK = 200
HTTP_TOO_LARGE = 413
HTTP_LENGTH_REQUIRED = 411
# where the private upload folder goes: memory, where the system has it
MEMORY_FOLDER = Path("/dev/shm")


def upload_parent(budget):
    """MEMORY_FOLDER when it can hold ``budget`` bytes more (a default Docker container gives it 64 MB), else None:
    the system's temporary folder, on disk."""
    if not (MEMORY_FOLDER.is_dir() and os.access(MEMORY_FOLDER, os.W_OK)):
        return None
    return MEMORY_FOLDER if shutil.disk_usage(MEMORY_FOLDER).free >= budget else None


class UploadFolder:
    """Gradio's upload folder for this server: private, in memory where it fits, bounded, and removed when the server
    stops.

    Gradio stores an upload under a folder named by its content's hash, so two
    uploads of the same file share one path; the file is deleted once every
    upload of it has been read (UploadBudget counts them) and no request reads
    it, not when the first one has read it. A file no request reads within
    UNCLAIMED_S is deleted by `sweep`, which a thread runs every SWEEP_EVERY_S
    while the server is up (`start_sweeping`). `admit` keeps the bytes held
    within ``budget``.
    """

    def __init__(self, budget=None):
        self.budget = UPLOAD_BUDGET_BYTES if budget is None else budget
        parent = upload_parent(self.budget)
        self.in_memory = parent is not None
        self.path = Path(tempfile.mkdtemp(prefix="age-app-", dir=parent)).resolve()
        self.readers = collections.Counter()
        self.arrivals = collections.Counter()  # uploads stored under a path and not yet read (see `arrived`)
        self.reserved = 0
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.sweeper = None
        self.previous = os.environ.get("GRADIO_TEMP_DIR")
        os.environ["GRADIO_TEMP_DIR"] = str(self.path)  # Gradio reads it when the page is built

    def files(self):
        return [path for path in self.path.rglob("*") if path.is_file()]

    def held_bytes(self):
        """Bytes of the files in the folder now (a file deleted meanwhile counts nothing)."""
        total = 0
        for path in self.files():
            with contextlib.suppress(FileNotFoundError):
                total += path.stat().st_size
        return total

    def admit(self, length):
        """Reserve ``length`` bytes for an upload in progress, or say why it is refused (None when admitted).

        The upload's bytes count twice while it is stored (reserved and in the folder), so the bound errs on
        the safe side; `release` ends the reservation when the request ends.
        """
        with self.lock:
            held = self.held_bytes() + self.reserved
            if held + length > self.budget:
                return (f"this page holds {held / MEGA:.0f} MB of uploads and takes at most {self.budget / MEGA:.0f} "
                        f"MB; this upload ({length / MEGA:.1f} MB) must wait: try again in a minute")
            self.reserved += length
            return None

    def release(self, length):
        with self.lock:
            self.reserved -= length

    def sweep(self, now=None):
        """Delete every file that no request is reading and that arrived (was last written) over UNCLAIMED_S ago."""
        now = time.time() if now is None else now
        for path in self.files():
            with self.lock:
                if self.readers[path] > 0:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    if now - path.stat().st_mtime > UNCLAIMED_S:
                        self.delete(path)

    def start_sweeping(self):
        def sweep_until_closed():
            while not self.stopped.wait(SWEEP_EVERY_S):
                self.sweep()

        self.sweeper = threading.Thread(target=sweep_until_closed, name="upload-sweeper", daemon=True)
        self.sweeper.start()

    @contextlib.contextmanager
    def reading(self, path):
        """The bytes of the upload at ``path``, deleted once no request reads it any more; only uploads are read."""
        path = Path(path).resolve()
        if not path.is_relative_to(self.path):
            raise PermissionError(f"{path} is not an upload of this page")
        with self.lock:
            self.readers[path] += 1
        try:
            yield path.read_bytes()
        finally:
            with self.lock:
                self.readers[path] -= 1
                self.arrivals[path] -= 1
                if self.readers[path] <= 0 and self.arrivals[path] <= 0:
                    self.delete(path)

    def arrived(self, paths):
        """Note uploads Gradio has stored: an upload of a file already waiting shares its path, which must outlive
        the first request that reads it."""
        with self.lock:
            for path in paths:
                self.arrivals[Path(path).resolve()] += 1

    def delete(self, path):
        """Delete an upload and forget it; called with the lock held."""
        self.readers.pop(path, None)
        self.arrivals.pop(path, None)
        path.unlink(missing_ok=True)
        if path.parent != self.path:
            with contextlib.suppress(OSError):
                path.parent.rmdir()  # the hash folder, when nothing else is in it

    def close(self):
        self.stopped.set()
        if self.sweeper is not None:
            self.sweeper.join()
        shutil.rmtree(self.path, ignore_errors=True)
        if self.previous is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = self.previous


class UploadBudget:
    """ASGI middleware before Gradio's upload route: an upload is admitted only when its declared size fits the upload
    folder's budget (`UploadFolder.admit`), and refused before its first byte is stored otherwise.

    The server reads no more of a request than its Content-Length, so the declared size bounds what is stored;
    an upload that declares none is refused.
    """

    def __init__(self, app, folder):
        self.app = app
        self.folder = folder

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].endswith(UPLOAD_ROUTE):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if not declared.isdigit():
            await refuse(scope, receive, send, HTTP_LENGTH_REQUIRED, "an upload must declare its size (Content-Length)")
            return
        length = int(declared)
        refusal = self.folder.admit(length)
        if refusal is not None:
            await refuse(scope, receive, send, HTTP_TOO_LARGE, refusal)
            return
        try:
            await self.app(scope, receive, self.noting_stored(send))
        finally:
            self.folder.release(length)

    def noting_stored(self, send):
        """``send``, noting the paths of a successful upload's answer (a JSON list) before the client gets them."""
        answer = {"status": None, "body": b""}

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                answer["status"] = message["status"]
            elif message["type"] == "http.response.body" and answer["status"] == HTTP_OK:
                answer["body"] += message.get("body", b"")
                if not message.get("more_body"):
                    self.folder.arrived(json.loads(answer["body"]))
            await send(message)

        return send_and_note


async def refuse(scope, receive, send, status, message):
    await PlainTextResponse(message, status_code=status)(scope, receive, send)

