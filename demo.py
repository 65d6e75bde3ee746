"""Estimate the age of every face in photos, a video or a webcam stream.

    python demo.py                                  # webcam 0, live window (or printed results when headless)
    python demo.py --img_dir PHOTOS --output_dir OUT
    python demo.py --video clip.mp4 --output_dir OUT --model checkpoint/best.pth   # or --model model.onnx

The faces are found, aligned and estimated by estimator.AgeEstimator, exactly
as for training (the crop size and expand come from the checkpoint or the
ONNX export), all faces of a frame in one batch. This script reads the
sources, writes the outputs and draws.

With --output_dir, OUT/predictions.csv holds one row per face
(source, frame, face, x1, y1, x2, y2, age, age_sd, then gender, gender_prob,
race, race_prob for a multitask model, race being the ethnicity under the
original's name, and a note; a gender or ethnicity below --min_attribute_prob
keeps its probability and an empty label, and --no_attributes leaves all four
empty), and the annotated photos (same file names) or
the annotated video (OUT/<name>.mp4) are written beside it. A photo with no
face, or one that cannot be read (including dangling links, link loops and
folders named like photos), gets one row with empty face fields and the reason
in ``note``, so every photo is accounted for; so does a photo or frame with a
face that cannot be cropped. The run refuses, before any
work, an output folder it cannot write and one where it would replace an input
or a file it did not write. Without --output_dir the results are shown in a
window when OpenCV has a GUI and a display exists (q or Esc quits; with photos
any other key shows the next), otherwise printed.
"""
import argparse
import csv
import itertools
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2

from cli import NO_FACE_NOTE, UNCROPPED_NOTE, add_estimator_arguments, chosen_model_path, load_estimator, sigterm_as_ctrl_c
from defaults import MS_PER_S
from drawing import annotate, attributes
from files import atomic_write, check_output_dir, csv_text
from geometry import CropError
from model import ATTRIBUTE_HEADS
from runtime import resolve_device
from sources import DEFAULT_CAMERA, FALLBACK_FPS, VIDEO_CODECS, open_source

CSV_NAME = "predictions.csv"
# the contract's columns first; gender and race (ethnicity) stay empty for an age-only model; note says why a photo
# has no face
CSV_COLUMNS = ("source", "frame", "face", "x1", "y1", "x2", "y2", "age", "age_sd",
               "gender", "gender_prob", "race", "race_prob", "note")
# predictions.csv is fsynced this often, so a power cut loses at most these seconds of rows
CSV_SYNC_INTERVAL_S = 10.0
# a camera's recording is written at the rate measured over its first frames (see VideoSink)
RATE_FRAMES = 10
# the measured rate, rounded so that OpenCV's mp4v time base stays within what MPEG-4 admits
FPS_DECIMALS = 2
MIN_RECORDED_FPS = 0.01
WINDOW_NAME = "age estimation"
QUIT_KEYS = (ord("q"), 27)  # q, Esc
STREAM_WAIT_MS = 1  # keep a video or webcam running
PHOTO_WAIT_MS = 0  # hold each photo until a key is pressed
# weight of the previous estimate in the live frame rate, which steadies the number on screen
FPS_SMOOTHING = 0.9


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
    add_estimator_arguments(parser)
    return parser


# Outputs --------------------------------------------------------------------


def file_identity(path):
    """(device, inode) of the file a path leads to, following links; None when it leads nowhere."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def previous_sources(path):
    """The sources listed by an earlier run's predictions.csv: their annotated copies are this script's to replace."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            return {row.get("source") for row in csv.DictReader(handle)}
    except (OSError, csv.Error, UnicodeDecodeError):
        return set()


def clash(target, inputs, owner, previous):
    """Why writing ``target`` would destroy something, or None when it is free or an earlier run's output."""
    if not os.path.lexists(target):
        return None
    if file_identity(target) in inputs:
        return f"{target.name} (an input of this run{', through a link' if target.is_symlink() else ''})"
    if target.is_dir() and not target.is_symlink():
        return f"{target.name} (a folder)"
    if owner not in previous:
        return f"{target.name} (a file demo.py did not write)"
    return None


def check_overwrites(output_dir, source, args):
    """Refuse, before any work, to write over an input (through links too) or a file this script did not write."""
    if args.img_dir and output_dir.resolve() == Path(args.img_dir).expanduser().resolve():
        raise SystemExit("--output_dir must differ from --img_dir: the annotated photos keep their names")
    inputs = {file_identity(path) for path in source.inputs()} - {None}
    previous = previous_sources(output_dir / CSV_NAME)
    clashes = [reason for name, owner in source.outputs()
               if (reason := clash(output_dir / name, inputs, owner, previous)) is not None]
    if clashes:
        raise SystemExit(f"--output_dir {output_dir} holds files this run would replace: {', '.join(clashes)}. "
                         f"Nothing was written. Pass an empty or new --output_dir, or move those files away.")


