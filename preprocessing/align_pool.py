"""Aligning a data set's photos in a pool of worker processes, with a progress bar, stoppable at any moment.

Each worker builds one `FaceAligner` and aligns chunks of paths; the parent collects the outcomes in order, looking
for SIGINT and SIGTERM between results (see outputs.StopSignals).
"""
import multiprocessing
import signal
from dataclasses import dataclass

import cv2
from tqdm import tqdm

import geometry
from preprocessing import outputs
from preprocessing.align import FaceAligner, model_paths

# Images handed to a worker at a time: large enough to keep the pool's
# messaging negligible next to ~20 ms of detection per image.
CHUNK_SIZE = 16
PROGRESS_MIN_INTERVAL_S = 1.0
# How often the wait for the worker pool's next result looks for SIGINT and
# SIGTERM: short enough to stop at once, long enough to cost nothing.
STOP_POLL_S = 0.1
# Workers start as fresh interpreters, not forks: a forked child of a process
# that has used OpenCV's thread pool hangs in cv2.setNumThreads (and the
# caller may be a demo or a test that has).
POOL_START_METHOD = "spawn"
# why an image has no row of its own (the report lists it)
REASON_UNREADABLE = "unreadable image"
REASON_NO_FACE = "no face found"


_worker_aligner = None


@dataclass(frozen=True)
class Outcome:
    """What alignment made of one image: its face's ``deg`` and ``box``, or
    the ``reason`` there is none. ``size`` (width, height) is the decoded
    image's, known whenever it was readable, for --keep_undetected's box."""

    deg: float | None = None
    box: tuple | None = None
    size: tuple | None = None
    reason: str | None = None


def check_models(detector, landmarks):
    """SystemExit, before any work, when dlib's model files are missing."""
    try:
        model_paths(detector, landmarks)
    except (ModuleNotFoundError, FileNotFoundError) as error:
        raise SystemExit(str(error)) from None


def _init_worker(detector, landmarks):
    """Pool initializer: one aligner per process, built once. Ctrl-C is the
    parent's to handle: it ends the pool (see outputs.ignoring_sigint)."""
    global _worker_aligner
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cv2.setNumThreads(1)  # the pool already uses every CPU
    _worker_aligner = FaceAligner(detector=detector, landmarks=landmarks)


def _align_chunk_in_worker(paths):
    return [_align_path(_worker_aligner, path) for path in paths]


def _align_path(aligner, path):
    """The Outcome of aligning the largest face in the image at ``path``."""
    try:
        rgb = geometry.read_rgb(path)
    except OSError:
        rgb = None
    if rgb is None:
        return Outcome(reason=REASON_UNREADABLE)
    height, width = rgb.shape[:2]
    face = aligner.align_largest(rgb)
    if face is None:
        return Outcome(size=(width, height), reason=REASON_NO_FACE)
    return Outcome(face.deg, face.box, (width, height))


def align_into(outcomes, paths, detector, landmarks, workers, stop):
    """Append the Outcome of every path to ``outcomes``, in order, with a
    progress bar, until done or until ``stop`` (outputs.StopSignals) has
    received a signal. Filling the caller's list keeps what was done; leaving
    the pool's with-block ends its workers."""
    # Checked here: a pool whose initializer fails restarts workers forever.
    check_models(detector, landmarks)
    workers = max(1, min(workers, len(paths)))
    if workers == 1:
        aligner = FaceAligner(detector=detector, landmarks=landmarks)
        _collect(([_align_path(aligner, path)] for path in paths), outcomes, len(paths), stop)
        return
    context = multiprocessing.get_context(POOL_START_METHOD)
    with outputs.ignoring_sigint():
        pool = context.Pool(workers, initializer=_init_worker, initargs=(detector, landmarks))
    with pool:
        # Chunked here rather than by imap's chunksize, which would hide the
        # iterator whose next() takes a timeout.
        chunks = [paths[start:start + CHUNK_SIZE] for start in range(0, len(paths), CHUNK_SIZE)]
        results = pool.imap(_align_chunk_in_worker, chunks)
        _collect(_polled(results, len(chunks), stop), outcomes, len(paths), stop)


def _polled(results, count, stop):
    """The pool's ``count`` results, waiting for each in short slices so that
    a signal is acted on while the workers are busy."""
    for _ in range(count):
        while True:
            stop.check()
            try:
                yield results.next(timeout=STOP_POLL_S)
                break
            except multiprocessing.TimeoutError:
                continue


def _collect(chunks, outcomes, total, stop):
    """Append each chunk's outcomes; ``stop`` is checked after each chunk."""
    with tqdm(total=total, unit="img", mininterval=PROGRESS_MIN_INTERVAL_S) as progress:
        for chunk in chunks:
            outcomes.extend(chunk)
            progress.update(len(chunk))
            stop.check()
