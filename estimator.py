"""The one inference path: photos or aligned crops in, age, its spread and the 101-way distribution out.

Usage (the shipped model on the sample photo)::

    from estimator import AgeEstimator
    from geometry import read_rgb
    estimator = AgeEstimator.from_checkpoint()  # the shipped model; or a .pth checkpoint or an .onnx export
    for face in estimator.predict(read_rgb("samples/astronaut.jpg")):  # RGB uint8, largest face first
        print([round(v) for v in face["box"]], f"{face['age']:.1f} ± {face['age_sd']:.1f} years")

Faces are found and aligned by preprocessing/align.py and cropped by
geometry.aligned_crop with the model's image size and expand, exactly as
for training. Each face is a dict: ``box`` (x1, y1, x2, y2, the detector's box
in the input image), ``score`` (the detector's confidence), ``age`` and
``age_sd`` (mean and sd of the predicted distribution, the sd times the model's
``sd_scale``, see `calibrated_sd`), ``distribution`` (101
probabilities, ages 0..100), and for a multitask model ``gender`` and ``race``
(the ethnicity, under the original's name) with the likeliest class,
``gender_prob`` and ``race_prob`` with its probability, and ``gender_probs`` and
``race_probs`` with every class's. Gender and ethnicity are guesses from the
face's appearance: a label whose probability is below ``min_attribute_prob``
(DEFAULT_MIN_ATTRIBUTE_PROB unless given) is None, its probabilities kept, and
``attributes=False`` leaves all six keys out, as for an age-only model.

Two backends sit behind one small interface (``probabilities(uint8 NCHW
batch, tta)`` → each head's softmax): PyTorch for a checkpoint, with AMP per
the model's TRAIN.AMP (inference_amp), and onnxruntime for an export of export.py. demo.py,
val.py and the training loop's validation (scoring.score_dataset) all score through them.
"""
import contextlib
import dataclasses
import json
import math
import threading
from pathlib import Path

import numpy as np
import torch

from checkpoint import (CheckpointError, checkpoint_cfg, describe_weight_problems, first_line, is_onnx_file,
                        load_checkpoint, weight_problems)
from defaults import cfg_from_dict
from geometry import aligned_crop
from model import ATTRIBUTE_HEADS, build_model, input_settings
from normalize import normalize
from objectives import distribution_moments
from preprocessing.align import FaceAligner
from preprocessing.common import DEFAULT_DETECTOR, DEFAULT_LANDMARKS
from records import ETHNICITY_NAMES, GENDER_NAMES
from runtime import Runtime, autocast, resolve_amp, resolve_device

# the shipped model: age, gender and ethnicity from dlib's face-recognition ResNet fine-tuned on UTKFace (weights/README.md)
DEFAULT_WEIGHTS = Path(__file__).parent / "weights" / "utkface_multitask.pth"
# HOG margins of real faces in photos sit well above this; a mission patch on the sample photo scores 0.1
DEFAULT_MIN_SCORE = 0.3
DEFAULT_BATCH_SIZE = 64
# a gender or ethnicity label is given only from this probability up (see the module docstring): below it, the
# shipped model's guesses on held-out faces were wrong several times as often (README, section 4)
DEFAULT_MIN_ATTRIBUTE_PROB = 0.7
# the class names of the multitask heads, in the order of their logits
HEAD_CLASSES = {"gender": GENDER_NAMES, "race": ETHNICITY_NAMES}

# The ONNX contract shared with export.py. The graph takes RGB uint8 crops, NHWC, and normalises them itself.
ONNX_INPUT = "image"
ONNX_AGE_OUTPUTS = ("age", "age_sd", "distribution")
# graph output → the head whose softmax it is
ONNX_HEAD_OUTPUTS = {"distribution": "age", "gender_prob": "gender", "race_prob": "race"}
ONNX_FORMAT = "age-estimation/1"
# metadata keys, each a JSON value, that rebuild the preprocessing without flags
ONNX_METADATA = ("format", "arch", "objective", "img_size", "expand", "input", "config")
# the checkpoint key and ONNX metadata key of the sd's calibration (calibrate.py); a model without it keeps its sd
SD_SCALE_KEY = "sd_scale"
UNCALIBRATED = 1.0


@dataclasses.dataclass
class ModelFile:
    """What a checkpoint or an ONNX export says about its model: enough to frame faces as in training."""

    path: Path
    arch: str
    objective: str
    img_size: int
    expand: float
    input: dict
    cfg: object
    state: dict = None
    session: object = None
    sd_scale: float = UNCALIBRATED

    @property
    def multitask(self):
        return self.objective == "mt"

    @property
    def kind(self):
        return "onnx" if self.session is not None else "torch"


