"""Every number a user may want to change, with its default.

Any key can be overridden on the command line after the flags, for example
``python train-ldl.py --data_dir D --dataset morph MODEL.ARCH tinyage TRAIN.LR 0.01``.
"""
import difflib
import functools
import re

import yaml
from yacs.config import CfgNode as CN

NUM_AGES = 101  # the model predicts a distribution over ages 0..100
MAX_AGE = NUM_AGES - 1
NUM_GENDERS = 2  # 0 male, 1 female
NUM_RACES = 5  # 0 White, 1 Black, 2 Asian, 3 Indian, 4 Other

_C = CN()

_C.MODEL = CN()
# any pretrainedmodels name (se_resnext50_32x4d, resnet18, ...), thinage / tinyage (DLDL-v2's), or dlib_resnet
# (dlib's face-recognition ResNet, which starts from its face-recognition weights)
_C.MODEL.ARCH = "se_resnext50_32x4d"
# channel multiplier of thinage and tinyage (1.5 is a third wider TinyAgeNet, at about 2.2x the compute)
_C.MODEL.WIDTH = 1.0
# side of the square face crop fed to the network, in pixels
_C.MODEL.IMG_SIZE = 224
# weights the backbone starts from: "" (the architecture's default: dlib's face-recognition weights for dlib_resnet,
# random init for the others), "none" (random init), a local file (a state dict such as ImageNet weights, or a dlib
# .dat file for dlib_resnet) or an https URL
_C.MODEL.PRETRAINED = ""
# sha256 of the weights file; required for a URL, checked for a local file when given
_C.MODEL.PRETRAINED_SHA256 = ""
# train and evaluate in the channels_last memory format (faster for convnets on most CPUs and GPUs)
_C.MODEL.CHANNELS_LAST = True

_C.DATA = CN()
# enlarge the face box by EXPAND/2 of its size on each side before cropping (the --expand flag)
_C.DATA.EXPAND = 0.0
# decode, rotate, crop and resize each image once and keep the uint8 crops in a cache file
_C.DATA.CACHE = True
# an image that becomes unreadable during training: "error" stops, "skip" counts and skips it
_C.DATA.ON_BAD_IMAGE = "error"

_C.TRAIN = CN()
# "adam", "adamw" (weight decay decoupled from the adaptive step) or "sgd"
_C.TRAIN.OPT = "adam"
# data loader worker processes; -1 picks: 0 on a CPU (with the crop cache, workers only steal
# cores from the model; measured with bench.py), up to 8 on a GPU
_C.TRAIN.WORKERS = -1
_C.TRAIN.LR = 0.001
# learning rate of a pretrained backbone as a share of TRAIN.LR, which the new age (and multitask) layers use;
# -1: the architecture's (0.03 for dlib_resnet starting from dlib's weights: it has no BatchNorm to absorb large
# steps), 1 otherwise
_C.TRAIN.BACKBONE_LR = -1.0
# "step" (StepLR with LR_DECAY_STEP / LR_DECAY_RATE) or "cosine" (to zero over EPOCHS)
_C.TRAIN.SCHEDULER = "step"
# epochs between learning-rate decays, for the step scheduler
_C.TRAIN.LR_DECAY_STEP = 20
# factor applied at each decay, for the step scheduler
_C.TRAIN.LR_DECAY_RATE = 0.2
# SGD momentum
_C.TRAIN.MOMENTUM = 0.9
# L2 penalty for adam and sgd; decoupled decay for adamw
_C.TRAIN.WEIGHT_DECAY = 0.0
_C.TRAIN.BATCH_SIZE = 128
_C.TRAIN.EPOCHS = 80
# augment training crops as the AUG section says (the --aug flag)
_C.TRAIN.AUG = False
# draw training faces with weights (faces in their AGE_BIN)^-BALANCE: 0 keeps the data set's age mix, 1 makes
# every age bin equally likely, so sparse ages (teens, the old) stop being pulled towards the common ones
_C.TRAIN.BALANCE = 0.0
# width in years of the age bins that TRAIN.BALANCE evens out
_C.TRAIN.AGE_BIN = 5
# seed for Python, NumPy and torch
_C.TRAIN.SEED = 42
# deterministic algorithms and a single thread order, for bit-exact resume on CPU
_C.TRAIN.DETERMINISTIC = False
# mixed precision: "auto" (bf16 on CPUs and GPUs with native bf16, fp16 with a gradient scaler on
# older GPUs, fp32 otherwise), "bf16", "fp16" (CUDA only) or "off" (fp32); val.py and demo.py use the same rule
_C.TRAIN.AMP = "auto"
# decay of an exponential moving average of the weights, updated every step (0: off); with it, validation,
# best.pth, val.py and demo.py use the averaged weights (0.999 averages over about the last 1,000 steps)
_C.TRAIN.EMA = 0.0
# wrap the model in torch.compile
_C.TRAIN.COMPILE = False
# under torchrun on GPUs, BatchNorm statistics over the global batch instead of each rank's share (CUDA only)
_C.TRAIN.SYNC_BN = False

