"""Frame rate of demo.py on 640x480 video, with a face in view and without one.

    python bench_demo.py [--frames N] [--output_dir | --no_output] [demo.py options, e.g. --model CKPT]

It writes two videos made from the sample photo (samples/astronaut.jpg): its
portrait drifting across a grey 640x480 frame, and the lower part of the same
photo (suit, patches, helmet, no face) drifting the same way. Each is run
through demo.main as a user would run demo.py, writing predictions.csv and
the annotated video to a scratch folder (or, with --no_output, printing the
faces), and the closing summary's frames/s is reported. The last line is one
JSON object: ``face_fps``, ``no_face_fps`` and the time per frame spent on
detection and on age estimation in each.

A face-free frame costs one detection pass (preprocessing/align.py,
VIDEO_PASS): the figure to compare with the outside check's 10 frames/s on
two cores.
"""
import argparse
import contextlib
import json
import os
import tempfile
from pathlib import Path

import cv2
import numpy as np

import demo
from geometry import read_rgb

FRAME_W, FRAME_H = 640, 480
PHOTO = Path(__file__).parent / "samples" / "astronaut.jpg"
# rows of the sample photo below the astronaut's chin: a real scene with no face
FACELESS_ROWS = slice(210, None)
GREY = 128
# pixels the picture moves per frame, so that consecutive frames differ as in a clip
DRIFT_PX = 2
DRIFT_SPAN = 60
VIDEO_FPS = 25.0
DEFAULT_FRAMES = 150
# tried in order, as demo.py writes its own videos
CODECS = (("mp4v", ".mp4"), ("MJPG", ".avi"))


def face_frame(photo, index):
    """The portrait, FRAME_H tall, on a grey frame, moved sideways by the drift."""
    canvas = np.full((FRAME_H, FRAME_W, 3), GREY, np.uint8)
    portrait = cv2.resize(photo, (FRAME_H, FRAME_H), interpolation=cv2.INTER_AREA)
    left = (FRAME_W - FRAME_H) // 2 - DRIFT_SPAN // 2 + drift(index)
    canvas[:, left:left + FRAME_H] = portrait
    return canvas


def faceless_frame(photo, index):
    """The photo's lower part, scaled to fill the frame, moved sideways by the drift."""
    scene = cv2.resize(photo[FACELESS_ROWS], (FRAME_W + DRIFT_SPAN, FRAME_H), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(scene[:, drift(index):drift(index) + FRAME_W])


def drift(index):
    """Back and forth over DRIFT_SPAN pixels."""
    position = (index * DRIFT_PX) % (2 * DRIFT_SPAN)
    return position if position <= DRIFT_SPAN else 2 * DRIFT_SPAN - position


def write_video(folder, stem, frames):
    for fourcc, suffix in CODECS:
        path = Path(folder) / f"{stem}{suffix}"
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), VIDEO_FPS, (FRAME_W, FRAME_H))
        if writer.isOpened():
            for rgb in frames:
                writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
            writer.release()
            return path
        writer.release()
    raise SystemExit(f"this OpenCV build cannot write a video with any of {', '.join(c for c, _ in CODECS)}")


def run_demo(video, scratch, no_output, demo_args):
    """demo.main on ``video``; its summary. Without an output folder the faces it prints are silenced."""
    if no_output:
        with open(os.devnull, "w") as silence, contextlib.redirect_stdout(silence):
            return demo.main(["--video", str(video)] + demo_args)
    return demo.main(["--video", str(video), "--output_dir", str(Path(scratch) / video.stem)] + demo_args)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=DEFAULT_FRAMES, help="frames per video (default: %(default)s)")
    parser.add_argument("--no_output", action="store_true",
                        help="run demo.py without --output_dir (no CSV, no annotated video; faces printed, silenced)")
    return parser


def main(argv=None):
    args, demo_args = build_parser().parse_known_args(argv)
    photo = read_rgb(PHOTO)
    result = {"frame": f"{FRAME_W}x{FRAME_H}", "frames": args.frames, "output": not args.no_output,
              "threads": cv2.getNumThreads(), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as scratch:
        for name, make in (("face", face_frame), ("no_face", faceless_frame)):
            video = write_video(scratch, name, [make(photo, index) for index in range(args.frames)])
            summary = run_demo(video, scratch, args.no_output, demo_args)
            result.update({f"{name}_fps": round(summary["fps"], 2), f"{name}_faces": summary["faces"],
                           f"{name}_detect_ms": round(summary["detect_ms"], 1),
                           f"{name}_estimate_ms": round(summary["estimate_ms"], 1)})
            print(f"{name}: {summary['frames']} frames at {summary['fps']:.1f} frames/s, {summary['faces']} faces; "
                  f"per frame: detection {summary['detect_ms']:.0f} ms, age estimation {summary['estimate_ms']:.0f} ms",
                  flush=True)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
