"""Every number a user may want to change, with its default, and the values it may take.

Any key can be overridden on the command line after the flags, for example
``python train-ldl.py --data_dir D --dataset morph MODEL.ARCH tinyage TRAIN.LR 0.01``.

Each key is defined with its rule on the next line, so that a value that cannot
work stops a run before any data is read (`check_config`), with the key, the
value and the default named::

    # probability of a horizontal flip
    _C.AUG.FLIP_P = 0.5
    RULES["AUG.FLIP_P"] = Range(0, 1)

The rules are `Range` (a finite number within bounds, each bound closed or
open), `Choice` (one of a few strings), `Flag` (True or False), `Text` (a
string matching a pattern) and `CheckedElsewhere` (a key that needs more than
its own value, such as an architecture's name or a weights file: the check
named there runs in config.check_config). tests/test_config.py walks the whole
tree: a key without a rule, or a rule whose bad values (each rule makes its own)
are not refused, fails it.
"""
import dataclasses
import difflib
import functools
import math
import re
import textwrap
from pathlib import Path

import yaml
from yacs.config import CfgNode as CN

NUM_AGES = 101  # the model predicts a distribution over ages 0..100
MAX_AGE = NUM_AGES - 1
NUM_GENDERS = 2  # 0 male, 1 female
NUM_ETHNICITIES = 5  # 0 White, 1 Black, 2 Asian, 3 Indian, 4 Other (UTKFace's classes)
PERCENT = 100
MS_PER_S = 1000.0
MEGA = 1e6
# the shipped recipes for --config; a recipe is YAML, and only YAML
CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
RECIPE_SUFFIXES = (".yaml", ".yml")
HELP_WIDTH = 110  # characters of a key's meaning per line in -h


