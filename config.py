"""A training run's config: the defaults (defaults.py) or the resumed run's, then a --config recipe, the flags and the
KEY VALUE pairs, checked whole before any data is read."""
import defaults
from checkpoint import checkpoint_cfg, load_checkpoint
from defaults import get_cfg_defaults, merge_file, merge_opts
from model import check_arch, check_input_size, check_weights_source
from objectives import refuse_ignored_settings
from resume import refuse_model_changes


def load_config(args):
    """Defaults, or the resumed run's config, then the --config recipe, then the flags, then KEY VALUE overrides."""
    resumed = load_checkpoint(args.resume) if args.resume else None
    base = checkpoint_cfg(resumed) if resumed else get_cfg_defaults()
    cfg = base.clone()
    if args.config:
        merge_file(cfg, args.config)
    if args.aug:
        cfg.TRAIN.AUG = True
    if args.expand is not None:
        cfg.DATA.EXPAND = args.expand
    merge_opts(cfg, args.opts)
    if resumed:
        refuse_model_changes(args.resume, base, cfg)
    check_config(cfg)
    refuse_ignored_settings(args.objective, base, cfg, args.config, args.opts)
    cfg.freeze()
    return cfg, resumed


def check_config(cfg):
    """Refuse values that would crash or silently misbehave later, before any data is read: each key's rule in
    defaults.py, then the keys whose check needs the model zoo or the file system (defaults.CheckedElsewhere)."""
    defaults.check_config(cfg)
    check_arch(cfg.MODEL.ARCH)
    check_input_size(cfg.MODEL.ARCH, cfg.MODEL.IMG_SIZE)
    check_weights_source(cfg.MODEL.PRETRAINED, cfg.MODEL.PRETRAINED_SHA256)
