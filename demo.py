"""Estimate the age of every face in photos, a video or a webcam stream.

    python demo.py                                  # webcam 0, live window (or printed results when headless)
    python demo.py --img_dir PHOTOS --output_dir OUT
    python demo.py --video clip.mp4 --output_dir OUT --resume checkpoint/best.pth

Faces are found and aligned by preprocessing/align.py and cropped by
geometry.aligned_crop exactly as for training, with the crop size and expand
stored in the checkpoint, so the model sees faces framed as it learned them.
All faces of a frame are estimated in one batch.

With --output_dir, OUT/predictions.csv holds one row per face
(source, frame, face, x1, y1, x2, y2, age, age_sd), and the annotated photos
(same file names) or the annotated video (OUT/<name>.mp4) are written beside
it. A photo with no face, or one that cannot be read, gets one row with empty
face fields, so every photo is accounted for. Without --output_dir the
results are shown in a window when OpenCV has a GUI and a display exists
(q or Esc quits; with photos any other key shows the next), otherwise printed.
"""
import argparse
import csv
import functools
import io
import itertools
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from checkpoint import atomic_write_text, checkpoint_cfg, load_checkpoint
from dataset import normalize
from geometry import aligned_crop, read_rgb
from model import fetch_verified, input_settings
from objectives import expected_age
from preprocessing.align import DETECTORS, LANDMARK_MODELS, FaceAligner
from preprocessing.common import DEFAULT_DETECTOR, DEFAULT_LANDMARKS
from runtime import Runtime, autocast, setup_runtime
from val import age_logits, load_model

DEFAULT_WEIGHTS = Path(__file__).parent / "weights" / "utkface_tinyage.pth"
DEFAULT_CAMERA = 0
# what OpenCV decodes; other files in --img_dir (notes, a predictions.csv) are left alone
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".dib", ".webp",
                            ".tif", ".tiff", ".jp2", ".pbm", ".pgm", ".ppm", ".pnm"})
CSV_NAME = "predictions.csv"
CSV_COLUMNS = ("source", "frame", "face", "x1", "y1", "x2", "y2", "age", "age_sd")
# a stream's CSV is rewritten this often, so a crash loses at most these seconds of rows
CSV_SAVE_INTERVAL_S = 10.0
# tried in order: OpenCV builds differ in the encoders they carry, and MJPG/AVI is built in
VIDEO_CODECS = (("mp4v", ".mp4"), ("MJPG", ".avi"))
# frame rate of the annotated video when the source does not report one (many webcams)
FALLBACK_FPS = 25.0
# label height as a share of the image's longer side, so labels read alike at any resolution
FONT_FRACTION = 0.03
MIN_FONT_PX = 12
LINE_FRACTION = 0.004
LABEL_PAD_FRACTION = 0.2
BOX_COLOR = (0, 230, 0)
TEXT_COLOR = (0, 0, 0)
WINDOW_NAME = "age estimation"
QUIT_KEYS = (ord("q"), 27)  # q, Esc
STREAM_WAIT_MS = 1  # keep a video or webcam running
PHOTO_WAIT_MS = 0  # hold each photo until a key is pressed
# weight of the previous estimate in the live frame rate, which steadies the number on screen
FPS_SMOOTHING = 0.9
MS_PER_S = 1000.0
# HOG margins of real faces in photos sit well above this; a mission patch on the sample photo scores 0.1
DEFAULT_MIN_SCORE = 0.3


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_argument_group("source (one of; default: --camera 0)").add_mutually_exclusive_group()
    source.add_argument("--camera", type=int, metavar="N",
                        help=f"webcam index for OpenCV (default: {DEFAULT_CAMERA} when no other source is given)")
    source.add_argument("--img_dir", metavar="DIR", help="every image in DIR, in name order")
    source.add_argument("--video", metavar="FILE", help="a video file, any format OpenCV reads")
    parser.add_argument("--output_dir", metavar="OUT",
                        help=f"write OUT/{CSV_NAME} and the annotated photos or video here "
                             f"(default: show a window, or print the results when there is no display)")
    parser.add_argument("--max_frames", type=int, metavar="N",
                        help="stop after N frames (or photos); handy to try a camera or a long video")
    model = parser.add_argument_group("model (default: the shipped weights/utkface_tinyage.pth)")
    weights = model.add_mutually_exclusive_group()
    weights.add_argument("--resume", metavar="CKPT", help="a checkpoint written by train.py, train-ldl.py or train-mt.py")
    weights.add_argument("--url", help="download a checkpoint from URL once into the weights cache (needs --sha256)")
    model.add_argument("--sha256", help="sha256 of the --url file; a download that does not match is refused")
    model.add_argument("--device", choices=("cpu", "cuda"), help="run the model here (default: cuda when available)")
    model.add_argument("--expand", type=float, metavar="E",
                       help="override the face-box expand stored in the checkpoint (use the training value)")
    model.add_argument("--tta", action="store_true",
                       help="average the predicted distributions of each face and its mirror (about 2x model time)")
    faces = parser.add_argument_group("face detection")
    faces.add_argument("--detector", choices=DETECTORS, default=DEFAULT_DETECTOR,
                       help="dlib detector: hog (fast on a CPU) or cnn (more robust to pose, slow without CUDA) "
                            "(default: %(default)s)")
    faces.add_argument("--landmarks", type=int, choices=LANDMARK_MODELS, default=DEFAULT_LANDMARKS,
                       help="dlib landmark model that levels the eyes; use the one the training data was "
                            "aligned with (default: %(default)s)")
    faces.add_argument("--upsample", type=int, metavar="K",
                       help="run one detection pass with K 2x upsamplings: 0 is fastest on video, 1 or 2 find "
                            "small faces in group photos (default: the automatic passes of preprocessing)")
    faces.add_argument("--min_score", type=float, default=DEFAULT_MIN_SCORE,
                       help="drop detections whose detector confidence (HOG: SVM margin) is below this; in the "
                            "wild, weak HOG hits are mostly badges and patterns (default: %(default)s)")
    return parser


