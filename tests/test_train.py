"""The one training loop, through its three entry points, on real UTKFace faces."""
import contextlib
import csv
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import config
import objectives
import optimization
import precise_bn
import records
import scoring
import train
import training_data
from conftest import ROOT, make_split, utkface_files, write_csv
from normalize import normalize
from geometry import aligned_crop, read_rgb
from defaults import NUM_ETHNICITIES, cfg_to_dict, get_cfg_defaults, merge_opts
from records import UNKNOWN
from runtime import EpochSampler, Runtime

QUICK = ["MODEL.ARCH", "tinyage", "MODEL.IMG_SIZE", "32", "TRAIN.BATCH_SIZE", "32", "TRAIN.WORKERS", "0"]


def history(checkpoint):
    with open(checkpoint / "history.csv") as handle:
        return list(csv.DictReader(handle))


def test_ldl_learns_well_below_the_mean_predictor(trained_ldl):
    train_ages = np.array([min(r[1], 100) for r in trained_ldl["train"]])
    valid_ages = np.array([min(r[1], 100) for r in trained_ldl["valid"]])
    mean_predictor = np.abs(train_ages.mean() - valid_ages).mean()
    best = trained_ldl["result"]["best"]
    assert best < 0.8 * mean_predictor, f"valid MAE {best:.2f} against {mean_predictor:.2f} for predicting the mean"
    rows = history(trained_ldl["checkpoint"])
    assert [int(r["epoch"]) for r in rows] == list(range(1, 11))
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])


def test_checkpoint_is_a_plain_dict_that_rebuilds_the_model(trained_ldl):
    state = torch.load(trained_ldl["checkpoint"] / "best.pth", weights_only=True)
    assert state["objective"] == "ldl" and state["arch"] == "tinyage" and state["img_size"] == 48
    assert state["config"]["MODEL"]["ARCH"] == "tinyage"
    for key in ("optimizer", "scheduler", "epoch", "best_metric", "rng"):
        assert key in state
    assert (trained_ldl["checkpoint"] / "last.pth").is_file()


@pytest.mark.parametrize("objective", ["cls", "mt"])
def test_classification_and_multitask_train_validate_save_and_resume(tmp_path, objective):
    make_split(tmp_path, 160, 40)
    checkpoint = tmp_path / "ck"
    base = ["--data_dir", str(tmp_path), "--dataset", "utk", "--checkpoint", str(checkpoint)]
    lr = ["TRAIN.LR", "0.01", "TRAIN.LR_DECAY_STEP", "1", "TRAIN.LR_DECAY_RATE", "0.5"]
    train.fit(objective, base + QUICK + lr + ["TRAIN.EPOCHS", "2"])
    state = torch.load(checkpoint / "last.pth", weights_only=True)
    assert state["objective"] == objective and state["epoch"] == 1
    if objective == "mt":
        assert {"gender.weight", "race.weight"} <= set(state["state_dict"])
    train.fit(objective, base + ["--resume", str(checkpoint / "last.pth"), "TRAIN.EPOCHS", "3"])
    rows = history(checkpoint)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert [float(r["lr"]) for r in rows] == pytest.approx([0.01, 0.005, 0.0025]), "the rate each epoch trained with"


def test_resume_refuses_another_objective(tmp_path):
    make_split(tmp_path, 64, 16)
    base = ["--data_dir", str(tmp_path), "--dataset", "utk", "--checkpoint", str(tmp_path / "ck")]
    train.fit("cls", base + QUICK + ["TRAIN.EPOCHS", "1"])
    with pytest.raises(SystemExit, match="trained with the 'cls' objective"):
        train.fit("ldl", base + ["--resume", str(tmp_path / "ck" / "last.pth")])


def test_best_epoch_rule():
    assert scoring.best_rule("megaage_asian")[0] == "ca3"
    assert scoring.best_rule("morph")[0] == "mae"
    assert scoring.is_better(4.0, 5.0, scoring.best_rule("morph"))
    assert scoring.is_better(0.6, 0.5, scoring.best_rule("megaage"))
    assert not scoring.is_better(5.0, 5.0, scoring.best_rule("morph"))