def load_model_file(path=None):
    """A ``.pth`` checkpoint or an ``.onnx`` export (None: the shipped model), checked, with its settings."""
    path = Path(path).expanduser() if path is not None else DEFAULT_WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; pass a .pth written by the training scripts or an "
                              f".onnx written by export.py")
    if is_onnx_file(path):
        return _load_onnx(path)
    state = load_checkpoint(path)
    cfg = checkpoint_cfg(state)
    arch = state.get("arch", cfg.MODEL.ARCH)
    check_weights_fit(path, state, cfg)
    return ModelFile(path, arch, state["objective"], int(state.get("img_size", cfg.MODEL.IMG_SIZE)),
                     float(state.get("expand", cfg.DATA.EXPAND)), state.get("input") or input_settings(arch),
                     cfg, state=state, sd_scale=checked_sd_scale(path, state.get(SD_SCALE_KEY, UNCALIBRATED)))


def checked_sd_scale(path, value):
    """A model file's sd_scale as a float, or a CheckpointError for one that is no positive number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise CheckpointError(f"{path}: its {SD_SCALE_KEY} {value!r} is not a positive number; write the copy again "
                              f"with calibrate.py")
    return float(value)


def check_weights_fit(path, state, cfg):
    """CheckpointError naming what differs, before load_state_dict would raise a page of RuntimeError.

    The model is built on the meta device: shapes only, no weights made.
    """
    with torch.device("meta"):
        model = build_model(cfg.MODEL.ARCH, multitask=state["objective"] == "mt", width=cfg.MODEL.WIDTH)
    problems = weight_problems(model, state["state_dict"])
    if not problems:
        return
    heads = {f"{head}.weight" for head in ATTRIBUTE_HEADS}
    reshaped = problems.get("of another shape", [])
    if state["objective"] == "mt" and list(problems) == ["of another shape"] and set(reshaped) <= heads:
        own = model.state_dict()
        shapes = "; ".join(f"its {name} is {tuple(state['state_dict'][name].shape)} where this version's is "
                           f"{tuple(own[name].shape)}" for name in reshaped)
        raise CheckpointError(
            f"{path} is a multitask checkpoint from before the gender and ethnicity heads moved to the network's "
            f"final features: {shapes}. Its age layer was trained on those heads' outputs, "
            f"so it cannot be converted: train it again with train-mt.py, use the shipped "
            f"weights/utkface_multitask.pth, or score it with the project version that wrote it.")
    raise CheckpointError(f"{path} does not hold a {cfg.MODEL.ARCH} model this version can load: its weights have "
                          f"{describe_weight_problems(problems)}. Pass a checkpoint written by this version's training "
                          f"scripts.")


def _load_onnx(path):
    try:
        import onnxruntime
    except ImportError:
        raise CheckpointError(f"{path} is an ONNX export, which runs in onnxruntime: pip install -r requirements.txt") from None
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: a user needs no notes on graph optimisation
    try:
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own exception types, one per failure
        raise CheckpointError(f"{path} is not a readable ONNX file (truncated or corrupt?): {first_line(error)}") from None
    meta = _export_metadata(path, session)
    return ModelFile(path, meta["arch"], meta["objective"], int(meta["img_size"]), float(meta["expand"]),
                     meta["input"], cfg_from_dict(meta["config"]), session=session,
                     sd_scale=checked_sd_scale(path, meta[SD_SCALE_KEY]))


def _export_metadata(path, session):
    """The metadata export.py wrote, or a clear error for an ONNX model from elsewhere."""
    stored = session.get_modelmeta().custom_metadata_map
    missing = [key for key in ONNX_METADATA if key not in stored]
    inputs = [(node.name, node.type) for node in session.get_inputs()]
    if missing or inputs != [(ONNX_INPUT, "tensor(uint8)")]:
        raise CheckpointError(
            f"{path} is an ONNX model, but not one exported by this project: "
            + (f"its metadata lacks {', '.join(missing)}" if missing else f"its inputs are {inputs}")
            + f". Export a checkpoint with: python export.py --model CKPT --output {path.name}")
    try:
        return {**{key: json.loads(stored[key]) for key in ONNX_METADATA},
                SD_SCALE_KEY: json.loads(stored.get(SD_SCALE_KEY, json.dumps(UNCALIBRATED)))}
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: the export's metadata is damaged ({error}); export the checkpoint again") from None


def mirror(images):
    """Left-right mirror of NCHW images."""
    return images.flip(dims=[3])


def average_heads(probs, mirrored):
    """TTA: each head's distribution is the mean of the face's and its mirror's."""
    return {name: (p + mirrored[name]) / 2 for name, p in probs.items()}


