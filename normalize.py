"""Normalisation on the device: uint8 image batches → the float input a network expects.

Batches stay uint8 until they reach the training or inference device, because
normalising there is cheaper than shipping floats from the loader's workers.
augment.py's float work uses the two helpers below `normalize`.
"""
import functools

import torch


def normalize(images, settings, dtype=torch.float32, channels_last=False):
    """uint8 RGB NCHW on the device → the float input the network expects, in the memory format it runs in.

    ``settings`` is ``model.input_settings(arch)`` (or a checkpoint's "input"):
    colour order, value range, mean and std.

    The arithmetic runs on contiguous NCHW planes, where each channel's
    constants broadcast over a whole plane: on channels_last data (three
    channels innermost) the same broadcast does not vectorise and takes about
    six times as long on a CPU. One ``x * (1 / std) - mean / std`` pass, then
    one conversion to channels_last.
    """
    scale = 255.0 / settings["range"]
    mean = device_constant(tuple(settings["mean"]), images.device, dtype).view(1, 3, 1, 1) * scale
    std = device_constant(tuple(settings["std"]), images.device, dtype).view(1, 3, 1, 1) * scale
    images = float_planes(images.flip(1) if settings["space"] == "BGR" else images, dtype)
    images = torch.addcmul(-mean / std, images, 1.0 / std, out=images)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


def device_constant(values, device, dtype=torch.float32):
    """Fixed numbers (nested tuples) as a tensor on ``device``, made once: a tensor built from host numbers every
    step would make a GPU's host wait for each copy. Shared by every caller, so never changed in place.

    While torch.export or torch.compile traces (export.py traces `normalize`), the tensor is made afresh and kept
    out of the cache: the cached tensor captured in the traced graph gave an ONNX export whose ages were off by up
    to 88 years, and a tensor made while tracing is a stand-in that must not serve later calls.
    """
    if torch.compiler.is_compiling():
        return torch.tensor(values, dtype=dtype).to(device)
    return _cached_constant(values, device, dtype)


@functools.lru_cache(maxsize=None)
def _cached_constant(values, device, dtype):
    return torch.tensor(values, dtype=dtype).to(device)


def float_planes(images, dtype=torch.float32):
    """Any-layout images as contiguous NCHW floats, converted and laid out in one copy.

    A uint8 channels_last batch (what the crop cache gives) turned into floats
    first and made contiguous after takes several times as long on a CPU.
    """
    if images.dtype == dtype and images.is_contiguous():
        return images.clone()
    planes = torch.empty(images.shape, dtype=dtype, device=images.device)
    return planes.copy_(images)