# Model ----------------------------------------------------------------------


def model_file(args):
    """The checkpoint to load: --url (downloaded and verified), --resume, or the shipped model."""
    if args.sha256 and not args.url:
        raise SystemExit("--sha256 checks a --url download; pass --url too, or drop --sha256")
    if args.url:
        return fetch_verified(args.url, args.sha256)
    if args.resume:
        path = Path(args.resume).expanduser()
        if not path.is_file():
            raise SystemExit(f"--resume {path} does not exist; pass a .pth written by train.py, train-ldl.py or train-mt.py")
        return path
    if not DEFAULT_WEIGHTS.is_file():
        raise SystemExit(
            f"the shipped model {DEFAULT_WEIGHTS} is missing. Pass --resume CKPT (a checkpoint written by the "
            f"training scripts) or --url URL --sha256 HASH, or restore the file (git checkout -- weights/)."
        )
    return DEFAULT_WEIGHTS


@dataclass(frozen=True)
class Estimation:
    """How a face becomes model input, taken from the checkpoint so it matches training."""

    runtime: Runtime
    expand: float
    img_size: int
    channels_last: bool
    amp: str
    tta: bool
    input: dict


def load_estimator(path, args):
    """The trained network and its crop settings, from the checkpoint alone (plus --expand/--tta)."""
    state = load_checkpoint(path)
    cfg = checkpoint_cfg(state)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for, but PyTorch sees no CUDA device; use --device cpu")
    runtime = setup_runtime(args.device)
    model = load_model(state, runtime, cfg)
    expand = args.expand if args.expand is not None else float(state.get("expand", cfg.DATA.EXPAND))
    how = Estimation(runtime, expand, cfg.MODEL.IMG_SIZE, cfg.MODEL.CHANNELS_LAST, cfg.TRAIN.AMP,
                     args.tta or cfg.TEST.TTA, state.get("input") or input_settings(cfg.MODEL.ARCH))
    return model, how


@torch.no_grad()
def estimate_faces(model, faces, rgb, how):
    """Expected age and its sd for each face, as NumPy arrays, from one batch holding every face of the frame."""
    if not faces:
        return np.zeros(0), np.zeros(0)
    crops = np.stack([aligned_crop(rgb, face.deg, face.box, how.expand, how.img_size) for face in faces])
    images = torch.from_numpy(crops).permute(0, 3, 1, 2).to(how.runtime.device)
    images = normalize(images, how.input, channels_last=how.channels_last)
    with autocast(how.runtime, how.amp):
        logits = age_logits(model, images, how.tta)
    mean, sd = expected_age(logits)
    return mean.cpu().numpy(), sd.cpu().numpy()


def make_aligner(args):
    """The face aligner of preprocessing; missing dlib model files give their message, not a traceback."""
    try:
        return FaceAligner(detector=args.detector, landmarks=args.landmarks, upsample=args.upsample)
    except (ModuleNotFoundError, FileNotFoundError, ValueError) as error:
        raise SystemExit(str(error)) from None