_C.AUG = CN()
# "batch": whole batches as tensor ops on the training device (augment.py); "albumentations": per sample
# in the loader, the original's path (slower; kept as the reference the batch path is checked against)
_C.AUG.BACKEND = "batch"
# probability of a horizontal flip
_C.AUG.FLIP_P = 0.5
# probability of a random rotation, zoom and shift (one affine warp)
_C.AUG.AFFINE_P = 0.7
# rotation in degrees, up to +-ROTATE
_C.AUG.ROTATE = 10.0
# zoom by a factor in [1 - SCALE, 1 + SCALE]
_C.AUG.SCALE = 0.1
# shift by up to SHIFT of the crop side, in x and in y
_C.AUG.SHIFT = 0.05
# probability of a brightness and contrast change
_C.AUG.LIGHT_P = 0.5
# brightness: add up to +-BRIGHTNESS of the full range
_C.AUG.BRIGHTNESS = 0.2
# contrast: scale about the mean grey by a factor in [1 - CONTRAST, 1 + CONTRAST]
_C.AUG.CONTRAST = 0.2
# probability of a saturation change
_C.AUG.SATURATION_P = 0.3
# saturation: blend with the grey image by a factor in [1 - SATURATION, 1 + SATURATION]
_C.AUG.SATURATION = 0.2
# probability of a colour cast (another camera's white balance)
_C.AUG.CAST_P = 0.0
# colour cast: multiply each channel by a factor in [1 - CAST, 1 + CAST]
_C.AUG.CAST = 0.1
# probability of a gamma change
_C.AUG.GAMMA_P = 0.3
# gamma in [1 - GAMMA, 1 + GAMMA]
_C.AUG.GAMMA = 0.2
# probability of turning the face grey (scanned prints, black-and-white photos)
_C.AUG.GREY_P = 0.0
# probability of a Gaussian blur
_C.AUG.BLUR_P = 0.0
# largest blur sigma, as a share of the crop side (0.015 is 1.4 px at 96 px)
_C.AUG.BLUR_SIGMA = 0.015
# probability of JPEG compression artefacts
_C.AUG.JPEG_P = 0.0
# lowest JPEG quality drawn (up to 100)
_C.AUG.JPEG_QUALITY = 30

_C.LDL = CN()
# standard deviation, in years, of the Gaussian label distribution around the true age
_C.LDL.SIGMA = 2.0
# weight of the L1 loss between expected and true age, added to the KL divergence
_C.LDL.L1_WEIGHT = 1.0

_C.MT = CN()
# weight of the gender cross-entropy in the multitask loss
_C.MT.GENDER_WEIGHT = 1.0
# weight of the ethnicity cross-entropy in the multitask loss
_C.MT.RACE_WEIGHT = 1.0

_C.TEST = CN()
_C.TEST.BATCH_SIZE = 128
# average the predicted distributions of each face and its mirror image
_C.TEST.TTA = False


def get_cfg_defaults():
    """A fresh copy, so that one run's overrides never leak into another's."""
    return _C.clone()


def all_keys(cfg, prefix=""):
    """Dotted names of every leaf key, for the near-match hint."""
    keys = []
    for name, value in cfg.items():
        full = f"{prefix}{name}"
        if isinstance(value, CN):
            keys.extend(all_keys(value, full + "."))
        else:
            keys.append(full)
    return keys


def merge_opts(cfg, opts):
    """Merge ``KEY VALUE`` pairs, turning a mistyped key into a helpful error."""
    if len(opts) % 2:
        raise SystemExit(f"config overrides come in KEY VALUE pairs; got an odd list: {opts}")
    known = all_keys(cfg)
    for key in opts[0::2]:
        if key not in known:
            near = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(near)}?" if near else ""
            raise SystemExit(f"unknown config key {key!r}.{hint} Valid keys: {', '.join(known)}")
    try:
        cfg.merge_from_list(_floats_for_float_keys(cfg, opts))
    except (ValueError, TypeError, AssertionError) as error:
        raise SystemExit(f"bad config override {opts}: {error}") from None
    return cfg


def merge_file(cfg, path):
    """Merge a YAML recipe (nested sections, as in configs/) with the same checks and hints as KEY VALUE pairs."""
    try:
        with open(path) as handle:
            recipe = CN.load_cfg(handle)
    except (OSError, ValueError, TypeError, AttributeError, yaml.YAMLError) as error:
        raise SystemExit(f"--config {path}: cannot read it as a YAML recipe ({error})") from None
    pairs = []
    for key, value in _flat_items(recipe):
        pairs += [key, value]
    try:
        return merge_opts(cfg, pairs)
    except SystemExit as error:
        raise SystemExit(f"--config {path}: {error}") from None


def _flat_items(node, prefix=""):
    for name, value in node.items():
        if isinstance(value, dict):
            yield from _flat_items(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", value


def _floats_for_float_keys(cfg, opts):
    """``TRAIN.LR 1`` means 1.0: yacs would refuse the integer for a float key as a type mismatch."""
    merged = []
    for key, value in zip(opts[0::2], opts[1::2]):
        current = functools.reduce(lambda node, name: node[name], key.split("."), cfg)
        if isinstance(current, float) and _is_integer(value):
            value = repr(float(int(value)))
        merged += [key, value]
    return merged


def _is_integer(value):
    if isinstance(value, str):
        return re.fullmatch(r"\s*[+-]?\d+\s*", value) is not None
    return isinstance(value, int) and not isinstance(value, bool)


def cfg_to_dict(cfg):
    """A plain nested dict, so that checkpoints load with weights_only=True."""
    return {k: cfg_to_dict(v) if isinstance(v, CN) else v for k, v in cfg.items()}


def cfg_from_dict(data):
    """Defaults overlaid with a saved config; keys added since then keep their default."""
    cfg = get_cfg_defaults()
    cfg.set_new_allowed(True)
    cfg.merge_from_other_cfg(CN(data))
    cfg.set_new_allowed(False)
    return cfg
