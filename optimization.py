"""The optimizer (TRAIN.OPT, with the pretrained backbone at its own rate) and the learning-rate schedule."""
import torch

from model import backbone_lr_scale, head_modules


def build_optimizer(model, cfg):
    groups = parameter_groups(model, cfg)
    if cfg.TRAIN.OPT == "sgd":
        return torch.optim.SGD(groups, lr=cfg.TRAIN.LR, momentum=cfg.TRAIN.MOMENTUM,
                               weight_decay=cfg.TRAIN.WEIGHT_DECAY)
    if cfg.TRAIN.OPT == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.TRAIN.LR, weight_decay=cfg.TRAIN.WEIGHT_DECAY)
    return torch.optim.Adam(groups, lr=cfg.TRAIN.LR, weight_decay=cfg.TRAIN.WEIGHT_DECAY)


def parameter_groups(model, cfg):
    """The new heads at TRAIN.LR first (history logs the first group's rate), then a pretrained backbone at its scale.

    Each group carries its ``lr_scale``, so that a schedule changed on resume is
    put into every group in proportion. One group when the scale is 1.
    """
    scale = backbone_lr_scale(cfg.MODEL.ARCH, cfg.MODEL.PRETRAINED, cfg.TRAIN.BACKBONE_LR)
    if scale == 1.0:
        return [{"params": list(model.parameters()), "lr_scale": 1.0}]
    head = [p for module in head_modules(model) for p in module.parameters()]
    head_ids = {id(p) for p in head}
    backbone = [p for p in model.parameters() if id(p) not in head_ids]
    return [{"params": head, "lr_scale": 1.0}, {"params": backbone, "lr": cfg.TRAIN.LR * scale, "lr_scale": scale}]


def build_scheduler(optimizer, cfg):
    if cfg.TRAIN.SCHEDULER == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.TRAIN.EPOCHS)
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.TRAIN.LR_DECAY_STEP, gamma=cfg.TRAIN.LR_DECAY_RATE)