@pytest.mark.parametrize("script", ["train.py", "train-ldl.py", "train-mt.py"])
def test_help_documents_every_flag(script):
    text = subprocess.run([sys.executable, str(ROOT / script), "-h"], capture_output=True, text=True, check=True).stdout
    for flag in ("--data_dir", "--dataset", "--checkpoint", "--resume", "--overwrite", "--multi_gpu", "--aug", "--expand",
                 "KEY VALUE"):
        assert flag in text


def test_bad_config_value_is_a_clear_error(tmp_path):
    make_split(tmp_path, 8, 4)
    with pytest.raises(SystemExit, match="TRAIN.OPT must be one of adam, adamw, sgd, not 'lamb'; the default is TRAIN.OPT adam"):
        train.fit("ldl", ["--data_dir", str(tmp_path), "--dataset", "utk", "TRAIN.OPT", "lamb"])


def step_with_zero_gradient(opt, lr, decay):
    cfg = merge_opts(get_cfg_defaults(), ["TRAIN.OPT", opt, "TRAIN.LR", str(lr), "TRAIN.WEIGHT_DECAY", str(decay)])
    layer = torch.nn.Linear(4, 4)
    before = layer.weight.detach().clone()
    optimizer = optimization.build_optimizer(layer, cfg)
    for parameter in layer.parameters():
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    return before, layer.weight.detach()


def test_adamw_decay_is_decoupled_from_the_gradient():
    """AdamW shrinks each weight by lr * decay whatever the gradient; Adam's L2 goes through its normalised step."""
    lr, decay = 0.002, 0.1
    before, after = step_with_zero_gradient("adamw", lr, decay)
    torch.testing.assert_close(after, before * (1 - lr * decay))
    before, after = step_with_zero_gradient("adam", lr, decay)
    torch.testing.assert_close(after, before - lr * torch.sign(before))


class Labels:
    """The columns of a training CSV that sampling weights read (Records without the photos)."""

    def __init__(self, ages, ethnicity):
        self.age, self.ethnicity = np.asarray(ages), np.asarray(ethnicity)


def utkface_labels():
    rows = utkface_files()
    return Labels([min(age, 100) for _, age, _, _ in rows], [ethnicity for _, _, _, ethnicity in rows])


def test_balanced_sampling_evens_out_age_bins_on_real_labels():
    """UTKFace's ages are far from uniform; with TRAIN.BALANCE 1 every 5-year bin is drawn about equally often."""
    labels = utkface_labels()
    bins = labels.age // 5
    natural = np.bincount(bins) / len(bins)
    cfg = merge_opts(get_cfg_defaults(), ["TRAIN.BALANCE", "1.0"])
    sampler = EpochSampler(len(bins), seed=1, batch_size=64, weights=training_data.sampling_weights(labels, cfg))
    sampler.set_epoch(0)
    drawn = np.bincount(bins[np.array(list(sampler)) % len(bins)], minlength=len(natural)) / len(sampler)
    present = natural > 0
    assert natural[present].max() / natural[present].min() > 50, "the data set itself is unbalanced"
    assert drawn[present].max() / drawn[present].min() < 1.5
    assert training_data.sampling_weights(labels, get_cfg_defaults()) is None, "BALANCE 0 keeps the plain shuffle"


def test_ethnicity_balance_gives_every_ethnicity_the_whole_sets_age_mix_on_real_labels():
    """UTKFace's Asian faces are mostly young (14% of them over 40, against 28% of all faces): with
    TRAIN.BALANCE_RACE 1 each (age bin, ethnicity) cell weighs what it would if age and ethnicity were independent,
    so no ethnicity tells the model an age; with TRAIN.BALANCE as well, each ethnicity's age mix is the balanced one."""
    labels = utkface_labels()
    bins, groups = labels.age // 5, labels.ethnicity
    asian, old = groups == 2, labels.age > 40
    assert old[asian].mean() < 0.6 * old.mean(), "the data set itself ties age to ethnicity"
    weights = training_data.sampling_weights(labels, merge_opts(get_cfg_defaults(), ["TRAIN.BALANCE_RACE", "1.0"]))
    cells = np.zeros((bins.max() + 1, NUM_ETHNICITIES))
    np.add.at(cells, (bins, groups), weights)
    independent = np.outer(np.bincount(bins), np.bincount(groups, minlength=NUM_ETHNICITIES)) / len(bins)
    np.testing.assert_allclose(cells, np.where(cells > 0, independent, 0))
    both = merge_opts(get_cfg_defaults(), ["TRAIN.BALANCE", "0.5", "TRAIN.BALANCE_RACE", "1.0"])
    weights = training_data.sampling_weights(labels, both)
    shares = [weights[old & (groups == g)].sum() / weights[groups == g].sum() for g in range(NUM_ETHNICITIES)]
    assert max(shares) - min(shares) < 0.05, shares