def head_probabilities(model, images, tta=False):
    """Softmax of every head ("age", and model.ATTRIBUTE_HEADS for a multitask model), in float32."""
    probs = {name: torch.softmax(logits.float(), 1) for name, logits in model(images).items()}
    if tta:
        probs = average_heads(probs, head_probabilities(model, mirror(images)))
    return probs


def load_model(state, runtime, cfg, multi_gpu=False):
    """Rebuild the trained network from the checkpoint alone."""
    model = build_model(cfg.MODEL.ARCH, multitask=state["objective"] == "mt", width=cfg.MODEL.WIDTH)
    weights = {k: v.float() if v.is_floating_point() else v for k, v in state["state_dict"].items()}
    model.load_state_dict(weights)
    model.to(runtime.device)
    if cfg.MODEL.CHANNELS_LAST:
        model.to(memory_format=torch.channels_last)
    if multi_gpu and torch.cuda.device_count() > 1:
        model = torch.nn.DataParallel(model)
    return model.eval()


class TorchBackend:
    """A PyTorch model on uint8 NCHW batches: normalised on the device and run under AMP, as in training.

    ``sd_scale``, like OnnxBackend's, is the model file's calibration of its sd (`calibrated_sd`).
    """

    def __init__(self, model, runtime, settings, channels_last=True, amp="auto", sd_scale=UNCALIBRATED):
        self.model = model.eval()
        self.sd_scale = sd_scale
        self.runtime = runtime
        self.settings = settings
        self.channels_last = channels_last
        self.amp = resolve_amp(amp, runtime.device)
        self.device = str(runtime.device)
        self.name = f"torch on {runtime.device}" + (f" ({self.amp})" if self.amp != "off" else "")

    @torch.no_grad()
    def probabilities(self, images, tta=False):
        images = normalize(images.to(self.runtime.device, non_blocking=True), self.settings,
                           channels_last=self.channels_last)
        with autocast(self.runtime, self.amp):
            return head_probabilities(self.model, images, tta)


class OnnxBackend:
    """An export of export.py in onnxruntime: the graph takes uint8 NHWC crops and normalises them itself.

    It runs on the GPU when asked for one and onnxruntime-gpu is installed, else on the CPU; ``name`` says which.
    """

    amp = "off"

    def __init__(self, session, device, sd_scale=UNCALIBRATED):
        self.session = session
        self.sd_scale = sd_scale
        if device.type == "cuda" and "CUDAExecutionProvider" in _available_providers():
            session.set_providers(["CUDAExecutionProvider", "CPUExecutionProvider"])
        produced = {node.name for node in session.get_outputs()}
        self.outputs = [name for name in ONNX_HEAD_OUTPUTS if name in produced]
        self.device = "cuda" if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self.name = f"onnxruntime on {self.device}"

    def probabilities(self, images, tta=False):
        batch = images.permute(0, 2, 3, 1).contiguous().cpu().numpy()
        if tta:
            batch = np.concatenate([batch, batch[:, :, ::-1]])
        arrays = self.session.run(self.outputs, {ONNX_INPUT: np.ascontiguousarray(batch)})
        probs = {ONNX_HEAD_OUTPUTS[name]: torch.from_numpy(array) for name, array in zip(self.outputs, arrays)}
        if not tta:
            return probs
        count = len(images)
        return average_heads({k: v[:count] for k, v in probs.items()}, {k: v[count:] for k, v in probs.items()})


def _available_providers():
    import onnxruntime

    return onnxruntime.get_available_providers()


def inference_amp(amp, cfg, device):
    """The precision a saved model is scored in: one rule for val.py, demo.py and the Python API.

    "auto" honours the model's own TRAIN.AMP as it resolves on this device (runtime.resolve_amp), so that a
    model trained in fp32 is scored in fp32 even where bf16 is native, and val.py and demo.py give one face
    the same age. A TRAIN.AMP of fp16 (a GPU's) is scored in fp32 off CUDA: a CPU has no fp16 autocast, and
    fp32 is nearer fp16's precision than bf16 is. Any other ``amp`` is used as given.
    """
    wanted = cfg.TRAIN.AMP if amp == "auto" else amp
    if amp == "auto" and wanted == "fp16" and device.type != "cuda":
        return "off"
    return resolve_amp(wanted, device)


