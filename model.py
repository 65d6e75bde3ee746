"""Networks that map a face crop to logits over the ages 0..100.

Every model returns a dict: ``{"age": (B, 101) logits}``, and the multitask
model adds ``"gender"`` and ``"race"`` (ethnicity) logits (ATTRIBUTE_HEADS). One output shape for every
family keeps the loop, the objectives and DataParallel free of special cases.
"""
import functools
import hashlib
import os
import re
import shutil
import urllib.error
import urllib.parse
import urllib.request
import warnings
from pathlib import Path

import torch
import torch.nn as nn

import dlib_resnet
import files
from checkpoint import load_state
from defaults import NUM_AGES, NUM_ETHNICITIES, NUM_GENDERS

# (out_channels, number of 3x3 convs) per block, from DLDL-v2 (Gao et al., IJCAI 2018)
THIN_AGE_BLOCKS = ((32, 2), (64, 2), (128, 3), (256, 3), (256, 3))
TINY_AGE_BLOCKS = ((16, 2), (32, 2), (64, 2), (128, 3), (128, 3))
AGE_NETS = {"thinage": THIN_AGE_BLOCKS, "tinyage": TINY_AGE_BLOCKS}
# The multitask model's gender and ethnicity heads, by their keys in its outputs, in batches and objectives, in
# checkpoints ("race.weight") and in every file and dict a user reads ("race_prob", "race_accuracy", the CSVs'
# "race" column): "race" is the ethnicity head, under the original's (and UTKFace's) name, kept for those files.
ATTRIBUTE_HEADS = ("gender", "race")
# dlib's face-recognition ResNet (dlib_resnet.py), which starts from its face-recognition weights by default
DLIB_RESNET = "dlib_resnet"
# MODEL.PRETRAINED value that asks for random init, also for an architecture that has default weights
NO_WEIGHTS = "none"
# learning-rate scale of a backbone that starts from these weights against its new age layer's (TRAIN.BACKBONE_LR
# -1): dlib's ResNet has no BatchNorm to absorb large steps; AdamW at 3e-4 wrecked it within 200 steps, 3e-5 does not
FINE_TUNE_LR_SCALE = {DLIB_RESNET: 0.03}
# What ThinAgeNet and TinyAgeNet are fed (they have no ImageNet weights, so any fixed choice works): RGB in [0, 1]
# with ImageNet's mean and std, as torchvision's ResNets.
IMAGENET_INPUT = {"space": "RGB", "range": 1.0, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
WEIGHTS_CACHE = Path(os.environ.get("AGE_WEIGHTS_CACHE", Path.home() / ".cache" / "age-estimation"))
# a download fails when the server takes longer than this to connect or to send its next bytes: a stalled server
# must not hang a run
DOWNLOAD_TIMEOUT_S = 60
# a sha256 as sha256sum prints it; it also names the cached file, so nothing else may pass
SHA256_DIGITS = re.compile(r"[0-9a-fA-F]{64}")


def conv_block(in_channels, out_channels, num_convs):
    layers = []
    for index in range(num_convs):
        layers += [
            nn.Conv2d(in_channels if index == 0 else out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        ]
    return nn.Sequential(*layers)


class AgeNet(nn.Module):
    """ThinAgeNet / TinyAgeNet: VGG-style blocks, max-pool between them, global average pool.

    The global pool makes the network work at any input size.
    """

    def __init__(self, blocks, num_classes=NUM_AGES):
        super().__init__()
        stages, in_channels = [], 3
        for index, (channels, num_convs) in enumerate(blocks):
            pool = [nn.MaxPool2d(2, 2)] if index > 0 else []
            stages.append(nn.Sequential(*pool, conv_block(in_channels, channels, num_convs)))
            in_channels = channels
        self.stages = nn.ModuleList(stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = in_channels
        self.last_linear = nn.Linear(in_channels, num_classes)
        self.reset_parameters()

    def reset_parameters(self):
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.01)
                nn.init.zeros_(module.bias)

    def features(self, x):
        for stage in self.stages:
            x = stage(x)
        return self.pool(x).flatten(1)

    def forward(self, x):
        return {"age": self.last_linear(self.features(x))}


class PretrainedModelsNet(nn.Module):
    """A ``pretrainedmodels`` backbone with adaptive pooling and a 101-way last layer."""

    def __init__(self, arch, num_classes=NUM_AGES):
        super().__init__()
        self.backbone = build_pretrainedmodels_backbone(arch)
        self.num_features = self.backbone.last_linear.in_features
        self.backbone.last_linear = nn.Identity()
        self.last_linear = nn.Linear(self.num_features, num_classes)

    def features(self, x):
        return self.backbone.logits(self.backbone.features(x)).flatten(1)

    def forward(self, x):
        return {"age": self.last_linear(self.features(x))}


def check_arch(arch):
    """SystemExit naming the choices, for an architecture that neither we nor pretrainedmodels know."""
    if arch in AGE_NETS or arch == DLIB_RESNET:
        return
    import pretrainedmodels

    if arch not in pretrainedmodels.model_names:
        raise SystemExit(
            f"unknown MODEL.ARCH {arch!r}: use thinage, tinyage, {DLIB_RESNET} or one of pretrainedmodels' "
            f"{', '.join(sorted(pretrainedmodels.model_names))}"
        )


@functools.lru_cache(maxsize=None)
def input_settings(arch):
    """Colour order, value range, mean and std that ``arch`` expects, as a plain dict (checkpoints store it).

    ImageNet weights only work with the pixel statistics they were trained on:
    bninception wants BGR in 0..255, the Inception and Xception families mean
    and std 0.5. pretrainedmodels lists them per architecture.
    """
    check_arch(arch)
    if arch in AGE_NETS:
        return dict(IMAGENET_INPUT)
    if arch == DLIB_RESNET:
        return dlib_input_settings()
    imagenet = imagenet_settings(arch)
    return {"space": imagenet["input_space"], "range": float(imagenet["input_range"][1]),
            "mean": tuple(float(v) for v in imagenet["mean"]), "std": tuple(float(v) for v in imagenet["std"])}


def dlib_input_settings():
    """dlib's input layer: (pixel - the mean RGB stored in the weights file) / 256, in RGB order on 0..255."""
    means = dlib_resnet.file_input_means(dlib_resnet.default_weights_file())
    return {"space": "RGB", "range": 255.0, "mean": tuple(means), "std": (dlib_resnet.PIXEL_DIVISOR,) * 3}


def imagenet_settings(arch):
    """pretrainedmodels' record of ``arch``'s ImageNet weights: URL, input size, colour order, range, mean, std."""
    import pretrainedmodels

    settings = pretrainedmodels.pretrained_settings[arch]
    return settings.get("imagenet") or next(iter(settings.values()))


def random_init_warning(arch):
    """What to tell a user whose pretrainedmodels architecture is about to train from random weights (None for AgeNets)."""
    if arch in AGE_NETS or arch == DLIB_RESNET:
        return None
    url = imagenet_settings(arch)["url"]
    return (f"warning: {arch} starts from random weights. The original trained it from ImageNet weights, which learn "
            f"far better and faster: pass MODEL.PRETRAINED with a local copy of {url}, or that URL together with "
            f"MODEL.PRETRAINED_SHA256 <its sha256>.")


@functools.lru_cache(maxsize=None)
def min_input_size(arch):
    """The smallest square crop side that ``arch`` takes.

    ThinAgeNet and TinyAgeNet halve the map (rounding down) at each max-pool
    between blocks, so the last block needs an input of 2 ** pools pixels.
    dlib's ResNet and the pretrainedmodels backbones are probed with a bisection
    below their native size, on the meta device: shapes are computed, no
    weights made or pixels run.
    """
    if arch in AGE_NETS:
        return 2 ** (len(AGE_NETS[arch]) - 1)
    with torch.device("meta"):
        model = build_model(arch).eval()
    low, high = 1, native_input_size(arch)
    while low < high:
        middle = (low + high) // 2
        if _takes_input(model, middle):
            high = middle
        else:
            low = middle + 1
    return low


def _takes_input(model, size):
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size, device="meta"))
    except (RuntimeError, ValueError):  # "Output size is too small", "kernel size can't be greater than input"
        return False
    return True


