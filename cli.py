"""The command line that the model-loading scripts share: which model, how faces are found, how a run stops.

demo.py and app.py take one set of options (`add_estimator_arguments`) and load the model one way
(`chosen_model_path`, `load_estimator`), so that both score a photo alike; val.py and export.py take `--model`
from `add_model_argument`.
"""
import argparse
import contextlib
import signal
from pathlib import Path

from estimator import (DEFAULT_MIN_ATTRIBUTE_PROB, DEFAULT_MIN_SCORE, DEFAULT_WEIGHTS, AgeEstimator,
                       check_min_attribute_prob)
from model import fetch_verified
from preprocessing.align import DETECTORS, LANDMARK_MODELS
from preprocessing.common import DEFAULT_DETECTOR, DEFAULT_LANDMARKS

# what demo.py's CSV and app.py's page say of a photo without a face, and of a face that could not be cropped
NO_FACE_NOTE = "no face found"
UNCROPPED_NOTE = "a face could not be cropped, so none was estimated"


def add_model_argument(parser, help, required=False, metavar="FILE"):
    """``--model FILE``, the model to load, for val.py, demo.py, app.py and export.py; ``args.model`` holds it.

    ``--resume`` is the same option under the original's name, kept for the command lines its users type: these
    scripts resume nothing (the training scripts' ``--resume`` continues a run).
    """
    return parser.add_argument("--model", "--resume", dest="model", metavar=metavar, required=required,
                               help=f"{help} (--resume, the original's spelling, works too)")


def add_estimator_arguments(parser):
    """The model and face-detection options, one set for demo.py and app.py, so both score a photo alike."""
    model = parser.add_argument_group("model (default: the shipped weights/utkface_multitask.pth: age, gender, ethnicity)")
    weights = model.add_mutually_exclusive_group()
    add_model_argument(weights, "a checkpoint written by train.py, train-ldl.py or train-mt.py, or an .onnx written by "
                                "export.py", metavar="CKPT")
    weights.add_argument("--url", help="download a checkpoint from URL once into the weights cache (needs --sha256)")
    model.add_argument("--sha256", help="sha256 of the --url file; a download that does not match is refused")
    model.add_argument("--device", choices=("cpu", "cuda"), help="run the model here (default: cuda when available)")
    model.add_argument("--expand", type=float, metavar="E",
                       help="override the face-box expand stored in the checkpoint (use the training value)")
    model.add_argument("--tta", action="store_true",
                       help="average the predicted distributions of each face and its mirror (about 2x model time)")
    model.add_argument("--no_attributes", action="store_true",
                       help="leave out a multitask model's gender and ethnicity (guesses from a face's appearance) "
                            "everywhere: drawing, printout, table and CSV")
    model.add_argument("--min_attribute_prob", type=attribute_probability, default=DEFAULT_MIN_ATTRIBUTE_PROB,
                       metavar="P", help="give a gender or ethnicity label only when its probability is at least P; "
                                         "below, only the probability is kept (default: %(default)s)")
    faces = parser.add_argument_group("face detection")
    faces.add_argument("--detector", choices=DETECTORS, default=DEFAULT_DETECTOR,
                       help="dlib detector: hog (fast on a CPU) or cnn (more robust to pose, slow without CUDA) "
                            "(default: %(default)s)")
    faces.add_argument("--landmarks", type=int, choices=LANDMARK_MODELS, default=DEFAULT_LANDMARKS,
                       help="dlib landmark model that levels the eyes; use the one the training data was "
                            "aligned with (default: %(default)s)")
    faces.add_argument("--upsample", type=int, metavar="K",
                       help="run one detection pass with K 2x upsamplings: 1 or 2 find small faces in group photos "
                            "and far from a camera (default: for photos the automatic passes of preprocessing, "
                            "for videos and webcams one plain pass a frame)")
    faces.add_argument("--min_score", type=float, default=DEFAULT_MIN_SCORE,
                       help="drop detections whose detector confidence (HOG: SVM margin) is below this; in the "
                            "wild, weak HOG hits are mostly badges and patterns (default: %(default)s)")


def attribute_probability(text):
    """--min_attribute_prob's value, checked as the API checks it."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    try:
        return check_min_attribute_prob(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def chosen_model_path(args):
    """The model to load: --url (downloaded and verified), --model, or the shipped model."""
    if args.sha256 and not args.url:
        raise SystemExit("--sha256 checks a --url download; pass --url too, or drop --sha256")
    if args.url:
        return fetch_verified(args.url, args.sha256)
    if args.model:
        path = Path(args.model).expanduser()
        if not path.is_file():
            raise SystemExit(f"--model {path} does not exist; pass a .pth written by train.py, train-ldl.py or "
                             f"train-mt.py, or an .onnx written by export.py")
        return path
    if not DEFAULT_WEIGHTS.is_file():
        raise SystemExit(
            f"the shipped model {DEFAULT_WEIGHTS} is missing. Pass --model CKPT (a checkpoint written by the "
            f"training scripts) or --url URL --sha256 HASH, or restore the file (git checkout -- weights/)."
        )
    return DEFAULT_WEIGHTS


def load_estimator(path, args, device, video=False):
    """The estimator with the command line's options (--tta, or the model's TEST.TTA); ``video`` bounds face
    detection to one pass a frame (a face-free frame must not stall a stream)."""
    return AgeEstimator.from_checkpoint(
        path, device=device, tta=True if args.tta else None, expand=args.expand, detector=args.detector,
        landmarks=args.landmarks, upsample=args.upsample, min_score=args.min_score, video=video,
        attributes=not args.no_attributes, min_attribute_prob=args.min_attribute_prob)


@contextlib.contextmanager
def sigterm_as_ctrl_c():
    """Within the block, SIGTERM (timeout, docker stop, systemd) stops the run as Ctrl-C does, with KeyboardInterrupt,
    so that the outputs are closed whole: an mp4 plays only once its index is written."""
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