def make_backend(model_file, runtime, cfg=None, amp="auto", multi_gpu=False):
    """The backend for a loaded model file; ``cfg`` (default: the file's) gives channels_last and, for ``amp``
    "auto", TRAIN.AMP (see inference_amp)."""
    if model_file.session is not None:
        return OnnxBackend(model_file.session, runtime.device, model_file.sd_scale)
    cfg = cfg or model_file.cfg
    model = load_model(model_file.state, runtime, cfg, multi_gpu)
    return TorchBackend(model, runtime, model_file.input, cfg.MODEL.CHANNELS_LAST,
                        inference_amp(amp, cfg, runtime.device), model_file.sd_scale)


def calibrated_sd(sd, sd_scale):
    """The distribution's sd times the model's ``sd_scale``, which calibrate.py fits so that age ± sd holds the
    true age for 68% of the validation faces, as users read ± sd: the one place the scale is applied."""
    return sd * sd_scale


def batch_estimates(probs, sd_scale=UNCALIBRATED):
    """``age`` and ``age_sd`` (N,) from the age distribution, and ``<head>_prob`` (N, classes) for the others."""
    mean, sd = distribution_moments(probs["age"])
    return {"age": mean, "age_sd": calibrated_sd(sd, sd_scale),
            **{f"{name}_prob": p for name, p in probs.items() if name != "age"}}


def check_min_attribute_prob(value):
    """ValueError unless ``value`` is a probability (0 to 1), the only thresholds that mean something."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"min_attribute_prob {value} is not a probability: pass a number from 0 (every label) to 1")
    return value


def face_results(probs, sd_scale=UNCALIBRATED, attributes=True, min_attribute_prob=DEFAULT_MIN_ATTRIBUTE_PROB):
    """One dict per face from a batch's head distributions (see the module docstring for the keys)."""
    scored = {name: value.float().cpu().numpy() for name, value in batch_estimates(probs, sd_scale).items()}
    distributions = probs["age"].float().cpu().numpy()
    faces = []
    for index, distribution in enumerate(distributions):
        face = {"age": float(scored["age"][index]), "age_sd": float(scored["age_sd"][index]),
                "distribution": distribution}
        for head, names in HEAD_CLASSES.items():
            if attributes and f"{head}_prob" in scored:
                p = scored[f"{head}_prob"][index]
                best = int(p.argmax())
                face.update({head: names[best] if p[best] >= min_attribute_prob else None,
                             f"{head}_prob": float(p[best]), f"{head}_probs": dict(zip(names, map(float, p)))})
        faces.append(face)
    return faces