def face_row(source, frame, index, face):
    """A predictions.csv row; the gender and ethnicity (race) columns stay empty for an age-only model and with
    --no_attributes, and a label below --min_attribute_prob is empty beside its probability."""
    box = [int(round(v)) for v in face["box"]]
    heads = []
    for head in ATTRIBUTE_HEADS:
        heads += [face[head] or "", f"{face[f'{head}_prob']:.3f}"] if f"{head}_prob" in face else ["", ""]
    return [source, frame, index, *box, f"{face['age']:.2f}", f"{face['age_sd']:.2f}", *heads, ""]


class PredictionWriter:
    """predictions.csv, written as the run goes, holding no rows in memory.

    The header is there from the start (the file is a valid CSV at once). Each
    frame's rows are appended in one write call, so a kill, kill -9 included,
    leaves whole rows; only a power cut or a full disk can cut the last line
    short, and a CSV reader then sees a line without its newline at the end
    of the file. The file is fsynced every CSV_SYNC_INTERVAL_S and at the end,
    so a power cut loses at most those seconds of rows.
    """

    def __init__(self, path):
        self.path = Path(path)
        atomic_write(self.path, csv_text([CSV_COLUMNS]))  # replaces an earlier run's file whole
        self.descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self.synced_at = time.monotonic()

    def add(self, source, frame, faces, keep_empty, note=""):
        """One row per face; with ``keep_empty``, one row with empty face fields and ``note`` when there is none."""
        rows = [face_row(source, frame, index, face) for index, face in enumerate(faces)]
        if not faces and keep_empty:
            rows = [[source, frame] + [""] * (len(CSV_COLUMNS) - 3) + [note]]
        if rows:
            write_whole(self.descriptor, csv_text(rows).encode("utf-8"))
        if time.monotonic() - self.synced_at >= CSV_SYNC_INTERVAL_S:
            self.sync()

    def sync(self):
        os.fsync(self.descriptor)
        self.synced_at = time.monotonic()

    def close(self):
        self.sync()
        os.close(self.descriptor)


def write_whole(descriptor, data):
    """``data`` to the end of the file; a regular file takes it in one call unless the disk is full."""
    while data:
        data = data[os.write(descriptor, data):]


class ImageSink:
    """Annotated photos in the output folder, under the photos' own file names and formats, each written atomically."""

    def __init__(self, folder):
        self.folder = self.path = Path(folder)
        self.written = 0

    def write(self, frame, rgb):
        ok, data = cv2.imencode(Path(frame.name).suffix, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        if not ok:
            raise SystemExit(f"OpenCV cannot encode {frame.name} in its own format")
        atomic_write(self.folder / frame.name, data.tobytes())
        self.written += 1

    def close(self):
        """Nothing to finish: each photo is complete once written."""


class VideoSink:
    """One annotated video, opened once the frame size and the frame rate are known.

    A video file's frames keep the file's rate (``fps``). A camera's (``fps``
    None) are written at the rate they were measured to arrive, the processing
    rate, not the camera's nominal one, so that the recording plays in real
    time rather than as a time-lapse: the first RATE_FRAMES frames are held
    until the rate is known (fewer, when the run ends sooner).
    """

    def __init__(self, folder, stem, fps=None):
        self.folder = Path(folder)
        self.stem = stem
        self.fps = fps
        self.held = []  # (arrival time, BGR frame) while the rate is measured
        self.writer = None
        self.path = None
        self.written = 0

    def write(self, frame, rgb):
        bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        if self.fps is None:
            self.held.append((frame.arrived, bgr))
            if len(self.held) == RATE_FRAMES:
                self.write_held()
            return
        self.append(bgr)

    def append(self, bgr):
        if self.writer is None:
            self.writer, self.path = open_video_writer(self.folder, self.stem, self.fps, bgr.shape[1], bgr.shape[0])
        self.writer.write(bgr)
        self.written += 1

    def write_held(self):
        self.fps = measured_fps([arrived for arrived, _ in self.held])
        for _, bgr in self.held:
            self.append(bgr)
        self.held = []

    def close(self):
        """Write any frames still held, then release the writer: an mp4 is only playable once its index is written."""
        if self.held:
            self.write_held()
        if self.writer is not None:
            self.writer.release()


def measured_fps(arrivals):
    """Frames per second over the arrival times (seconds) of consecutive frames, leaving out the first interval,
    which holds the model's warm-up; FALLBACK_FPS with too few frames to tell."""
    steady = arrivals[1:] if len(arrivals) > 2 else arrivals
    if len(steady) < 2 or steady[-1] <= steady[0]:
        return FALLBACK_FPS
    return max(MIN_RECORDED_FPS, round((len(steady) - 1) / (steady[-1] - steady[0]), FPS_DECIMALS))


def open_video_writer(folder, stem, fps, width, height):
    """The first codec OpenCV can write; an earlier run's file is removed first, so that no link is written through."""
    for fourcc, suffix in VIDEO_CODECS:
        path = folder / f"{stem}{suffix}"
        path.unlink(missing_ok=True)
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (width, height))
        if writer.isOpened():
            return writer, path
        writer.release()
        path.unlink(missing_ok=True)
    raise SystemExit(f"this OpenCV build cannot write a video with any of {', '.join(c for c, _ in VIDEO_CODECS)}")


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


