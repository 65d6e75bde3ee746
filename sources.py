"""Where demo.py's frames come from: a folder of photos, a video file or a webcam, each frame readable or not."""
import errno
import stat
import sys
import time
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np

from geometry import IMAGE_SUFFIXES, read_rgb

DEFAULT_CAMERA = 0
UNDECODABLE_NOTE = "cannot be read as an image"
# tried in order: OpenCV builds differ in the encoders they carry, and MJPG/AVI is built in
VIDEO_CODECS = (("mp4v", ".mp4"), ("MJPG", ".avi"))
# frame rate of an annotated video when the source does not report one (many video files from webcams), or when
# a camera run ends before two frames arrived
FALLBACK_FPS = 25.0


class Frame(NamedTuple):
    """One photo or video frame; ``rgb`` is None, with the reason in ``problem``, when it cannot be read.
    ``arrived`` (time.monotonic) is when a video or camera handed it over."""

    name: str
    index: int
    rgb: np.ndarray = None
    problem: str = None
    arrived: float = None


def open_camera(index):
    """The webcam as a cv2.VideoCapture; a function of its own so that tests can stand a file in for it.

    A one-frame buffer (where the backend honours it) keeps the live view
    current when estimation is slower than the camera, instead of replaying
    frames queued seconds ago.
    """
    capture = cv2.VideoCapture(index)
    capture.set(cv2.CAP_PROP_BUFFERSIZE, 1)
    return capture


def entry_problem(path):
    """Why a folder entry named like a photo is not a file that can be read, or None when it is one."""
    try:
        mode = path.stat().st_mode  # follows links
    except FileNotFoundError:
        return "dangling link: its target does not exist" if path.is_symlink() else "vanished before it was read"
    except OSError as error:
        return "link loop" if error.errno == errno.ELOOP else f"cannot be read: {error.strerror}"
    if stat.S_ISDIR(mode):
        return "a folder, not an image file"
    return None if stat.S_ISREG(mode) else "not a regular file"


def read_photo_file(path):
    """(RGB image, None), or (None, the reason it cannot be read)."""
    try:
        rgb = read_rgb(path)
    except OSError as error:
        return None, f"cannot be read: {error.strerror or error}"
    return (rgb, None) if rgb is not None else (None, UNDECODABLE_NOTE)


class PhotoSource:
    """Every entry of a folder named like an image, in name order, each as frame 0, readable or not."""

    still = True
    fps = None

    def __init__(self, folder):
        self.folder = Path(folder).expanduser()
        if not self.folder.is_dir():
            raise SystemExit(f"--img_dir {self.folder} is not a folder")
        self.entries = sorted(p for p in self.folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.entries:
            raise SystemExit(f"--img_dir {self.folder} holds no images ({' '.join(sorted(IMAGE_SUFFIXES))})")
        self.name = str(self.folder)
        self.stopped_early = False

    def inputs(self):
        """The files read: nothing the run writes may replace them."""
        return [path for path in self.entries if entry_problem(path) is None]

    def outputs(self):
        """(name in the output folder, the source whose annotated copy it is), for every file that may be written."""
        return [(path.name, path.name) for path in self.inputs()]

    def __iter__(self):
        for path in self.entries:
            problem = entry_problem(path)
            rgb, problem = read_photo_file(path) if problem is None else (None, problem)
            yield Frame(path.name, 0, rgb, problem)


class CaptureSource:
    """Frames of a video file or a webcam, numbered from 0; the capture is released when iteration ends.

    A read that fails before the frame count the file announces means a
    truncated or corrupt file: the video ends there, cleanly, and says so.
    """

    still = False

    def __init__(self, capture, name, stem, path=None):
        self.capture = capture
        self.name = name
        self.stem = stem
        self.path = path
        self.live = path is None
        fps = capture.get(cv2.CAP_PROP_FPS)
        self.fps = fps if fps > 0 else FALLBACK_FPS  # also catches NaN
        count = capture.get(cv2.CAP_PROP_FRAME_COUNT)
        self.announced = int(count) if count > 0 else 0
        self.stopped_early = False

    def inputs(self):
        return [] if self.path is None else [self.path]

    def outputs(self):
        return [(f"{self.stem}{suffix}", self.name) for _, suffix in VIDEO_CODECS]

    def __iter__(self):
        index = 0
        try:
            while True:
                ok, bgr = self.capture.read()
                arrived = time.monotonic()
                if not ok or bgr is None:
                    break
                yield Frame(self.name, index, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), arrived=arrived)
                index += 1
        finally:
            self.capture.release()
        # reached only when a read failed, not when the caller stopped early
        self.report_end(index)

    def report_end(self, index):
        if self.live:
            self.stopped_early = True
            print(f"{self.name} stopped delivering frames after {index}", file=sys.stderr)
        elif index < self.announced:
            self.stopped_early = True
            print(f"{self.name}: frame {index} of the {self.announced} the file announces cannot be read "
                  f"(truncated or corrupt file); stopped there, keeping the {index} frames done", file=sys.stderr)


def open_source(args):
    """Open the chosen source now, so that a missing camera or file fails before the model loads."""
    if args.img_dir:
        return PhotoSource(args.img_dir)
    if args.video:
        path = Path(args.video).expanduser()
        if not path.is_file():
            raise SystemExit(f"--video {path} does not exist")
        capture = cv2.VideoCapture(str(path))
        if not capture.isOpened():
            raise SystemExit(f"OpenCV cannot read the video {path} (unsupported format or codec?)")
        return CaptureSource(capture, path.name, path.stem, path)
    index = DEFAULT_CAMERA if args.camera is None else args.camera
    capture = open_camera(index)
    if not capture.isOpened():
        capture.release()
        raise SystemExit(
            f"no webcam at --camera {index} (none attached, in use, or no permission). "
            f"To run on files instead, pass --img_dir DIR for photos or --video FILE for a video."
        )
    return CaptureSource(capture, f"camera{index}", f"camera{index}")