@dataclasses.dataclass(frozen=True)
class Range:
    """A finite number from ``low`` to ``high``; an open end excludes its bound. yacs keeps an integer key an integer.

    ``also`` holds values outside the range that mean something of their own,
    such as -1 for "the architecture's choice".
    """

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    also: tuple = ()

    def problem(self, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"must be a finite number {self.describe()}"
        above = self.low < value if self.low_open else self.low <= value
        below = value < self.high if self.high_open else value <= self.high
        return None if (above and below) or value in self.also else f"must be {self.describe()}"

    def describe(self):
        low = f"{'above' if self.low_open else 'at least'} {_number(self.low)}" if math.isfinite(self.low) else ""
        high = f"{'below' if self.high_open else 'at most'} {_number(self.high)}" if math.isfinite(self.high) else ""
        if low and high and not (self.low_open or self.high_open):
            text = f"between {_number(self.low)} and {_number(self.high)}"
        else:
            text = " and ".join(part for part in (low, high) if part)
        return text + "".join(f" or {_number(value)}" for value in self.also)

    def bad_values(self, default):
        """Just past each finite bound, and for a float key NaN and the infinities."""
        step = 1 if isinstance(default, int) else 0.5
        bad = [self.low if self.low_open else self.low - step] if math.isfinite(self.low) else []
        bad += [self.high if self.high_open else self.high + step] if math.isfinite(self.high) else []
        return [type(default)(value) for value in bad] + ([math.nan, math.inf, -math.inf] if isinstance(default, float) else [])


def _number(value):
    """A bound as a user would write it: 1, 0.5, 4294967295."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


@dataclasses.dataclass(frozen=True)
class Choice:
    """One of a few strings, spelled exactly."""

    values: tuple

    def problem(self, value):
        return None if value in self.values else f"must be {self.describe()}"

    def describe(self):
        return f"one of {', '.join(self.values)}"

    def bad_values(self, default):
        return [f"no-{self.values[0]}", self.values[0].upper()]


@dataclasses.dataclass(frozen=True)
class Flag:
    """True or False."""

    def problem(self, value):
        return None if isinstance(value, bool) else f"must be {self.describe()}"

    def describe(self):
        return "True or False"

    def bad_values(self, default):
        return ["maybe", 1]


@dataclasses.dataclass(frozen=True)
class Text:
    """A string matching ``pattern`` whole; ``meaning`` says in words what that is."""

    pattern: str
    meaning: str
    bad: tuple

    def problem(self, value):
        return None if isinstance(value, str) and re.fullmatch(self.pattern, value) else f"must be {self.describe()}"

    def describe(self):
        return self.meaning

    def bad_values(self, default):
        return list(self.bad)


@dataclasses.dataclass(frozen=True)
class CheckedElsewhere:
    """A key whose check needs more than its value (the model zoo, the file system); ``where`` names it."""

    where: str
    bad: tuple

    def problem(self, value):
        return None

    def describe(self):
        return ""  # the key's comment says what it takes

    def bad_values(self, default):
        return list(self.bad)


UNIT = Range(0, 1)  # probabilities and shares
POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
# numpy.random.seed takes 0 .. 2**32 - 1
SEED_RANGE = Range(0, 2**32 - 1)

_C = CN()
# dotted key → its rule (see the module docstring); each rule sits on the line after its key
RULES = {}

_C.MODEL = CN()
# any pretrainedmodels name (se_resnext50_32x4d, resnet18, ...), thinage / tinyage (DLDL-v2's), or dlib_resnet
# (dlib's face-recognition ResNet, which starts from its face-recognition weights)
_C.MODEL.ARCH = "se_resnext50_32x4d"
RULES["MODEL.ARCH"] = CheckedElsewhere("model.check_arch", ("resnet9000",))
# channel multiplier of thinage and tinyage (1.5: half as many channels again, about 2.2x the compute and parameters)
_C.MODEL.WIDTH = 1.0
RULES["MODEL.WIDTH"] = POSITIVE
# side of the square face crop fed to the network, in pixels
_C.MODEL.IMG_SIZE = 224
RULES["MODEL.IMG_SIZE"] = CheckedElsewhere("model.check_input_size, against MODEL.ARCH's smallest crop", (0, -1))
# weights the backbone starts from: "" (the architecture's default: dlib's face-recognition weights for dlib_resnet,
# random init for the others), "none" (random init), a local file (a state dict such as ImageNet weights, or a dlib
# .dat file for dlib_resnet) or an https URL
_C.MODEL.PRETRAINED = ""
RULES["MODEL.PRETRAINED"] = CheckedElsewhere("model.check_weights_source",
                                             ("/no/such/weights.pth", "https://example.org/w.pth"))
# sha256 of the weights file; required for a URL, checked for a local file when given
_C.MODEL.PRETRAINED_SHA256 = ""
RULES["MODEL.PRETRAINED_SHA256"] = Text("|[0-9a-fA-F]{64}", "empty or 64 hexadecimal digits", ("abc", "g" * 64))
# train and evaluate in the channels_last memory format (faster for convnets on most CPUs and GPUs)
_C.MODEL.CHANNELS_LAST = True
RULES["MODEL.CHANNELS_LAST"] = Flag()

_C.DATA = CN()
# enlarge the face box by EXPAND/2 of its size on each side before cropping (the --expand flag)
_C.DATA.EXPAND = 0.0
RULES["DATA.EXPAND"] = NON_NEGATIVE
# decode, rotate, crop and resize each image once and keep the uint8 crops in a cache file
_C.DATA.CACHE = True
RULES["DATA.CACHE"] = Flag()
# an image that becomes unreadable during training: "error" stops, "skip" counts and skips it
_C.DATA.ON_BAD_IMAGE = "error"
RULES["DATA.ON_BAD_IMAGE"] = Choice(("error", "skip"))

_C.TRAIN = CN()
# "adam", "adamw" (weight decay decoupled from the adaptive step) or "sgd"
_C.TRAIN.OPT = "adam"
RULES["TRAIN.OPT"] = Choice(("adam", "adamw", "sgd"))
# data loader worker processes; -1 picks: 0 on a CPU (with the crop cache, workers only steal
# cores from the model; measured with bench.py), up to 8 on a GPU
_C.TRAIN.WORKERS = -1
RULES["TRAIN.WORKERS"] = Range(-1)
# learning rate of the new layers, and of a whole network that has no pretrained backbone (see BACKBONE_LR)
_C.TRAIN.LR = 0.001
RULES["TRAIN.LR"] = POSITIVE
# learning rate of a pretrained backbone as a share of TRAIN.LR, which the new age (and multitask) layers use;
# -1: the architecture's (0.03 for dlib_resnet starting from dlib's weights: it has no BatchNorm to absorb large
# steps), 1 otherwise
_C.TRAIN.BACKBONE_LR = -1.0
RULES["TRAIN.BACKBONE_LR"] = Range(0, also=(-1,))
# "step" (StepLR with LR_DECAY_STEP / LR_DECAY_RATE) or "cosine" (to zero over EPOCHS)
_C.TRAIN.SCHEDULER = "step"
RULES["TRAIN.SCHEDULER"] = Choice(("step", "cosine"))
# epochs between learning-rate decays, for the step scheduler
_C.TRAIN.LR_DECAY_STEP = 20
RULES["TRAIN.LR_DECAY_STEP"] = POSITIVE
# factor applied at each decay, for the step scheduler
_C.TRAIN.LR_DECAY_RATE = 0.2
RULES["TRAIN.LR_DECAY_RATE"] = POSITIVE
# SGD momentum
_C.TRAIN.MOMENTUM = 0.9
RULES["TRAIN.MOMENTUM"] = Range(0, 1, high_open=True)
# L2 penalty for adam and sgd; decoupled decay for adamw
_C.TRAIN.WEIGHT_DECAY = 0.0
RULES["TRAIN.WEIGHT_DECAY"] = NON_NEGATIVE
# faces per training step, over all processes together (the global batch)
_C.TRAIN.BATCH_SIZE = 128
RULES["TRAIN.BATCH_SIZE"] = POSITIVE
# passes over the training faces; the run stops after this many, and the cosine schedule spans them
_C.TRAIN.EPOCHS = 80
RULES["TRAIN.EPOCHS"] = POSITIVE
# augment training crops as the AUG section says (the --aug flag)
_C.TRAIN.AUG = False
RULES["TRAIN.AUG"] = Flag()
# draw training faces with weights (faces in their AGE_BIN)^-BALANCE: 0 keeps the data set's age mix, 1 makes
# every age bin equally likely, so sparse ages (teens, the old) stop being pulled towards the common ones
_C.TRAIN.BALANCE = 0.0
RULES["TRAIN.BALANCE"] = NON_NEGATIVE
# also draw faces with weights (faces its (AGE_BIN, ethnicity) cell would hold if age and ethnicity were
# independent / faces it holds)^BALANCE_RACE: 1 gives every ethnicity the data set's age mix, so that a model does
# not learn an ethnicity's usual age (UTKFace's Asian faces are mostly young); needs the race column
_C.TRAIN.BALANCE_RACE = 0.0
RULES["TRAIN.BALANCE_RACE"] = NON_NEGATIVE
# width in years of the age bins that TRAIN.BALANCE and BALANCE_RACE even out
_C.TRAIN.AGE_BIN = 5
RULES["TRAIN.AGE_BIN"] = POSITIVE
# seed for Python, NumPy and torch
_C.TRAIN.SEED = 42
RULES["TRAIN.SEED"] = SEED_RANGE
# deterministic algorithms and a single thread order, for bit-exact resume on CPU
_C.TRAIN.DETERMINISTIC = False
RULES["TRAIN.DETERMINISTIC"] = Flag()
# mixed precision: "auto" (bf16 on CPUs and GPUs with native bf16, fp16 with a gradient scaler on
# older GPUs, fp32 otherwise), "bf16", "fp16" (CUDA only) or "off" (fp32); val.py and demo.py use the same rule
_C.TRAIN.AMP = "auto"
RULES["TRAIN.AMP"] = Choice(("auto", "bf16", "fp16", "off"))
# decay of an exponential moving average of the weights, updated every step (0: off); with it, validation,
# best.pth, val.py and demo.py use the averaged weights (0.999 averages over about the last 1,000 steps)
_C.TRAIN.EMA = 0.0
RULES["TRAIN.EMA"] = Range(0, 1, high_open=True)
# wrap the model in torch.compile
_C.TRAIN.COMPILE = False
RULES["TRAIN.COMPILE"] = Flag()
# under torchrun on GPUs, BatchNorm statistics over the global batch instead of each rank's share (CUDA only)
_C.TRAIN.SYNC_BN = False
RULES["TRAIN.SYNC_BN"] = Flag()

_C.AUG = CN()
# "batch": whole batches as tensor ops on the training device (augment.py); "albumentations": per sample
# in the loader, the original's path (slower; kept as the reference the batch path is checked against)
_C.AUG.BACKEND = "batch"
RULES["AUG.BACKEND"] = Choice(("batch", "albumentations"))
# probability of a horizontal flip
_C.AUG.FLIP_P = 0.5
RULES["AUG.FLIP_P"] = UNIT
# probability of a random rotation, zoom and shift (one affine warp)
_C.AUG.AFFINE_P = 0.7
RULES["AUG.AFFINE_P"] = UNIT
# rotation in degrees, up to +-ROTATE
_C.AUG.ROTATE = 10.0
RULES["AUG.ROTATE"] = Range(0, 180)
# zoom by a factor in [1 - SCALE, 1 + SCALE]
_C.AUG.SCALE = 0.1
RULES["AUG.SCALE"] = Range(0, 1, high_open=True)
# shift by up to SHIFT of the crop side, in x and in y
_C.AUG.SHIFT = 0.05
RULES["AUG.SHIFT"] = UNIT
# probability of a brightness and contrast change
_C.AUG.LIGHT_P = 0.5
RULES["AUG.LIGHT_P"] = UNIT
# brightness: add up to +-BRIGHTNESS of the full range
_C.AUG.BRIGHTNESS = 0.2
RULES["AUG.BRIGHTNESS"] = UNIT
# contrast: scale about the mean grey by a factor in [1 - CONTRAST, 1 + CONTRAST]
_C.AUG.CONTRAST = 0.2
RULES["AUG.CONTRAST"] = UNIT
# probability of a saturation change
_C.AUG.SATURATION_P = 0.3
RULES["AUG.SATURATION_P"] = UNIT
# saturation: blend with the grey image by a factor in [1 - SATURATION, 1 + SATURATION]
_C.AUG.SATURATION = 0.2
RULES["AUG.SATURATION"] = UNIT
# probability of a colour cast (another camera's white balance)
_C.AUG.CAST_P = 0.0
RULES["AUG.CAST_P"] = UNIT
# colour cast: multiply each channel by a factor in [1 - CAST, 1 + CAST]
_C.AUG.CAST = 0.1
RULES["AUG.CAST"] = UNIT
# probability of a gamma change
_C.AUG.GAMMA_P = 0.3
RULES["AUG.GAMMA_P"] = UNIT
# gamma in [1 - GAMMA, 1 + GAMMA]
_C.AUG.GAMMA = 0.2
RULES["AUG.GAMMA"] = Range(0, 1, high_open=True)
# probability of turning the face grey (scanned prints, black-and-white photos)
_C.AUG.GREY_P = 0.0
RULES["AUG.GREY_P"] = UNIT
# probability of a Gaussian blur
_C.AUG.BLUR_P = 0.0
RULES["AUG.BLUR_P"] = UNIT
# largest blur sigma, as a share of the crop side (0.015 is 1.4 px at 96 px)
_C.AUG.BLUR_SIGMA = 0.015
RULES["AUG.BLUR_SIGMA"] = Range(0, 1, low_open=True)
# probability of JPEG compression artefacts
_C.AUG.JPEG_P = 0.0
RULES["AUG.JPEG_P"] = UNIT
# lowest JPEG quality drawn (up to 100)
_C.AUG.JPEG_QUALITY = 30
RULES["AUG.JPEG_QUALITY"] = Range(1, 100)
# probability of a scanned print's look: sepia toning, faded contrast, the scan's blur and film grain together
_C.AUG.SCAN_P = 0.0
RULES["AUG.SCAN_P"] = UNIT
# a scan's fading: contrast scaled about the mean grey by a factor in [1 - SCAN_FADE, 1]
_C.AUG.SCAN_FADE = 0.5
RULES["AUG.SCAN_FADE"] = Range(0, 1, high_open=True)
# largest blur sigma of a scan, as a share of the crop side (drawn as AUG.BLUR_SIGMA is)
_C.AUG.SCAN_BLUR = 0.01
RULES["AUG.SCAN_BLUR"] = Range(0, 1, low_open=True)
# largest sd of a scan's film grain (grey, per pixel), as a share of the full range
_C.AUG.SCAN_GRAIN = 0.04
RULES["AUG.SCAN_GRAIN"] = UNIT

_C.LDL = CN()
# standard deviation, in years, of the Gaussian label distribution around the true age
_C.LDL.SIGMA = 2.0
RULES["LDL.SIGMA"] = POSITIVE
# weight of the L1 loss between expected and true age, added to the KL divergence
_C.LDL.L1_WEIGHT = 1.0
RULES["LDL.L1_WEIGHT"] = NON_NEGATIVE
# years the label distribution's sd grows per year of true age: sd = SIGMA + SIGMA_PER_YEAR * age. 0 is DLDL-v2's
# fixed sd; above 0 a child's target is narrow (a face changes fast per year) and an old person's wide
_C.LDL.SIGMA_PER_YEAR = 0.0
RULES["LDL.SIGMA_PER_YEAR"] = NON_NEGATIVE
# weigh each face's age loss by (training faces in its TRAIN.AGE_BIN)^-BALANCE, scaled to a mean of 1 over the
# training faces: TRAIN.BALANCE's aim (sparse ages count more) by the loss instead of by drawing faces again
_C.LDL.BALANCE = 0.0
RULES["LDL.BALANCE"] = NON_NEGATIVE
# weight of the predicted distribution's variance (years^2), added to the loss: the variance term of mean-variance
# loss (Pan et al., CVPR 2018), which draws each face's distribution tight around its mean
_C.LDL.VARIANCE_WEIGHT = 0.0
RULES["LDL.VARIANCE_WEIGHT"] = NON_NEGATIVE
# weight of a rank loss on the predicted distribution, added to the loss: for each age threshold, the binary
# cross-entropy of the distribution's mass above it against whether the true age is above it (ordinal regression's
# K-1 binary tasks, as in OR-CNN, Niu et al., CVPR 2016), summed over the 100 thresholds
_C.LDL.RANK_WEIGHT = 0.0
RULES["LDL.RANK_WEIGHT"] = NON_NEGATIVE

_C.MT = CN()
# weight of the gender cross-entropy in the multitask loss
_C.MT.GENDER_WEIGHT = 1.0
RULES["MT.GENDER_WEIGHT"] = NON_NEGATIVE
# weight of the ethnicity cross-entropy in the multitask loss (RACE: the original's name for the ethnicity head)
_C.MT.RACE_WEIGHT = 1.0
RULES["MT.RACE_WEIGHT"] = NON_NEGATIVE

_C.TEST = CN()
# faces per batch when scoring (the loop's validation, val.py)
_C.TEST.BATCH_SIZE = 128
RULES["TEST.BATCH_SIZE"] = POSITIVE
# average the predicted distributions of each face and its mirror image
_C.TEST.TTA = False
RULES["TEST.TTA"] = Flag()

_C.LOG = CN()
# also write TensorBoard event files under the run folder's tensorboard/ (needs the tensorboard package);
# history.csv and curves.png are written either way
_C.LOG.TENSORBOARD = False
RULES["LOG.TENSORBOARD"] = Flag()


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


def config_value(cfg, key):
    """The value of a dotted key, e.g. ``config_value(cfg, "TRAIN.LR")``."""
    return functools.reduce(lambda node, name: node[name], key.split("."), cfg)


def check_config(cfg, keys=None):
    """SystemExit naming the key, the value and the default, for the first value that breaks its key's rule.

    ``keys`` limits the check to those dotted names (a command line's overrides); the rules marked
    CheckedElsewhere are left to the check they name (config.check_config runs them).
    """
    defaults = get_cfg_defaults()
    for key in keys or RULES:
        value = config_value(cfg, key)
        problem = RULES[key].problem(value)
        if problem:
            raise SystemExit(f"{key} {problem}, not {value!r}; the default is {key} {config_value(defaults, key)}")


def key_help(sections):
    """Every key of ``sections`` with its default, the values it takes and the comment above it here, for -h."""
    defaults, meanings = get_cfg_defaults(), _key_comments()
    lines = []
    for key in all_keys(defaults):
        if key.split(".")[0] in sections:
            rule = RULES[key].describe()
            lines.append(f"  {key} {_typed(config_value(defaults, key))}" + (f"  ({rule})" if rule else ""))
            lines += textwrap.wrap(meanings.get(key, ""), HELP_WIDTH, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)


def _typed(value):
    """A default as it is typed after the flags: an empty string as ""."""
    return '""' if value == "" else str(value)


def _key_comments():
    """Each key's comment: the ``#`` lines right above its definition in this file, joined."""
    comments, pending = {}, []
    for line in Path(__file__).read_text().splitlines():
        if line.startswith("#"):
            pending.append(line[1:].strip())
            continue
        key = re.match(r"_C\.(\w+)\.(\w+) = ", line)
        if key:
            comments[f"{key[1]}.{key[2]}"] = " ".join(pending)
        pending = []
    return comments


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
    """Merge a YAML recipe (nested sections, as in configs/) with the same checks and hints as KEY VALUE pairs.

    A recipe is data: it is read with yaml.safe_load's loader and nothing else (yacs' own loader runs a ``.py``
    recipe as code, which would undo the safe loading of checkpoints), so any other kind of file is refused unread.
    """
    pairs = []
    for key, value in _flat_items(read_recipe(path)):
        pairs += [key, value]
    try:
        return merge_opts(cfg, pairs)
    except SystemExit as error:
        raise SystemExit(f"--config {path}: {error}") from None


def read_recipe(path):
    """The recipe's sections as a dict; SystemExit in one line naming the file for anything that is not one."""
    path = Path(path)
    example = _shown(min(shipped_recipes(), default=CONFIGS_DIR))
    if path.suffix.lower() not in RECIPE_SUFFIXES:
        raise SystemExit(f"--config {path}: a recipe must be a YAML file ({' or '.join(RECIPE_SUFFIXES)}); no other "
                         f"kind is read, and a recipe is never run. Write its keys in YAML, as in {example}")
    if not path.exists():
        listed = ", ".join(str(_shown(recipe)) for recipe in shipped_recipes()) or "none"
        raise SystemExit(f"--config {path} does not exist; the recipes in {_shown(CONFIGS_DIR)}/: {listed}")
    try:
        with open(path, encoding="utf-8") as handle:
            recipe = yaml.load(handle, Loader=_RecipeLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        detail = " ".join(str(error).split())  # YAML's messages span lines
        raise SystemExit(f"--config {path}: cannot read it as a YAML recipe ({detail})") from None
    if not isinstance(recipe, dict) or not recipe:
        held = "nothing" if recipe in (None, {}) else f"a {type(recipe).__name__}"
        raise SystemExit(f"--config {path}: a recipe holds config keys nested by section (MODEL:, then ARCH: tinyage "
                         f"indented below it), as in {example}; this file holds {held}")
    return recipe


class _RecipeLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, refusing a key given twice in one section, of which PyYAML would drop the first."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"{key_node.value} is given twice",
                                                            key_node.start_mark)
                seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


def shipped_recipes():
    return sorted(path for suffix in RECIPE_SUFFIXES for path in CONFIGS_DIR.glob(f"*{suffix}"))


def _shown(path):
    """``path`` as a user in the current folder would type it: relative when it lies below that folder."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return path


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
        current = config_value(cfg, key)
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