def test_ethnicity_balance_leaves_faces_of_unknown_ethnicity_at_their_age_weight():
    ages, ethnicity = np.array([20, 20, 20, 70, 70, 70]), np.array([0, 0, 1, 0, 1, UNKNOWN])
    ratio = records.ethnicity_age_mix_ratio(ages, ethnicity, 5)
    # 5 known faces: (20, white) holds 2, independence gives 3 * 3 / 5; (20, black) 1 against 3 * 2 / 5
    np.testing.assert_allclose(ratio, [0.9, 0.9, 1.2, 2 * 3 / 5, 2 * 2 / 5, 1.0])


def test_ethnicity_balance_on_a_csv_without_race_is_refused_before_the_caches(tmp_path):
    rows = utkface_files()[:80]
    write_csv(tmp_path / "utk_train_align.csv", rows[:64], attributes=False)
    write_csv(tmp_path / "utk_valid_align.csv", rows[64:], attributes=False)
    with pytest.raises(SystemExit, match=re.escape(f"{tmp_path / 'utk_train_align.csv'} has no race labels, and "
                                                   f"TRAIN.BALANCE_RACE 1.0 evens out")):
        train.fit("ldl", tiny_run(tmp_path, tmp_path / "ck", "TRAIN.BALANCE_RACE", "1"))
    assert not (tmp_path / "ck" / "cache").exists()


def test_checkpoint_records_the_precision_and_resume_may_change_it(tmp_path):
    make_split(tmp_path, 64, 16)
    checkpoint = tmp_path / "ck"
    base = ["--data_dir", str(tmp_path), "--dataset", "utk", "--checkpoint", str(checkpoint)]
    train.fit("ldl", base + QUICK + ["TRAIN.EPOCHS", "1", "TRAIN.AMP", "bf16"])
    assert torch.load(checkpoint / "last.pth", weights_only=True)["amp"] == "bf16"
    train.fit("ldl", base + ["--resume", str(checkpoint / "last.pth"), "TRAIN.EPOCHS", "2", "TRAIN.AMP", "off"])
    state = torch.load(checkpoint / "last.pth", weights_only=True)
    assert state["amp"] == "off" and state["epoch"] == 1


def test_ema_weights_are_validated_shipped_and_resumed_exactly(tmp_path):
    make_split(tmp_path, 96, 16)
    ema = QUICK + ["TRAIN.EMA", "0.9", "TRAIN.DETERMINISTIC", "True", "TRAIN.AUG", "True", "TRAIN.LR", "0.01"]

    def run(name, *extra):
        return train.fit("ldl", ["--data_dir", str(tmp_path), "--dataset", "utk", "--checkpoint", str(tmp_path / name),
                                 *extra])

    run("straight", *ema, "TRAIN.EPOCHS", "2")
    run("resumed", *ema, "TRAIN.EPOCHS", "1")
    run("resumed", "--resume", str(tmp_path / "resumed" / "last.pth"), "TRAIN.EPOCHS", "2")
    straight = torch.load(tmp_path / "straight" / "last.pth", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "last.pth", weights_only=True)
    assert straight["ema_updates"] == resumed["ema_updates"] == 2 * 3
    for key in ("state_dict", "train_state_dict"):
        for name, value in straight[key].items():
            assert torch.equal(value, resumed[key][name]), f"{key} {name}"
    averaged, trained = straight["state_dict"], straight["train_state_dict"]
    assert not all(torch.equal(averaged[k], trained[k]) for k in averaged), "the shipped weights are the average"
    report = __import__("val").main(["--data_dir", str(tmp_path), "--dataset", "utk", "--resume",
                                     str(tmp_path / "straight" / "last.pth"), "--output_dir", str(tmp_path / "r")])
    assert report["mae"] == pytest.approx(straight["metrics"]["mae"], abs=1e-3)


