import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import config
import train
from conftest import ROOT, make_split
from defaults import RULES, all_keys, cfg_from_dict, cfg_to_dict, config_value, get_cfg_defaults, merge_file, merge_opts


def test_original_defaults():
    cfg = get_cfg_defaults()
    assert cfg.MODEL.ARCH == "se_resnext50_32x4d" and cfg.MODEL.IMG_SIZE == 224
    assert (cfg.TRAIN.OPT, cfg.TRAIN.LR, cfg.TRAIN.LR_DECAY_STEP, cfg.TRAIN.LR_DECAY_RATE) == ("adam", 0.001, 20, 0.2)
    assert (cfg.TRAIN.MOMENTUM, cfg.TRAIN.WEIGHT_DECAY, cfg.TRAIN.BATCH_SIZE, cfg.TRAIN.EPOCHS) == (0.9, 0.0, 128, 80)
    assert cfg.TEST.BATCH_SIZE == 128


def test_overrides_keep_types():
    cfg = merge_opts(get_cfg_defaults(), ["MODEL.ARCH", "se_resnet50", "TRAIN.OPT", "sgd", "TRAIN.LR", "0.1", "TRAIN.AUG", "True"])
    assert (cfg.MODEL.ARCH, cfg.TRAIN.OPT, cfg.TRAIN.LR, cfg.TRAIN.AUG) == ("se_resnet50", "sgd", 0.1, True)


def test_mistyped_key_names_near_matches():
    with pytest.raises(SystemExit, match=r"unknown config key 'TRAIN\.LRR'.*Did you mean TRAIN\.LR"):
        merge_opts(get_cfg_defaults(), ["TRAIN.LRR", "0.1"])
    with pytest.raises(SystemExit, match="KEY VALUE pairs"):
        merge_opts(get_cfg_defaults(), ["TRAIN.LR"])


def test_round_trip_through_a_plain_dict():
    cfg = merge_opts(get_cfg_defaults(), ["LDL.SIGMA", "3.0"])
    data = cfg_to_dict(cfg)
    assert type(data) is dict and type(data["LDL"]) is dict
    assert cfg_from_dict(data) == cfg


def test_integers_are_accepted_for_float_keys():
    cfg = merge_opts(get_cfg_defaults(), ["TRAIN.LR", "1", "DATA.EXPAND", "0", "LDL.SIGMA", "+3"])
    assert (cfg.TRAIN.LR, cfg.DATA.EXPAND, cfg.LDL.SIGMA) == (1.0, 0.0, 3.0)
    assert all(type(v) is float for v in (cfg.TRAIN.LR, cfg.DATA.EXPAND, cfg.LDL.SIGMA))
    with pytest.raises(SystemExit, match="Type mismatch"):
        merge_opts(get_cfg_defaults(), ["TRAIN.EPOCHS", "1.5"])  # but never a float for an integer key


