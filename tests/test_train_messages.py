"""What the training scripts tell their user: -h, the keys an objective would ignore, and a run's own lines."""
import re
import time

import pytest
import torch

import config
import train
from conftest import ROOT, make_split
from defaults import all_keys, config_value, get_cfg_defaults
from objectives import OBJECTIVES
from progress import RunPace, clock_time
from runtime import precision_name

QUICK = ["MODEL.ARCH", "tinyage", "MODEL.IMG_SIZE", "16", "TRAIN.BATCH_SIZE", "16", "TRAIN.WORKERS", "0"]
MULTITASK_RECIPE = ROOT / "configs" / "utkface_multitask.yaml"


def run_args(data, *extra):
    return ["--data_dir", str(data), "--dataset", "utk", "--checkpoint", str(data / "ck"), *QUICK, *extra]


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_help_lists_every_key_the_script_reads_with_its_default_under_the_scripts_own_name(objective):
    script = OBJECTIVES[objective].script
    text = train.build_parser(objective).format_help()
    assert text.startswith(f"usage: {script} ")
    usage = (rf"python {re.escape(script)} --data_dir D --dataset NAME \[--checkpoint DIR\] \[--config FILE\.yaml\]"
             r"[^\n]*\n\s+\[--overwrite\] \[--multi_gpu\] \[--aug\] \[--expand E\] \[--device cpu\|cuda\]")
    assert re.search(usage, text), text[:1000]
    assert objective == "cls" or "python train.py" not in text
    defaults = get_cfg_defaults()
    listed = re.findall(r"^  ([A-Z]+\.[A-Z_0-9]+) (.+?)(?:  \(.*\))?\n {6}\S", text, flags=re.MULTILINE)
    read = [key for key in all_keys(defaults)
            if key.split(".")[0] not in ("LDL", "MT") or key.split(".")[0] in OBJECTIVES[objective].sections]
    assert [key for key, _ in listed] == read, "every key the script reads, in order, each with a meaning below it"
    for key, default in listed:
        assert default == ('""' if config_value(defaults, key) == "" else str(config_value(defaults, key)))
    assert "  TRAIN.LR 0.001  (above 0)\n" in text and "  TRAIN.OPT adam  (one of adam, adamw, sgd)\n" in text


def test_a_recipe_key_the_objective_never_reads_is_refused_naming_it_the_recipe_and_the_script(tmp_path):
    make_split(tmp_path, 8, 4)
    with pytest.raises(SystemExit) as refused:
        train.fit("ldl", run_args(tmp_path, "--config", str(MULTITASK_RECIPE)))
    assert str(refused.value) == (
        f"train-ldl.py does not read MT.GENDER_WEIGHT 3.0 (read by train-mt.py), MT.RACE_WEIGHT 3.0 (read by "
        f"train-mt.py), set by --config {MULTITASK_RECIPE}, and would train without it. Train with the script named, "
        f"or leave the setting out (a key at its default is accepted)")
    assert not (tmp_path / "ck").exists(), "refused before the run folder is made"
    with pytest.raises(SystemExit, match=r"^train\.py does not read LDL\.SIGMA 3\.0 \(read by train-ldl\.py and "
                                         r"train-mt\.py\), set on the command line"):
        train.fit("cls", run_args(tmp_path, "LDL.SIGMA", "3"))


def test_another_objectives_keys_at_their_defaults_pass_and_its_own_script_takes_them(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("MODEL:\n  ARCH: tinyage\nMT:\n  GENDER_WEIGHT: 1.0\n  RACE_WEIGHT: 1\nLDL:\n  SIGMA: 2.0\n")
    for objective in ("cls", "ldl"):
        cfg, _ = config.load_config(train.build_parser(objective).parse_intermixed_args(
            ["--data_dir", ".", "--dataset", "x", "--config", str(recipe)]))
        assert cfg.MODEL.ARCH == "tinyage"
    cfg, _ = config.load_config(train.build_parser("mt").parse_intermixed_args(
        ["--data_dir", ".", "--dataset", "x", "--config", str(MULTITASK_RECIPE)]))
    assert (cfg.MT.GENDER_WEIGHT, cfg.MT.RACE_WEIGHT) == (3.0, 3.0)


def test_a_run_names_its_precision_files_speed_and_time_left(tmp_path, capsys):
    make_split(tmp_path, 32, 8)
    train.fit("ldl", run_args(tmp_path, "TRAIN.EPOCHS", "2"))
    out = capsys.readouterr().out
    ck = tmp_path / "ck"
    assert f"on cpu in {precision_name('auto', torch.device('cpu'))} (TRAIN.AMP auto)\n" in out
    assert (f"run folder {ck}: last.pth, best.pth, {ck / 'history.csv'} and {ck / 'curves.png'} after each epoch; "
            f"crop cache in {ck / 'cache'}\n") in out
    first, last = re.findall(r"^epoch [12]/2: .*$", out, flags=re.MULTILINE)
    assert re.search(r"\| \d+s, \d+ img/s; (\d+m )?\d+s left \(1 epoch\), done about \d\d:\d\d$", first), first
    assert re.search(r"\| \d+s, \d+ img/s$", last), last


def test_an_epoch_at_under_half_the_runs_best_speed_is_warned_about_once(tmp_path, capsys, monkeypatch):
    """Epochs 3 and 4 take four times as long as the slowest before them (as when another process takes the CPU).

    Epoch 2 may warn instead, where this machine is that busy: either way, only once.
    """
    make_split(tmp_path, 32, 8)
    real, seconds = train.train_one_epoch, []

    def slowed(run, epoch, start_step):
        started = time.perf_counter()
        result = real(run, epoch, start_step)
        seconds.append(time.perf_counter() - started)
        if epoch >= 2:
            time.sleep(3 * max(seconds[:2]))
        return result

    monkeypatch.setattr(train, "train_one_epoch", slowed)
    train.fit("ldl", run_args(tmp_path, "TRAIN.EPOCHS", "4"))
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: epoch")]
    assert len(warnings) == 1 and re.fullmatch(
        r"warning: epoch [23] trained at \d+ img/s, \d+% of the \d+ img/s of epoch [12]: another process may be "
        r"competing for this machine's CPU or GPU \(see top or nvidia-smi\)\. The run goes on; this is said once\.",
        warnings[0]), warnings


def test_the_time_left_counts_full_epochs_at_the_last_ones_pace_with_its_validation():
    """A resumed run's partial epoch: 50 of 100 steps in 5 s, and 3 s of validation and checkpoints."""
    pace = RunPace(epochs=10, steps_per_epoch=100, batch_size=32)
    pace.trained(steps=50, seconds=5.0)
    note, warning = pace.epoch_done(epoch=3, seconds=8.0)
    assert note.startswith("320 img/s; 1m 18s left (6 epochs), done about ") and warning is None  # 6 x (10 s + 3 s)
    pace.trained(steps=100, seconds=21.0)
    note, warning = pace.epoch_done(epoch=9, seconds=22.0)
    assert note == "152 img/s" and warning.startswith("warning: epoch 10 trained at 152 img/s, 48% of the 320 img/s of "
                                                      "epoch 4: ")


def test_the_end_of_a_run_on_another_day_names_the_day():
    assert re.fullmatch(r"\d\d:\d\d", clock_time(time.time()))
    assert re.fullmatch(r"[A-Z][a-z]{2} \d\d:\d\d", clock_time(time.time() + 2 * 86400))