def tiny_run(data, checkpoint, *extra):
    return ["--data_dir", str(data), "--dataset", "utk", "--checkpoint", str(checkpoint), *QUICK, *extra]


def test_history_logs_the_learning_rate_each_epoch_trained_with(tmp_path):
    make_split(tmp_path, 64, 16)
    train.fit("ldl", tiny_run(tmp_path, tmp_path / "ck", "TRAIN.SCHEDULER", "cosine", "TRAIN.LR", "0.003", "TRAIN.EPOCHS", "2"))
    rows = history(tmp_path / "ck")
    assert float(rows[0]["lr"]) == 0.003, "the first epoch trains at TRAIN.LR"
    assert float(rows[1]["lr"]) == pytest.approx(0.0015), "half way down the cosine"


class ScoringFailed(Exception):
    pass


def test_fit_gives_back_the_signal_handlers_it_installs(tmp_path, monkeypatch):
    make_split(tmp_path, 64, 16)

    def callers_handler(_signum, _frame):
        pass

    previous = {sig: signal.signal(sig, callers_handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        train.fit("ldl", tiny_run(tmp_path, tmp_path / "ck", "TRAIN.EPOCHS", "1"))
        assert all(signal.getsignal(sig) is callers_handler for sig in previous), "after a run that ends"

        def failing_score(*_args, **_kwargs):
            raise ScoringFailed

        monkeypatch.setattr(train, "score_model", failing_score)
        with pytest.raises(ScoringFailed):
            train.fit("ldl", tiny_run(tmp_path, tmp_path / "ck2", "TRAIN.EPOCHS", "1"))
        assert all(signal.getsignal(sig) is callers_handler for sig in previous), "after a run that fails"
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_empty_validation_csv_is_refused_before_the_caches(tmp_path):
    make_split(tmp_path, 64, 16)
    valid = tmp_path / "utk_valid_align.csv"
    valid.write_text("photo,age,deg,box1,box2,box3,box4\n")
    with pytest.raises(SystemExit, match=rf"{re.escape(str(valid))} has no rows"):
        train.fit("ldl", tiny_run(tmp_path, tmp_path / "ck"))
    assert not (tmp_path / "ck" / "cache").exists()


@pytest.mark.parametrize("key, value, message", [
    ("TRAIN.BATCH_SIZE", "0", "TRAIN.BATCH_SIZE must be above 0, not 0; the default is TRAIN.BATCH_SIZE 128"),
    ("TRAIN.BATCH_SIZE", "-1", "TRAIN.BATCH_SIZE must be above 0, not -1"),
    ("TRAIN.EPOCHS", "0", "TRAIN.EPOCHS must be above 0, not 0"),
    ("TEST.BATCH_SIZE", "0", "TEST.BATCH_SIZE must be above 0, not 0"),
    ("TRAIN.LR", "-1.0", "TRAIN.LR must be above 0, not -1.0"),
    ("TRAIN.LR", "0", "TRAIN.LR must be above 0, not 0.0"),
    ("LDL.SIGMA", "0", "LDL.SIGMA must be above 0, not 0.0"),
    ("TRAIN.WEIGHT_DECAY", "-0.1", "TRAIN.WEIGHT_DECAY must be at least 0, not -0.1"),
    ("MODEL.IMG_SIZE", "0", "MODEL.IMG_SIZE 0 is too small for tinyage: the smallest crop it takes is 16 px"),
    ("MODEL.IMG_SIZE", "7", "MODEL.IMG_SIZE 7 is too small for tinyage: the smallest crop it takes is 16 px"),
    ("MODEL.ARCH", "resnet9000", "unknown MODEL.ARCH 'resnet9000'"),
])
def test_bad_config_values_are_refused_before_any_data_is_read(tmp_path, key, value, message):
    make_split(tmp_path, 8, 4)
    with pytest.raises(SystemExit, match=re.escape(message)):
        train.fit("ldl", tiny_run(tmp_path, tmp_path / "ck", key, value))
    assert not (tmp_path / "ck").exists(), "refused before the checkpoint folder and its crop cache are made"


@pytest.mark.parametrize("overrides, message", [
    (["TRAIN.AGE_BIN", "0"], "TRAIN.AGE_BIN must be above 0, not 0"),  # a division by zero
    (["TRAIN.BALANCE", "-0.5"], "TRAIN.BALANCE must be at least 0, not -0.5"),  # common ages drawn most
    (["TRAIN.BALANCE_RACE", "-1"], "TRAIN.BALANCE_RACE must be at least 0, not -1"),  # an ethnicity's usual age
    (["--aug", "AUG.BLUR_P", "0.2", "AUG.BLUR_SIGMA", "0"], "AUG.BLUR_SIGMA must be above 0"),  # NaN kernels
    (["--aug", "AUG.SCALE", "1"], "AUG.SCALE must be at least 0 and below 1, not 1.0"),  # zoom by 0
    (["TRAIN.SEED", "-1"], "TRAIN.SEED must be between 0 and 4294967295, not -1"),  # NumPy refuses it
])
def test_values_that_cannot_work_are_refused_before_any_data_is_read(tmp_path, overrides, message):
    make_split(tmp_path, 8, 4)
    with pytest.raises(SystemExit, match=re.escape(message)):
        train.fit("ldl", tiny_run(tmp_path, tmp_path / "ck", "TRAIN.EPOCHS", "1", *overrides))
    assert not (tmp_path / "ck").exists()


def test_an_integer_learning_rate_is_accepted(tmp_path):
    cfg, _ = config.load_config(train.build_parser("ldl").parse_args(["--data_dir", ".", "--dataset", "x", "TRAIN.LR", "1"]))
    assert cfg.TRAIN.LR == 1.0


def test_pretrainedmodels_arch_from_random_init_is_warned_once_with_the_fix(capsys):
    cpu = Runtime(torch.device("cpu"))
    for overrides, warned in ((["MODEL.ARCH", "resnet18"], True), (["MODEL.ARCH", "resnet18", "MODEL.PRETRAINED", "w.pth"], False),
                              (["MODEL.ARCH", "tinyage"], False)):
        train.warn_random_init(merge_opts(get_cfg_defaults(), overrides), None, cpu)
        assert ("starts from random weights" in capsys.readouterr().err) == warned, overrides
    train.warn_random_init(merge_opts(get_cfg_defaults(), ["MODEL.ARCH", "resnet18"]), {"resumed": True}, cpu)
    assert capsys.readouterr().err == "", "a resumed run's weights come from its checkpoint"


def run_script(*args):
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1")
    return subprocess.run([sys.executable, str(ROOT / "train-ldl.py"), *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_refusals_end_with_a_message_and_no_traceback(tmp_path):
    make_split(tmp_path, 64, 16)
    train.fit("ldl", tiny_run(tmp_path, tmp_path / "ck", "TRAIN.EPOCHS", "1"))
    other_arch = run_script(*tiny_run(tmp_path, tmp_path / "ck", "--resume", str(tmp_path / "ck" / "last.pth"),
                                      "MODEL.ARCH", "thinage"))
    (tmp_path / "utk_valid_align.csv").write_text("photo,age,deg,box1,box2,box3,box4\n")
    empty_valid = run_script(*tiny_run(tmp_path, tmp_path / "ck2"))
    for done, message in ((other_arch, "MODEL.ARCH cannot change on --resume"), (empty_valid, "utk_valid_align.csv has no rows")):
        assert done.returncode == 1 and message in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]


def test_shipping_an_ema_run_can_take_its_raw_weights(tmp_path):
    from ship import half_precision_copy

    make_split(tmp_path, 64, 16)
    train.fit("ldl", ["--data_dir", str(tmp_path), "--dataset", "utk", "--checkpoint", str(tmp_path / "ck"), *QUICK,
                      "TRAIN.EPOCHS", "1", "TRAIN.EMA", "0.9"])
    source = torch.load(tmp_path / "ck" / "last.pth", weights_only=True)
    for raw, key in ((False, "state_dict"), (True, "train_state_dict")):
        half_precision_copy(tmp_path / "ck" / "last.pth", tmp_path / "ship.pth", raw_weights=raw)
        shipped = torch.load(tmp_path / "ship.pth", weights_only=True)
        assert "train_state_dict" not in shipped and "optimizer" not in shipped
        for name, value in source[key].items():
            learned = not name.endswith(("running_mean", "running_var", "num_batches_tracked"))
            assert torch.equal(shipped["state_dict"][name], value.half() if learned else value), name


# bninception is fed BGR pixels in 0..255; its first BatchNorm's running variance, from a first layer scaled by this
# gain (as an ImageNet-trained one scales them), passes fp16's largest number
BNINCEPTION_FIRST_LAYER_GAIN = 10.0


def bninception_checkpoint(path, faces):
    """A bninception training checkpoint at its smallest input size: random weights, and BatchNorm statistics of
    real faces (the cumulative average over one batch in training mode), saved as the training loop saves."""
    from model import build_model, input_settings, min_input_size

    size = min_input_size("bninception")
    torch.manual_seed(0)
    model = build_model("bninception")
    with torch.no_grad():
        model.backbone.conv1_7x7_s2.weight.mul_(BNINCEPTION_FIRST_LAYER_GAIN)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.momentum = None
        model.train()(normalize(torch.from_numpy(faces).permute(0, 3, 1, 2), input_settings("bninception")))
    cfg = merge_opts(get_cfg_defaults(), ["MODEL.ARCH", "bninception", "MODEL.IMG_SIZE", str(size)])
    torch.save({"state_dict": model.state_dict(), "objective": "ldl", "config": cfg_to_dict(cfg), "arch": "bninception",
                "img_size": size, "expand": 0.0, "input": input_settings("bninception")}, path)
    return model.backbone.conv1_7x7_s2_bn.running_var


def test_a_shipped_bninception_keeps_fp32_batchnorm_statistics_and_predicts_finite_ages(tmp_path):
    from ship import main as ship
    from estimator import AgeEstimator
    from geometry import aligned_crop, read_rgb
    from model import min_input_size

    size = min_input_size("bninception")
    faces = np.stack([aligned_crop(read_rgb(file), 0.0, (0, 0, 200, 200), 0.0, size) for file, *_ in utkface_files()[:2]])
    running_var = bninception_checkpoint(tmp_path / "trained.pth", faces)
    assert running_var.max() > torch.finfo(torch.float16).max, "the statistics of 0..255 inputs do not fit in fp16"
    ship([str(tmp_path / "trained.pth"), str(tmp_path / "shipped.pth")])
    ages = {name: [face["age"] for face in AgeEstimator.from_checkpoint(tmp_path / name, device="cpu", amp="off")
                   .predict_aligned(faces)] for name in ("trained.pth", "shipped.pth")}
    assert np.isfinite(ages["shipped.pth"]).all(), ages
    np.testing.assert_allclose(ages["shipped.pth"], ages["trained.pth"], atol=0.5)
    shipped = torch.load(tmp_path / "shipped.pth", weights_only=True)["state_dict"]
    assert shipped["backbone.conv1_7x7_s2.weight"].dtype == torch.float16, "the weights are halved"


class OpCounter(TorchDispatchMode):
    """Counts the calls of some aten ops while it is active."""

    def __init__(self, ops):
        super().__init__()
        self.ops = ops
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in self.ops
        return func(*args, **(kwargs or {}))


# ops after which a GPU's host waits for the device: a value read back (.item(), bool(), float()), or a result whose
# size depends on the values (nonzero, a boolean mask)
WAITING_OPS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
               torch.ops.aten.masked_select.default}
# torch.tensor(host numbers): on a GPU, a copy that the host waits for
FROM_HOST_NUMBERS = {torch.ops.aten.lift_fresh.default}


def test_training_steps_never_wait_for_the_device(tmp_path, monkeypatch):
    """A value read back every step would serialise a GPU's loop: the sums are read at the check-ins only (every
    LOG_EVERY_STEPS steps and at the epoch's end), by one copy, and a step reads nothing back. Fixed numbers
    (normalisation, colour matrices) become tensors once, not every step; what a step does build from host numbers is
    the augmentation's draws, copied from pinned memory without waiting (augment.host_to_device). On a CPU the same
    ops are counted."""
    counts = {"epoch": [], "steps": [], "made": []}
    train_one_epoch, train_step = train.train_one_epoch, train.train_step

    def counted(names_and_ops, function):
        def run(*args, **kwargs):
            with contextlib.ExitStack() as stack:
                counters = [stack.enter_context(OpCounter(ops)) for _, ops in names_and_ops]
                result = function(*args, **kwargs)
            for (name, _), counter in zip(names_and_ops, counters):
                counts[name].append(counter.count)
            return result
        return run

    monkeypatch.setattr(train, "train_one_epoch", counted([("epoch", WAITING_OPS)], train_one_epoch))
    monkeypatch.setattr(train, "train_step", counted([("steps", WAITING_OPS), ("made", FROM_HOST_NUMBERS)], train_step))
    make_split(tmp_path, 64, 16)
    augmented = ["TRAIN.AUG", "True", "AUG.GAMMA_P", "0.5", "AUG.BLUR_P", "0.5", "AUG.JPEG_P", "0.5"]
    # SGD: Adam reads its step count every step, from a tensor that stays on the host on a GPU too
    train.fit("ldl", tiny_run(tmp_path, tmp_path / "aug", "TRAIN.EPOCHS", "1", "TRAIN.OPT", "sgd", "TRAIN.EMA", "0.9",
                              *augmented))
    assert counts["epoch"] == [0] and counts["steps"] == [0, 0]
    counts.update(epoch=[], steps=[], made=[])
    train.fit("ldl", tiny_run(tmp_path, tmp_path / "plain", "TRAIN.EPOCHS", "1", "TRAIN.OPT", "sgd"))
    assert counts["steps"] == [0, 0] and counts["made"][1] == 0, "the second step makes no tensor from host numbers"


def batchnorm_inputs(model, batches):
    """Everything each BatchNorm layer of ``model`` (in training mode) is fed over ``batches``, by layer name."""
    fed = {}
    def record(name):
        return lambda _layer, inputs: fed.setdefault(name, []).append(inputs[0])

    hooks = [layer.register_forward_pre_hook(record(name))
             for name, layer in model.named_modules() if isinstance(layer, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for images in batches:
            model.train()(images)
    for hook in hooks:
        hook.remove()
    return {name: torch.cat(parts) for name, parts in fed.items()}


def training_crops(data, size):
    from model import input_settings
    from records import Records

    records = Records(data / "utk_train_align.csv", data)
    crops = np.stack([aligned_crop(read_rgb(file), deg, box, 0.0, size)
                      for file, deg, box in zip(records.files, records.deg, records.boxes)])
    return normalize(torch.from_numpy(crops).permute(0, 3, 1, 2), input_settings("tinyage"))


@pytest.mark.parametrize("ema", ["0.9", "0"])
def test_scored_weights_are_saved_with_the_statistics_of_every_face_their_batchnorm_is_fed(tmp_path, ema):
    """The saved statistics are the mean and (unbiased) variance of everything each BatchNorm layer of the saved
    weights is fed over all the training crops (here all 96, fewer than precise_bn.BN_STATISTICS_FACES), each face
    counting once although batches of 20 leave a last batch of 16: not, under TRAIN.EMA, the average of the raw
    weights' running statistics, and not, without it, running statistics that trail weights still moving. The first
    layer's input does not depend on how the faces are batched: its statistics are those of all faces at once."""
    from model import build_model

    make_split(tmp_path, 96, 16)
    train.fit("ldl", tiny_run(tmp_path, tmp_path / "ck", "TRAIN.EMA", ema, "TRAIN.EPOCHS", "1", "TRAIN.LR", "0.01",
                              "TRAIN.AMP", "off", "TRAIN.BATCH_SIZE", "20"))
    saved = torch.load(tmp_path / "ck" / "last.pth", weights_only=True)["state_dict"]
    model = build_model("tinyage")
    model.load_state_dict(saved)
    images = training_crops(tmp_path, 32)
    fed = batchnorm_inputs(model, images.split(20))
    first = next(iter(fed))
    fed_at_once = batchnorm_inputs(model, [images])[first]
    for name, inputs in [*fed.items(), (first, fed_at_once)]:
        variance, mean = torch.var_mean(inputs, dim=(0, 2, 3))
        torch.testing.assert_close(saved[f"{name}.running_mean"], mean, rtol=1e-4, atol=1e-5, msg=name)
        torch.testing.assert_close(saved[f"{name}.running_var"], variance, rtol=1e-4, atol=1e-5, msg=name)


def test_statistics_crops_come_in_batches_of_one_ranks_share_and_never_one_face_alone(tmp_path):
    """Every rank reads all the statistics crops: in its own share of TRAIN.BATCH_SIZE (16 over 4 processes: 4),
    which its memory holds, not in the global batch. A last face left alone joins the batch before it."""
    from crop_cache import build_crop_cache
    from records import Records

    make_split(tmp_path, 17, 4)
    records = Records(tmp_path / "utk_train_align.csv", tmp_path)
    crops = build_crop_cache(records, 16, 0.0, tmp_path / "cache", 0, "utk_train")
    cfg = merge_opts(get_cfg_defaults(), QUICK + ["MODEL.IMG_SIZE", "16", "TRAIN.BATCH_SIZE", "16"])
    share = training_data.rank_batch_size(cfg, Runtime(torch.device("cpu"), world_size=4))
    statistics_crops = precise_bn.StatisticsCrops(records, crops, cfg, share)
    batches = list(statistics_crops)
    assert [len(batch) for batch in batches] == [4, 4, 4, 5]
    assert torch.equal(torch.cat(batches), torch.from_numpy(np.array(crops)).permute(0, 3, 1, 2)), "each face once"


def test_training_with_a_batch_of_3_on_10_faces_at_16_px_finishes(tmp_path):
    """TinyAgeNet's last stage sees 1x1 maps at 16 px: the statistics crops (all 10 faces) must never make a one-face
    batch, which BatchNorm in training mode refuses ('Expected more than 1 value per channel')."""
    make_split(tmp_path, 10, 4)
    result = train.fit("ldl", tiny_run(tmp_path, tmp_path / "ck", "MODEL.IMG_SIZE", "16", "TRAIN.BATCH_SIZE", "3",
                                       "TRAIN.EPOCHS", "1"))
    assert result["last"] is not None and history(tmp_path / "ck")[0]["epoch"] == "1"


def test_the_age_loss_is_weighted_by_the_training_csvs_ages(tmp_path, monkeypatch):
    """LDL.BALANCE's weights come from the training CSV's ages, and they change what the loop minimises: at learning
    rate 1e-9 (no learning to speak of) the same batches of the same model give another mean loss
    (LDL.SIGMA_PER_YEAR rides along)."""
    train_rows, _ = make_split(tmp_path, 64, 16)
    seen = []
    original = objectives.LabelDistributionObjective.see_training_ages
    monkeypatch.setattr(objectives.LabelDistributionObjective, "see_training_ages",
                        lambda self, ages: (seen.append(list(ages)), original(self, ages))[1])
    frozen = ["TRAIN.EPOCHS", "1", "TRAIN.LR", "1e-9", "TRAIN.DETERMINISTIC", "True"]
    train.fit("ldl", tiny_run(tmp_path, tmp_path / "plain", *frozen))
    train.fit("ldl", tiny_run(tmp_path, tmp_path / "weighted", *frozen, "LDL.BALANCE", "1", "LDL.SIGMA_PER_YEAR", "0.05"))
    assert seen == 2 * [[min(age, 100) for _, age, _, _ in train_rows]]
    plain, weighted = float(history(tmp_path / "plain")[0]["train_loss"]), float(history(tmp_path / "weighted")[0]["train_loss"])
    assert np.isfinite(weighted) and weighted != pytest.approx(plain, rel=1e-3)
    saved = torch.load(tmp_path / "weighted" / "last.pth", weights_only=True)["config"]["LDL"]
    assert saved["BALANCE"] == 1.0 and saved["SIGMA_PER_YEAR"] == 0.05