def print_faces(name, frame, faces, still):
    """The results as text, for a run with neither --output_dir nor a display."""
    where = name if still else f"{name} frame {frame}"
    if not faces and still:
        print(f"{where}: no face")
    for index, face in enumerate(faces):
        box = ", ".join(str(int(round(v))) for v in face["box"])
        print(f"{where} face {index}: {face['age']:.0f} ± {face['age_sd']:.0f} years"
              f"{attributes(face)} at ({box})")


# The run --------------------------------------------------------------------


@dataclass
class Tally:
    """What the run did and how long its parts took, for the closing report.

    The first frame pays the model's and the detector's warm-up (hundreds of
    milliseconds), so the rate and the times per frame are taken over the
    frames after it; ``first_frame_s`` is reported apart. A run of one frame
    has only that frame's times.
    """

    frames: int = 0
    faces: int = 0
    detect_s: float = 0.0
    estimate_s: float = 0.0
    first_frame_s: float = 0.0
    live_fps: float = 0.0
    interrupted: bool = False
    unreadable: list = field(default_factory=list)
    started: float = None
    last_frame: float = None
    first_done: float = None

    def __post_init__(self):
        self.started = self.last_frame = time.perf_counter()

    def add_times(self, detect_s, estimate_s):
        """Add a frame's detection and estimation times (before its `tick`); the second frame's replace the first's."""
        if self.frames == 1:
            self.detect_s = self.estimate_s = 0.0
        self.detect_s += detect_s
        self.estimate_s += estimate_s

    def tick(self):
        """Count a finished frame and update the smoothed frame rate shown live."""
        now = time.perf_counter()
        rate = 1.0 / max(now - self.last_frame, sys.float_info.epsilon)
        self.live_fps = rate if self.frames == 0 else FPS_SMOOTHING * self.live_fps + (1 - FPS_SMOOTHING) * rate
        self.last_frame = now
        if self.frames == 0:
            self.first_done = now
            self.first_frame_s = now - self.started
        self.frames += 1

    def steady(self):
        """(frames, seconds) the rate is taken over: those after the first, or the one frame of a one-frame run."""
        if self.frames >= 2:
            return self.frames - 1, self.last_frame - self.first_done
        return self.frames, self.first_frame_s


@dataclass
class Outputs:
    """Where results go: predictions.csv and annotated files (with --output_dir), a window, or stdout."""

    writer: PredictionWriter = None
    sink: object = None
    window: bool = False

    def close(self):
        if self.sink is not None:
            self.sink.close()
        if self.writer is not None:
            self.writer.close()
        if self.window:
            cv2.destroyAllWindows()


def open_outputs(output_dir, source):
    if output_dir is None:
        return Outputs(window=display_available())
    if source.still:
        sink = ImageSink(output_dir)
    else:
        sink = VideoSink(output_dir, source.stem, None if source.live else source.fps)
    return Outputs(PredictionWriter(output_dir / CSV_NAME), sink)


def skip_unreadable(frame, outputs, tally):
    tally.unreadable.append(frame.name)
    print(f"{frame.name}: {frame.problem}; skipped", file=sys.stderr)
    if outputs.writer is not None:
        outputs.writer.add(frame.name, frame.index, [], keep_empty=True, note=frame.problem)