class AgeEstimator:
    """Ages of the faces in RGB photos, or of crops already aligned like the training data.

    Build one with `from_checkpoint`; the module docstring has a usage example.
    """

    def __init__(self, backend, img_size, expand, tta=False, detector=DEFAULT_DETECTOR, landmarks=DEFAULT_LANDMARKS,
                 upsample=None, min_score=DEFAULT_MIN_SCORE, model_file=None, video=False, attributes=True,
                 min_attribute_prob=DEFAULT_MIN_ATTRIBUTE_PROB):
        self.backend = backend
        self.img_size = img_size
        self.expand = expand
        self.tta = tta
        self.min_score = min_score
        self.attributes = attributes
        self.min_attribute_prob = check_min_attribute_prob(min_attribute_prob)
        self.model_file = model_file
        self.aligners = AlignerPool(detector, landmarks, upsample, video)

    @classmethod
    def from_checkpoint(cls, path=None, device=None, tta=None, amp="auto", detector=DEFAULT_DETECTOR,
                        landmarks=DEFAULT_LANDMARKS, upsample=None, min_score=DEFAULT_MIN_SCORE, expand=None,
                        video=False, attributes=True, min_attribute_prob=DEFAULT_MIN_ATTRIBUTE_PROB):
        """Load a ``.pth`` checkpoint or an ``.onnx`` export (None: the shipped model).

        ``device``: "cpu", "cuda" or None (CUDA when available). ``tta``: average
        each face with its mirror (None: as the model's TEST.TTA says, normally
        off). ``amp``: "auto" (the model's TRAIN.AMP as it resolves on this
        device, as val.py scores it; see inference_amp), "bf16", "fp16" or
        "off"; an ONNX export always runs in fp32.
        ``detector``, ``landmarks``, ``upsample`` and ``min_score`` are demo.py's
        face-detection options, with its defaults. ``expand`` overrides the
        model's crop expand (the training value is right for almost every use).
        ``video``: the images are frames of a stream, each searched with one
        detection pass (preprocessing.align.FaceAligner), as demo.py does for
        videos and webcams; photos get the full search. ``attributes`` and
        ``min_attribute_prob``: a multitask model's gender and ethnicity, on or
        off, and the probability from which their labels are given.
        """
        check_min_attribute_prob(min_attribute_prob)  # before the model loads
        model_file = load_model_file(path)
        backend = make_backend(model_file, Runtime(device=resolve_device(device)), amp=amp)
        tta = model_file.cfg.TEST.TTA if tta is None else tta
        return cls(backend, model_file.img_size, model_file.expand if expand is None else float(expand), tta,
                   detector, landmarks, upsample, min_score, dataclasses.replace(model_file, state=None), video,
                   attributes, min_attribute_prob)

    def detect(self, rgb):
        """The aligned faces (preprocessing.align.Face) of an RGB uint8 image, largest first; safe from many threads."""
        rgb = _check_image(rgb)
        with self.aligners.borrow() as aligner:
            faces = aligner.align_all(rgb)
        return [face for face in faces if face.score >= self.min_score]

    def crops(self, rgb, faces):
        """The model's view of each face of `detect`: aligned crops, RGB uint8 (N, S, S, 3)."""
        empty = np.zeros((0, self.img_size, self.img_size, 3), np.uint8)
        return np.stack([aligned_crop(rgb, face.deg, face.box, self.expand, self.img_size) for face in faces]) if faces else empty

    def estimate(self, rgb, faces):
        """One dict per face of `detect`, all faces in one batch."""
        if not faces:
            return []
        results = self.predict_aligned(self.crops(rgb, faces), batch_size=len(faces))
        return [{"box": tuple(face.det_box), "score": face.score, **result} for face, result in zip(faces, results)]

    def predict(self, rgb):
        """Every face of an RGB uint8 image (H, W, 3), largest first, as dicts (see the module docstring)."""
        return self.estimate(rgb, self.detect(rgb))

    @torch.no_grad()
    def predict_aligned(self, crops, batch_size=DEFAULT_BATCH_SIZE):
        """Dicts for crops already aligned and cropped like the training data: RGB uint8, (N, S, S, 3)."""
        crops = self._check_crops(crops)
        faces = []
        for start in range(0, len(crops), batch_size):
            images = torch.from_numpy(crops[start:start + batch_size]).permute(0, 3, 1, 2)
            faces += face_results(self.backend.probabilities(images, self.tta), self.backend.sd_scale,
                                  self.attributes, self.min_attribute_prob)
        return faces

    def _check_crops(self, crops):
        crops = np.asarray(crops)
        if crops.ndim == 3:
            crops = crops[None]
        expected = (self.img_size, self.img_size, 3)
        if crops.dtype != np.uint8 or crops.ndim != 4 or crops.shape[1:] != expected:
            raise ValueError(f"predict_aligned takes RGB uint8 crops of shape (N, {self.img_size}, {self.img_size}, 3), "
                             f"the model's image size, cut by geometry.aligned_crop; got {crops.dtype} {crops.shape}")
        return np.ascontiguousarray(crops)


class AlignerPool:
    """Face aligners lent out one per concurrent caller, so that threads (a web server's) can share an estimator.

    dlib's detectors keep the image pyramid of the call in progress in the
    object: two threads that share one HOG detector get each other's faces
    (tests/test_estimator.py shows it). A caller borrows an aligner of its own;
    the pool grows to the largest number of threads that ever detected at once,
    and its lock is held only to lend and take back, never while detecting.
    """

    def __init__(self, detector=DEFAULT_DETECTOR, landmarks=DEFAULT_LANDMARKS, upsample=None, video=False):
        self.settings = (detector, landmarks, upsample, video)
        self.idle = [make_aligner(*self.settings)]  # built now, so that missing model files fail at load
        self.lock = threading.Lock()

    @contextlib.contextmanager
    def borrow(self):
        with self.lock:
            aligner = self.idle.pop() if self.idle else None
        aligner = aligner or make_aligner(*self.settings)
        try:
            yield aligner
        finally:
            with self.lock:
                self.idle.append(aligner)


def make_aligner(detector=DEFAULT_DETECTOR, landmarks=DEFAULT_LANDMARKS, upsample=None, video=False):
    """The face aligner of preprocessing; missing dlib model files give their message, not a traceback."""
    try:
        return FaceAligner(detector=detector, landmarks=landmarks, upsample=upsample, video=video)
    except (ModuleNotFoundError, FileNotFoundError, ValueError) as error:
        raise SystemExit(str(error)) from None


def _check_image(rgb):
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"predict takes an RGB uint8 image of shape (H, W, 3); got {rgb.dtype} {rgb.shape}")
    return rgb
