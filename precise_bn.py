"""BatchNorm statistics of the scored weights' own ("precise BN"), recomputed from a fixed set of training crops.

Running statistics are a moving average over the last few dozen training batches, each taken with the weights of
its step; while the weights still move (late in a short cosine run, or for the averaged weights of TRAIN.EMA) that
average trails them and scores them worse than statistics of their own would.
"""
import numpy as np
import torch

from dataset import FaceDataset, collate
from model import input_settings
from normalize import normalize
from runtime import autocast, unwrap

# the BatchNorm statistics of the weights that are scored and saved are recomputed from this many training crops
# (spread evenly over the training CSV, they give about the statistics that four times as many give)
BN_STATISTICS_FACES = 512


class StatisticsCrops:
    """The training crops that give the scored weights their BatchNorm statistics: BN_STATISTICS_FACES of them, evenly
    spread over the training CSV, without augmentation, the same ones every time; uint8 batches.

    Batches are ``batch_size`` crops, this rank's share of TRAIN.BATCH_SIZE, which its memory holds in training
    (every rank reads all the crops). A last batch of one face joins the one before it: BatchNorm in training mode
    cannot normalise a single value per channel, as one face gives on 1x1 maps (TinyAgeNet at 16 px).
    """

    def __init__(self, records, crops, cfg, batch_size):
        count = min(BN_STATISTICS_FACES, len(records))
        self.indices = np.unique(np.linspace(0, len(records) - 1, count).round().astype(np.int64))
        self.dataset = FaceDataset(records, cfg.MODEL.IMG_SIZE, cfg.DATA.EXPAND, crops=crops,
                                   on_bad_image=cfg.DATA.ON_BAD_IMAGE)
        self.batch_size = batch_size

    def batches(self):
        """The crops' indices, cut into batches."""
        starts = list(range(0, len(self.indices), self.batch_size))
        if len(starts) > 1 and len(self.indices) - starts[-1] == 1:
            starts.pop()
        return np.split(self.indices, starts[1:])

    def __iter__(self):
        for indices in self.batches():
            batch = collate([self.dataset[int(index)] for index in indices])
            if "image" in batch:
                yield batch["image"]


class LayerInputs:
    """Per-channel mean and variance of everything one BatchNorm layer is fed, batch after batch, each value counting
    once however the batches are cut: each batch's mean and squared deviations, merged in float64 by Chan, Golub and
    LeVeque's pairwise update. A forward pre-hook."""

    def __init__(self):
        self.count, self.mean, self.squares = 0, 0.0, 0.0

    def __call__(self, _layer, inputs):
        values = inputs[0].detach().float()
        variance, mean = torch.var_mean(values, dim=[0, *range(2, values.dim())], correction=0)
        count = values.numel() // values.shape[1]
        total = self.count + count
        delta = mean.double() - self.mean
        self.mean = self.mean + delta * (count / total)
        self.squares = self.squares + variance.double() * count + delta**2 * (self.count * count / total)
        self.count = total

    def store(self, layer):
        """Into the layer's running statistics, as BatchNorm keeps them: the mean and the unbiased variance."""
        layer.running_mean.copy_(self.mean)
        layer.running_var.copy_(self.squares / max(self.count - 1, 1))


def batchnorm_layers(model):
    """The BatchNorm layers (SyncBatchNorm included) that keep running statistics."""
    return [layer for layer in model.modules()
            if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm) and layer.track_running_stats]


def precise_batchnorm(model, batches):
    """Set every BatchNorm layer's running statistics to the mean and variance of its inputs over ``batches``, with
    the model in training mode (each batch normalised by its own statistics, as in training)."""
    layers = batchnorm_layers(model)
    inputs = [LayerInputs() for _ in layers]
    hooks = [layer.register_forward_pre_hook(statistics) for layer, statistics in zip(layers, inputs)]
    was_training = model.training
    try:
        for layer in layers:
            layer.reset_running_stats()  # num_batches_tracked then counts these batches, whatever came before
        model.train()
        for images in batches:
            model(images)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    for layer, statistics in zip(layers, inputs):
        if statistics.count:  # a layer that saw no face (every crop unreadable) keeps reset statistics
            statistics.store(layer)


def refresh_statistics(models, statistics_crops, cfg, runtime):
    """Give each of ``models`` (the weights trained, and their average under TRAIN.EMA) BatchNorm statistics of its own.

    The statistics are recomputed from scratch, as the mean and variance of each layer's inputs over all of
    StatisticsCrops' faces (read once, however many models), each face weighing alike whatever the batch it came
    in. The RNG is put back afterwards, so that a run killed and resumed still ends bit-identical. In training mode
    BatchNorm normalises with each batch's own statistics, so this changes nothing the optimizer sees. A model
    without BatchNorm has nothing to recompute.
    """
    models = [model for model in models if batchnorm_layers(model)]
    if not models:
        return
    settings, device = input_settings(cfg.MODEL.ARCH), runtime.device
    generators = [device] if device.type == "cuda" else []
    batches = list(statistics_crops)
    for model in models:
        inputs = (normalize(images.to(device, non_blocking=True), settings, channels_last=cfg.MODEL.CHANNELS_LAST)
                  for images in batches)
        with torch.random.fork_rng(devices=generators), torch.no_grad(), autocast(runtime, cfg.TRAIN.AMP):
            precise_batchnorm(model, inputs)


def share_buffers(model, runtime):
    """Give every rank rank 0's buffers bit for bit: each rank recomputes the statistics from the same crops, but a
    model without BatchNorm keeps the running statistics its own last step left, and ranks on different devices
    may round apart; either way the ranks would validate their shards with models other than the one rank 0 saves."""
    if runtime.distributed:
        for buffer in unwrap(model).buffers():
            torch.distributed.broadcast(buffer, src=0)