def handle_frame(frame, still, estimator, outputs, tally):
    """Detect and estimate one frame and send the results out; False when the user asked to stop."""
    start = time.perf_counter()
    faces = estimator.detect(frame.rgb)
    detected = time.perf_counter()
    results, problem = estimate_frame(frame, faces, estimator)
    tally.add_times(detected - start, time.perf_counter() - detected)
    tally.faces += len(results)
    if outputs.writer is not None:
        outputs.writer.add(frame.name, frame.index, results, keep_empty=still or problem is not None,
                           note=problem or NO_FACE_NOTE)
    if outputs.sink is not None:
        outputs.sink.write(frame, annotate(frame.rgb, results))
    keep_going = True
    if outputs.window:
        caption = None if still else f"{tally.live_fps:.1f} fps"
        keep_going = show(annotate(frame.rgb, results, caption), PHOTO_WAIT_MS if still else STREAM_WAIT_MS)
    elif outputs.writer is None:
        print_faces(frame.name, frame.index, results, still)
    tally.tick()
    return keep_going


def estimate_frame(frame, faces, estimator):
    """The frame's results, and why there are none when a face cannot be cropped (None otherwise): such a frame is
    reported on stderr and in predictions.csv and the run goes on, as after an unreadable photo."""
    try:
        return estimator.estimate(frame.rgb, faces), None
    except CropError as error:
        print(f"{frame.name} frame {frame.index}: {error}; {UNCROPPED_NOTE}", file=sys.stderr)
        return [], f"{UNCROPPED_NOTE}: {error}"


def process(source, estimator, outputs, max_frames):
    """Every frame through `handle_frame`; outputs are closed and saved however the loop ends."""
    tally = Tally()
    frames = iter(source)
    try:
        for frame in itertools.islice(frames, max_frames):
            if frame.rgb is None:
                skip_unreadable(frame, outputs, tally)
            elif not handle_frame(frame, source.still, estimator, outputs, tally):
                break
    except KeyboardInterrupt:
        tally.interrupted = True
        print("stopped by Ctrl-C or SIGTERM; keeping what was done", file=sys.stderr)
    finally:
        frames.close()
        outputs.close()
    return tally


def run_summary(source, weights, estimator, tally, outputs):
    """What the run did, for print_summary and main's caller: counts, times, the model and the files written.

    ``fps``, ``detect_ms`` and ``estimate_ms`` leave out the first frame, which holds the warm-up (see Tally).
    """
    seconds = time.perf_counter() - tally.started
    steady_frames, steady_s = tally.steady()
    per_frame = MS_PER_S / max(steady_frames, 1)
    sink = outputs.sink
    return {
        "source": source.name, "model": str(weights), "device": estimator.backend.device,
        "backend": estimator.backend.name, "frames": tally.frames, "faces": tally.faces,
        "unreadable": tally.unreadable, "stopped_early": source.stopped_early or tally.interrupted,
        "seconds": seconds, "first_frame_s": tally.first_frame_s,
        "fps": steady_frames / steady_s if steady_s > 0 else 0.0,
        "detect_ms": tally.detect_s * per_frame, "estimate_ms": tally.estimate_s * per_frame,
        "predictions": str(outputs.writer.path) if outputs.writer else None,
        "annotated": str(sink.path) if sink and sink.path else None,
        "annotated_count": sink.written if sink else 0,
    }


def print_summary(summary, still):
    counts = f"{summary['frames']} frames, {summary['faces']} faces in {summary['seconds']:.1f} s"
    if summary["frames"] == 0:
        print(counts)
    else:
        rate = (f"after the first frame ({summary['first_frame_s']:.1f} s, with the warm-up): "
                if summary["frames"] >= 2 else "one frame, warm-up included: ")
        print(f"{counts}; {rate}{summary['fps']:.1f} frames/s, per frame: detection {summary['detect_ms']:.0f} ms, "
              f"age estimation {summary['estimate_ms']:.0f} ms with {summary['backend']}")
    if summary["unreadable"]:
        print(f"{len(summary['unreadable'])} unreadable image(s) skipped: {', '.join(summary['unreadable'])}")
    if summary["predictions"]:
        print(f"wrote {summary['predictions']} and {summary['annotated_count']} annotated "
              f"{'photos' if still else 'frames'} in {summary['annotated'] or Path(summary['predictions']).parent}")


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.max_frames is not None and args.max_frames < 1:
        raise SystemExit("--max_frames must be at least 1")
    device = resolve_device(args.device)  # before any download, camera or folder
    weights = chosen_model_path(args)
    source = open_source(args)
    output_dir = Path(args.output_dir).expanduser() if args.output_dir else None
    if output_dir is not None:
        check_output_dir(output_dir, "--output_dir")
        check_overwrites(output_dir, source, args)
    estimator = load_estimator(weights, args, device, video=not source.still)
    with sigterm_as_ctrl_c():
        outputs = open_outputs(output_dir, source)
        tally = process(source, estimator, outputs, args.max_frames)
    summary = run_summary(source, weights, estimator, tally, outputs)
    print_summary(summary, source.still)
    return summary


if __name__ == "__main__":
    main()