# Sources --------------------------------------------------------------------


def open_camera(index):
    """The webcam as a cv2.VideoCapture; a function of its own so that tests can stand a file in for it.

    A one-frame buffer (where the backend honours it) keeps the live view
    current when estimation is slower than the camera, instead of replaying
    frames queued seconds ago.
    """
    capture = cv2.VideoCapture(index)
    capture.set(cv2.CAP_PROP_BUFFERSIZE, 1)
    return capture


class PhotoSource:
    """Every image file of a folder, in name order, each as frame 0; an unreadable one comes as None."""

    still = True
    fps = None

    def __init__(self, folder):
        self.folder = Path(folder).expanduser()
        if not self.folder.is_dir():
            raise SystemExit(f"--img_dir {self.folder} is not a folder")
        self.files = sorted(p for p in self.folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self.files:
            raise SystemExit(f"--img_dir {self.folder} holds no images ({' '.join(sorted(IMAGE_SUFFIXES))})")
        self.name = str(self.folder)
        self.stopped_early = False

    def __iter__(self):
        for path in self.files:
            try:
                rgb = read_rgb(path)
            except OSError:
                rgb = None
            yield path.name, 0, rgb


class CaptureSource:
    """Frames of a video file or a webcam, numbered from 0; the capture is released when iteration ends.

    A read that fails before the frame count the file announces means a
    truncated or corrupt file: the video ends there, cleanly, and says so.
    """

    still = False

    def __init__(self, capture, name, stem, live):
        self.capture = capture
        self.name = name
        self.stem = stem
        self.live = live
        fps = capture.get(cv2.CAP_PROP_FPS)
        self.fps = fps if fps > 0 else FALLBACK_FPS  # also catches NaN
        count = capture.get(cv2.CAP_PROP_FRAME_COUNT)
        self.announced = int(count) if count > 0 else 0
        self.stopped_early = False

    def __iter__(self):
        index = 0
        try:
            while True:
                ok, bgr = self.capture.read()
                if not ok or bgr is None:
                    break
                yield self.name, index, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
                index += 1
        finally:
            self.capture.release()
        # reached only when a read failed, not when the caller stopped early
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
        return CaptureSource(capture, path.name, path.stem, live=False)
    index = DEFAULT_CAMERA if args.camera is None else args.camera
    capture = open_camera(index)
    if not capture.isOpened():
        capture.release()
        raise SystemExit(
            f"no webcam at --camera {index} (none attached, in use, or no permission). "
            f"To run on files instead, pass --img_dir DIR for photos or --video FILE for a video."
        )
    return CaptureSource(capture, f"camera{index}", f"camera{index}", live=True)


# Outputs --------------------------------------------------------------------


class PredictionWriter:
    """The rows of predictions.csv, kept in memory and written atomically as a whole.

    Written at the end, every CSV_SAVE_INTERVAL_S on the way and when a run
    stops early, so a crash mid-video loses a few seconds at most and never
    leaves half a file.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.rows = []
        self.saved_at = time.monotonic()

    def add(self, source, frame, faces, ages, sds, keep_empty):
        """One row per face; with ``keep_empty``, one row with empty face fields when there is none."""
        if not faces and keep_empty:
            self.rows.append([source, frame] + [""] * (len(CSV_COLUMNS) - 2))
        for index, (face, age, sd) in enumerate(zip(faces, ages, sds)):
            box = [int(round(v)) for v in face.det_box]
            self.rows.append([source, frame, index, *box, f"{age:.2f}", f"{sd:.2f}"])
        if time.monotonic() - self.saved_at >= CSV_SAVE_INTERVAL_S:
            self.save()

    def save(self):
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        writer.writerows(self.rows)
        atomic_write_text(self.path, buffer.getvalue())
        self.saved_at = time.monotonic()


class ImageSink:
    """Annotated photos in the output folder, under the photos' own file names and formats."""

    def __init__(self, folder):
        self.folder = self.path = Path(folder)
        self.written = 0

    def write(self, name, rgb):
        ok, data = cv2.imencode(Path(name).suffix, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        if not ok:
            raise SystemExit(f"OpenCV cannot encode {name} in its own format")
        (self.folder / name).write_bytes(data.tobytes())
        self.written += 1

    def close(self):
        """Nothing to finish: each photo is complete once written."""


class VideoSink:
    """One annotated video, opened at the first frame, when the frame size is known."""

    def __init__(self, folder, stem, fps):
        self.folder = Path(folder)
        self.stem = stem
        self.fps = fps
        self.writer = None
        self.path = None
        self.written = 0

    def write(self, name, rgb):
        if self.writer is None:
            self.writer, self.path = open_video_writer(self.folder, self.stem, self.fps, rgb.shape[1], rgb.shape[0])
        self.writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        self.written += 1

    def close(self):
        """Release the writer: an mp4 is only playable once its index is written."""
        if self.writer is not None:
            self.writer.release()


def open_video_writer(folder, stem, fps, width, height):
    for fourcc, suffix in VIDEO_CODECS:
        path = folder / f"{stem}{suffix}"
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (width, height))
        if writer.isOpened():
            return writer, path
        writer.release()
        path.unlink(missing_ok=True)
    raise SystemExit(f"this OpenCV build cannot write a video with any of {', '.join(c for c, _ in VIDEO_CODECS)}")


def check_output_dir(output_dir, source, args):
    """Refuse an output that would overwrite the input: annotated photos keep the photos' names."""
    if args.img_dir and output_dir.resolve() == Path(args.img_dir).expanduser().resolve():
        raise SystemExit("--output_dir must differ from --img_dir: the annotated photos keep their names")
    if args.video:
        video = Path(args.video).expanduser().resolve()
        if any((output_dir / f"{source.stem}{suffix}").resolve() == video for _, suffix in VIDEO_CODECS):
            raise SystemExit(f"--output_dir would overwrite the video {video} with its annotated copy; choose another")


@functools.lru_cache(maxsize=None)
def label_font(size):
    """Pillow's bundled scalable font: it has the ± sign, which cv2.putText cannot draw."""
    return ImageFont.load_default(size=size)


def draw_label(draw, text, left, bottom, font, pad, width):
    """Text on a filled box whose lower edge sits at ``bottom`` (pushed inside the image when needed)."""
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    box_w, box_h = x1 - x0 + 2 * pad, y1 - y0 + 2 * pad
    top = max(0, bottom - box_h)
    left = min(max(0, left), max(0, width - box_w))
    draw.rectangle((left, top, left + box_w, top + box_h), fill=BOX_COLOR)
    draw.text((left + pad - x0, top + pad - y0), text, fill=TEXT_COLOR, font=font)


def annotate(rgb, faces, ages, sds, caption=None):
    """A copy of the frame with each face's box and "age ± sd" label, sized to the image so it reads at any resolution."""
    height, width = rgb.shape[:2]
    side = max(height, width)
    font_px = max(MIN_FONT_PX, round(FONT_FRACTION * side))
    line = max(1, round(LINE_FRACTION * side))
    pad = max(1, round(LABEL_PAD_FRACTION * font_px))
    font = label_font(font_px)
    image = Image.fromarray(rgb)
    draw = ImageDraw.Draw(image)
    for face, age, sd in zip(faces, ages, sds):
        x1, y1, x2, y2 = face.det_box
        draw.rectangle((x1, y1, x2, y2), outline=BOX_COLOR, width=line)
        draw_label(draw, f"{age:.0f} ± {sd:.0f}", x1, y1, font, pad, width)
    if caption:
        draw_label(draw, caption, 0, 0, font, pad, width)
    return np.asarray(image)


def display_available():
    """cv2.imshow needs an OpenCV built with a GUI (opencv-python-headless has none) and, on Linux, a display."""
    gui = re.search(r"^\s*GUI:\s*(\S+)", cv2.getBuildInformation(), re.MULTILINE)
    if gui is None or gui.group(1).upper() == "NONE":
        return False
    if sys.platform.startswith("linux"):
        return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    return True


def show(rgb, wait_ms):
    """Show a frame; False once the user presses q or Esc or closes the window."""
    cv2.imshow(WINDOW_NAME, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    key = cv2.waitKey(wait_ms) & 0xFF
    return key not in QUIT_KEYS and cv2.getWindowProperty(WINDOW_NAME, cv2.WND_PROP_VISIBLE) >= 1


def print_faces(name, frame, faces, ages, sds, still):
    """The results as text, for a run with neither --output_dir nor a display."""
    where = name if still else f"{name} frame {frame}"
    if not faces and still:
        print(f"{where}: no face")
    for index, (face, age, sd) in enumerate(zip(faces, ages, sds)):
        box = ", ".join(str(int(round(v))) for v in face.det_box)
        print(f"{where} face {index}: {age:.0f} ± {sd:.0f} years at ({box})")


# The run --------------------------------------------------------------------


@dataclass
class Tally:
    """What the run did and how long its parts took, for the closing report."""

    frames: int = 0
    faces: int = 0
    detect_s: float = 0.0
    estimate_s: float = 0.0
    live_fps: float = 0.0
    interrupted: bool = False
    unreadable: list = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    last_frame: float = field(default_factory=time.perf_counter)

    def tick(self):
        """Count a finished frame and update the smoothed frame rate shown live."""
        now = time.perf_counter()
        rate = 1.0 / max(now - self.last_frame, sys.float_info.epsilon)
        self.live_fps = rate if self.frames == 0 else FPS_SMOOTHING * self.live_fps + (1 - FPS_SMOOTHING) * rate
        self.last_frame = now
        self.frames += 1


def process(source, aligner, model, how, writer, sink, window, max_frames, min_score):
    """Detect, estimate and output every frame; outputs are closed and saved however the loop ends."""
    tally = Tally()
    frames = iter(source)
    try:
        for name, index, rgb in itertools.islice(frames, max_frames):
            if rgb is None:
                tally.unreadable.append(name)
                print(f"{name}: cannot be read as an image; skipped", file=sys.stderr)
                if writer is not None:
                    writer.add(name, index, [], [], [], keep_empty=True)
                continue
            start = time.perf_counter()
            faces = [face for face in aligner.align_all(rgb) if face.score >= min_score]
            detected = time.perf_counter()
            ages, sds = estimate_faces(model, faces, rgb, how)
            tally.detect_s += detected - start
            tally.estimate_s += time.perf_counter() - detected
            tally.faces += len(faces)
            if writer is not None:
                writer.add(name, index, faces, ages, sds, keep_empty=source.still)
            if sink is not None:
                sink.write(name, annotate(rgb, faces, ages, sds))
            keep_going = True
            if window:
                caption = None if source.still else f"{tally.live_fps:.1f} fps"
                wait_ms = PHOTO_WAIT_MS if source.still else STREAM_WAIT_MS
                keep_going = show(annotate(rgb, faces, ages, sds, caption), wait_ms)
            elif writer is None:
                print_faces(name, index, faces, ages, sds, source.still)
            tally.tick()
            if not keep_going:
                break
    except KeyboardInterrupt:
        tally.interrupted = True
        print("stopped by Ctrl-C; keeping what was done", file=sys.stderr)
    finally:
        frames.close()
        if sink is not None:
            sink.close()
        if writer is not None:
            writer.save()
        if window:
            cv2.destroyAllWindows()
    return tally


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.max_frames is not None and args.max_frames < 1:
        raise SystemExit("--max_frames must be at least 1")
    weights = model_file(args)
    source = open_source(args)
    output_dir = Path(args.output_dir).expanduser() if args.output_dir else None
    if output_dir is not None:
        check_output_dir(output_dir, source, args)
    model, how = load_estimator(weights, args)
    aligner = make_aligner(args)
    writer = sink = None
    if output_dir is not None:
        output_dir.mkdir(parents=True, exist_ok=True)
        writer = PredictionWriter(output_dir / CSV_NAME)
        sink = ImageSink(output_dir) if source.still else VideoSink(output_dir, source.stem, source.fps)
    window = output_dir is None and display_available()
    tally = process(source, aligner, model, how, writer, sink, window, args.max_frames, args.min_score)

    seconds = time.perf_counter() - tally.started
    per_frame = MS_PER_S / max(tally.frames, 1)
    summary = {
        "source": source.name, "model": str(weights), "device": str(how.runtime.device),
        "frames": tally.frames, "faces": tally.faces, "unreadable": tally.unreadable,
        "stopped_early": source.stopped_early or tally.interrupted,
        "seconds": seconds, "fps": tally.frames / seconds if seconds > 0 else 0.0,
        "detect_ms": tally.detect_s * per_frame, "estimate_ms": tally.estimate_s * per_frame,
        "predictions": str(writer.path) if writer else None,
        "annotated": str(sink.path) if sink and sink.path else None,
    }
    print(f"{summary['frames']} frames, {summary['faces']} faces in {seconds:.1f} s ({summary['fps']:.1f} frames/s); "
          f"per frame: detection {summary['detect_ms']:.0f} ms, age estimation {summary['estimate_ms']:.0f} ms "
          f"on {summary['device']}")
    if tally.unreadable:
        print(f"{len(tally.unreadable)} unreadable image(s) skipped: {', '.join(tally.unreadable)}")
    if writer:
        print(f"wrote {writer.path} and {sink.written} annotated {'photos' if source.still else 'frames'} "
              f"in {summary['annotated'] or output_dir}")
    return summary


if __name__ == "__main__":
    main()
