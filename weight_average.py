"""The averaged weights of TRAIN.EMA: what validation scores and the checkpoint ships when it is on."""
import copy

import torch

from runtime import unwrap


def make_ema(model, cfg, resumed):
    """The exponential moving average of the weights for TRAIN.EMA > 0, else None.

    A resumed run continues the average it saved. Its BatchNorm statistics are recomputed for the averaged weights
    before they are scored or saved (precise_bn.refresh_statistics).
    """
    if cfg.TRAIN.EMA == 0:
        return None
    ema = WeightAverage(unwrap(model), cfg.TRAIN.EMA)
    if resumed and "ema_updates" in resumed:
        ema.module.load_state_dict(resumed["state_dict"])
        ema.updates = resumed["ema_updates"]
    return ema


class WeightAverage:
    """An exponential moving average of a model's weights and floating-point buffers, updated by one foreach lerp.

    torch's AveragedModel computes the same, but keeps its count of updates in a tensor that it reads or copies to
    the device on every update, which makes a GPU's host wait each step; here the count is a host int.
    """

    def __init__(self, model, decay):
        self.module = copy.deepcopy(model).requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update_parameters(self, model):
        pairs = zip([*self.module.parameters(), *self.module.buffers()], [*model.parameters(), *model.buffers()])
        averaged, copied = [], []  # copied: everything at the first update, then counters (num_batches_tracked)
        for ours, theirs in pairs:
            (averaged if self.updates and ours.is_floating_point() else copied).append((ours, theirs))
        if averaged:
            torch._foreach_lerp_([ours for ours, _ in averaged], [theirs for _, theirs in averaged], 1.0 - self.decay)
        for ours, theirs in copied:
            ours.copy_(theirs)
        self.updates += 1


def scored_weights(model, ema):
    """What validation scores and the checkpoint ships: the averaged weights when TRAIN.EMA is on."""
    return ema.module if ema is not None else unwrap(model)


def weight_sets(model, ema):
    """The weights being trained, and the average too when there is one: each needs BatchNorm statistics of its own."""
    return [unwrap(model)] + ([ema.module] if ema is not None else [])