def native_input_size(arch):
    """The crop side a network's weights were trained at: dlib's chips, or pretrainedmodels' ImageNet size."""
    return dlib_resnet.NATIVE_SIZE if arch == DLIB_RESNET else imagenet_settings(arch)["input_size"][-1]


def check_input_size(arch, size):
    """SystemExit naming the smallest size, for a crop side ``arch`` cannot take; a network is only probed below its native size."""
    if arch not in AGE_NETS and size >= native_input_size(arch):
        return
    smallest = min_input_size(arch)
    if size < smallest:
        raise SystemExit(f"MODEL.IMG_SIZE {size} is too small for {arch}: the smallest crop it takes is {smallest} px; "
                         f"pass MODEL.IMG_SIZE {smallest} or more")


def build_pretrainedmodels_backbone(arch):
    import pretrainedmodels

    check_arch(arch)
    with warnings.catch_warnings():
        # pretrainedmodels still calls torchvision with its deprecated `pretrained` argument
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
        backbone = pretrainedmodels.__dict__[arch](num_classes=1000, pretrained=None)
    # Any input size works once the fixed-size pooling is adaptive.
    for name in ("avg_pool", "avgpool"):
        if isinstance(getattr(backbone, name, None), (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
            setattr(backbone, name, nn.AdaptiveAvgPool2d(1))
    return backbone


class MultiTaskNet(nn.Module):
    """Age, gender and ethnicity from one backbone's final features.

    The three heads read the same pooled features: gender and ethnicity need
    the whole network's depth (heads after the second stage of TinyAgeNet
    reached 58.8% gender accuracy against a 52.1% majority). Their logits also
    join the features that predict the age distribution, so that age can be
    conditioned on them.
    """

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.gender = nn.Linear(backbone.num_features, NUM_GENDERS)
        # The ethnicity head. Its attribute name is its weights' name in every checkpoint ("race.weight", the shipped
        # model's too), in the parameter names that shipping and resume checks compare, and in the ONNX graph:
        # renamed, each of those would need a key map, so it keeps the name the files use.
        self.race = nn.Linear(backbone.num_features, NUM_ETHNICITIES)
        self.age = nn.Linear(backbone.num_features + NUM_GENDERS + NUM_ETHNICITIES, NUM_AGES)
        backbone.last_linear = nn.Identity()

    def forward(self, x):
        features = self.backbone.features(x)
        gender = self.gender(features)
        ethnicity = self.race(features)
        age = self.age(torch.cat([features, gender, ethnicity], dim=1))
        return {"age": age, "gender": gender, "race": ethnicity}

    def head_modules(self):
        return [self.gender, self.race, self.age]


def build_model(arch, multitask=False, width=1.0):
    """The network for MODEL.ARCH; ``width`` (MODEL.WIDTH) scales the channels of ThinAgeNet and TinyAgeNet."""
    if arch in AGE_NETS:
        backbone = AgeNet(tuple((max(1, round(channels * width)), convs) for channels, convs in AGE_NETS[arch]))
    elif width != 1.0:
        raise SystemExit(f"MODEL.WIDTH scales thinage and tinyage only; {arch} has its own width (set MODEL.WIDTH 1.0)")
    elif arch == DLIB_RESNET:
        backbone = dlib_resnet.DlibResNet(NUM_AGES)
    else:
        backbone = PretrainedModelsNet(arch)
    return MultiTaskNet(backbone) if multitask else backbone


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_url(source):
    return source.startswith(("http://", "https://"))


def check_weights_source(source, sha256=""):
    """SystemExit, before any data is read or anything downloaded, for weights that cannot be had: a local file
    that is not there, or a URL without the sha256 that verifies it. "" (the architecture's default) and "none"
    (random init) are fine."""
    if not source or source.lower() == NO_WEIGHTS:
        return
    if is_url(source):
        require_sha256(source, sha256)
        return
    path = Path(source).expanduser()
    if not path.is_file():
        raise SystemExit(
            f"weights file {path} not found. ImageNet weights cannot be downloaded offline: copy the "
            f"file here and set MODEL.PRETRAINED to its path, or set MODEL.PRETRAINED none for random init."
        )


def require_sha256(url, sha256):
    """SystemExit, before any download, unless ``sha256`` is one (it becomes part of the cached file's name)."""
    if not sha256:
        raise SystemExit(f"downloading {url} needs its sha256 (MODEL.PRETRAINED_SHA256 or --sha256), so that it can be "
                         f"verified")
    if not SHA256_DIGITS.fullmatch(sha256):
        raise SystemExit(f"sha256 {sha256!r} for {url} is not 64 hexadecimal digits; pass the file's sha256 as "
                         f"sha256sum prints it")


def fetch_verified(url, sha256):
    """Download ``url`` once into the cache and refuse it unless its sha256 matches."""
    require_sha256(url, sha256)
    name = Path(urllib.parse.urlparse(url).path).name or "weights.pth"
    target = WEIGHTS_CACHE / f"{sha256[:16].lower()}-{name}"
    if not target.exists():
        download(url, target)
    actual = sha256_of(target)
    if actual != sha256.lower():
        target.unlink()
        raise SystemExit(f"{url}: sha256 {actual} does not match the pinned {sha256}; the file was removed")
    return target


def download(url, target):
    """``url`` into ``target``, written whole (files.atomic_write): Ctrl-C leaves nothing, and two downloads of one
    file at once never write into each other."""
    files.remove_stale_temp_files(target.parent, [target.name])
    try:
        files.atomic_write(target, lambda partial: fetch_url(url, partial))
    except OSError as error:
        raise SystemExit(
            f"could not download {url} ({download_failure(error)}). Offline, download it elsewhere and pass the "
            f"local file instead."
        ) from None


def fetch_url(url, path):
    """``url``'s bytes into ``path``; a server silent for DOWNLOAD_TIMEOUT_S raises TimeoutError (urlretrieve has no
    timeout and would wait for ever)."""
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(path, "wb") as handle:
        shutil.copyfileobj(response, handle)


def download_failure(error):
    """Why a download failed, in words; a timeout names the limit."""
    reason = error.reason if isinstance(error, urllib.error.URLError) else error
    if isinstance(reason, TimeoutError):
        return f"no answer within {DOWNLOAD_TIMEOUT_S} s"
    return str(error)


def resolve_weights(source, sha256=""):
    """A local path for a weights file named by a path or a URL, verified when a hash is given."""
    if is_url(source):
        return fetch_verified(source, sha256)
    check_weights_source(source, sha256)
    path = Path(source).expanduser()
    if sha256 and sha256_of(path) != sha256.lower():
        raise SystemExit(f"{path}: sha256 does not match MODEL.PRETRAINED_SHA256 {sha256}")
    return path


def pretrained_source(arch, pretrained):
    """The weights a new run starts from (a path or URL), or None for random init.

    MODEL.PRETRAINED empty means the architecture's own default: dlib's
    face-recognition weights for dlib_resnet, random init for the others;
    ``none`` means random init for every architecture.
    """
    if pretrained.lower() == NO_WEIGHTS:
        return None
    if pretrained:
        return pretrained
    return str(dlib_resnet.default_weights_file()) if arch == DLIB_RESNET else None


def head_modules(model):
    """The layers no pretrained file provides (the age layer, the multitask heads), which learn at the full rate."""
    return model.head_modules() if isinstance(model, MultiTaskNet) else [model.last_linear]


def backbone_lr_scale(arch, pretrained, scale):
    """TRAIN.BACKBONE_LR as used: -1 picks the architecture's fine-tuning scale when it starts from weights, else 1."""
    if scale >= 0:
        return scale
    return FINE_TUNE_LR_SCALE.get(arch, 1.0) if pretrained_source(arch, pretrained) else 1.0


def load_pretrained_backbone(model, source, sha256=""):
    """Load pretrained weights into the backbone, leaving the new heads at random init; the number of tensors loaded.

    A dlib ``.dat`` file is read into dlib_resnet; anything else is a state dict
    (ImageNet weights, or a checkpoint of this project).
    """
    backbone = model.backbone if isinstance(model, MultiTaskNet) else model
    target = backbone.backbone if isinstance(backbone, PretrainedModelsNet) else backbone
    path = resolve_weights(source, sha256)
    if isinstance(target, dlib_resnet.DlibResNet) and Path(path).suffix == ".dat":
        return load_dlib_file(target, path)
    state = load_state(path)
    state = state.get("state_dict", state)
    own = target.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise SystemExit(f"{source}: none of its tensors fit {type(target).__name__}; is it the right architecture?")
    target.load_state_dict(usable, strict=False)
    return len(usable)


def load_dlib_file(target, path):
    try:
        target.load_dlib_weights(path)
    except (dlib_resnet.DlibFormatError, OSError) as error:
        raise SystemExit(f"{path} is not dlib's face-recognition ResNet ({dlib_resnet.DLIB_RESNET_FILE}): {error}. "
                         f"Pass that file, a .pth state dict, or MODEL.PRETRAINED none for random init.") from None
    return len(target.backbone_parameters())