RECIPES = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_a_recipe_file_is_merged_and_command_line_keys_still_win(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("MODEL:\n  ARCH: tinyage\n  IMG_SIZE: 64\nTRAIN:\n  LR: 1\n  EPOCHS: 3\n")
    args = train.build_parser("ldl").parse_intermixed_args(
        ["--data_dir", "d", "--dataset", "utk", "--config", str(recipe), "TRAIN.EPOCHS", "5"])
    cfg, _ = config.load_config(args)
    assert (cfg.MODEL.ARCH, cfg.MODEL.IMG_SIZE, cfg.TRAIN.LR, cfg.TRAIN.EPOCHS) == ("tinyage", 64, 1.0, 5)


@pytest.mark.parametrize("text, message", [("TRAIN:\n  LRR: 0.1\n", r"unknown config key 'TRAIN\.LRR'.*Did you mean TRAIN\.LR"),
                                           ("TRAIN:\n  EPOCHS: 1.5\n", "Type mismatch"),
                                           ("TRAIN: [1, 2\n", "cannot read it as a YAML recipe"),
                                           ("# only a comment\n", "a recipe holds config keys .*holds nothing"),
                                           ("- MODEL.ARCH\n- tinyage\n", "a recipe holds config keys.*holds a list"),
                                           ("TRAIN:\n  LR: 0.1\nMODEL:\n  ARCH: tinyage\nTRAIN:\n  EPOCHS: 3\n",
                                            "TRAIN is given twice .*line 5, column 1")])
def test_a_bad_recipe_is_refused_in_one_line_naming_the_file(tmp_path, text, message):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    with pytest.raises(SystemExit, match=f"--config {recipe}: .*{message}") as refused:
        merge_file(get_cfg_defaults(), recipe)
    assert "\n" not in str(refused.value)


def test_a_missing_recipe_is_said_not_to_exist_and_the_shipped_ones_are_listed(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as refused:
        merge_file(get_cfg_defaults(), tmp_path / "recpie.yaml")
    assert str(refused.value) == (f"--config {tmp_path / 'recpie.yaml'} does not exist; the recipes in configs/: "
                                  + ", ".join(str(path.relative_to(ROOT)) for path in RECIPES))


@pytest.mark.parametrize("name", ["recipe.py", "recipe.json"])
def test_a_recipe_that_is_not_yaml_is_refused_in_one_line_and_never_run(tmp_path, name):
    """A .py recipe that would leave a marker file if it ran: train-ldl.py refuses it unread, as it refuses JSON."""
    marker = tmp_path / "the recipe ran"
    recipe = tmp_path / name
    recipe.write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\ncfg = None\n")
    make_split(tmp_path, 4, 2)
    done = subprocess.run([sys.executable, str(ROOT / "train-ldl.py"), "--data_dir", str(tmp_path), "--dataset", "utk",
                           "--checkpoint", str(tmp_path / "ck"), "--config", str(recipe)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env=dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1"))
    assert not marker.exists(), "the recipe was executed"
    assert done.returncode == 1 and done.stdout == "", done
    assert done.stderr.splitlines() == [
        f"--config {recipe}: a recipe must be a YAML file (.yaml or .yml); no other kind is read, and a recipe is "
        f"never run. Write its keys in YAML, as in {RECIPES[0].relative_to(ROOT)}"], done.stderr
    assert not (tmp_path / "ck").exists()


@pytest.mark.parametrize("recipe", RECIPES, ids=[path.name for path in RECIPES])
def test_every_shipped_recipe_loads_and_passes_the_checks(recipe):
    cfg = merge_file(get_cfg_defaults(), recipe)
    config.check_config(cfg)
    assert cfg != get_cfg_defaults()
def test_every_key_has_a_rule_and_every_rule_a_key():
    """A key added to defaults.py without its rule on the next line fails here."""
    assert sorted(all_keys(get_cfg_defaults())) == sorted(RULES)


def test_the_defaults_pass_every_check():
    config.check_config(get_cfg_defaults())


def bad_settings():
    """(key, bad value) for every key of the tree, each value made by the key's own rule."""
    cfg = get_cfg_defaults()
    return [(key, value) for key in all_keys(cfg) for value in RULES[key].bad_values(config_value(cfg, key))]


@pytest.mark.parametrize("key, value", bad_settings())
def test_every_keys_bad_values_are_refused_naming_the_key(key, value):
    """Walks the whole tree: each bad value, set on the defaults, stops the run with the key named; and given on the
    command line (where it can be written there), it is refused as well, by yacs' type check or by the rule."""
    cfg = get_cfg_defaults()
    section, name = key.split(".")
    cfg[section][name] = value
    with pytest.raises(SystemExit, match=re.escape(key)):
        config.check_config(cfg)
    if isinstance(value, float) and not math.isfinite(value):
        return  # "nan" and "inf" are strings to yacs: refused by the type check, not by a rule
    with pytest.raises(SystemExit, match=re.escape(key)):
        config.check_config(merge_opts(get_cfg_defaults(), [key, str(value)]))
