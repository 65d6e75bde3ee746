"""A run's folder and --resume: one run per folder, nothing of a user's lost, bad resumes refused before any work."""
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoint
import files
import run_folder
import train
from checkpoint import CheckpointError, load_state
from files import OutputError
from conftest import ROOT, make_split
from defaults import get_cfg_defaults
from model import build_model
from runtime import EpochSampler
from test_robustness import interrupt_at_step

TINY = ["MODEL.ARCH", "tinyage", "MODEL.IMG_SIZE", "32", "TRAIN.BATCH_SIZE", "32", "TRAIN.WORKERS", "0"]
SHIPPED = ROOT / "weights" / "utkface_multitask.pth"
LOCK_WAIT_S = 120


def run_args(data, folder, *extra):
    return ["--data_dir", str(data), "--dataset", "utk", "--checkpoint", str(folder), *extra]


def history_column(folder, column):
    lines = (folder / "history.csv").read_text().splitlines()
    index = lines[0].split(",").index(column)
    return [float(line.split(",")[index]) for line in lines[1:]]


@pytest.fixture(scope="module")
def one_epoch_runs(tmp_path_factory):
    """Two finished one-epoch runs on 64 real faces: a step schedule at the default LR and a cosine one at 0.003."""
    data = tmp_path_factory.mktemp("runs")
    make_split(data, 64, 16, seed=3)
    train.fit("ldl", run_args(data, data / "step", *TINY, "TRAIN.EPOCHS", "1"))
    train.fit("ldl", run_args(data, data / "cosine", *TINY, "TRAIN.EPOCHS", "1", "TRAIN.SCHEDULER", "cosine", "TRAIN.LR", "0.003"))
    return data


def copy_run(data, name, tmp_path):
    folder = tmp_path / name
    shutil.copytree(data / name, folder)
    return folder


@pytest.mark.parametrize("override, key", [
    (["MODEL.ARCH", "thinage"], "MODEL.ARCH"),
    (["MODEL.IMG_SIZE", "48"], "MODEL.IMG_SIZE"),
    (["--expand", "0.4"], "DATA.EXPAND"),
    (["TRAIN.OPT", "sgd"], "TRAIN.OPT"),
    (["TRAIN.BACKBONE_LR", "0.5"], "TRAIN.BACKBONE_LR"),  # one parameter group saved, two asked for
])
def test_resume_refuses_to_change_the_model_or_its_input(one_epoch_runs, tmp_path, override, key):
    folder = copy_run(one_epoch_runs, "step", tmp_path)
    with pytest.raises(SystemExit, match=rf"{key} cannot change on --resume: .*last.pth was trained with"):
        train.fit("ldl", run_args(one_epoch_runs, folder, "--resume", str(folder / "last.pth"), *override))


def test_resume_puts_a_new_learning_rate_into_the_restored_optimizer(one_epoch_runs, tmp_path, capsys):
    folder = copy_run(one_epoch_runs, "step", tmp_path)
    train.fit("ldl", run_args(one_epoch_runs, folder, "--resume", str(folder / "last.pth"), "TRAIN.EPOCHS", "2", "TRAIN.LR", "0.01"))
    assert "TRAIN.LR 0.001 -> 0.01" in capsys.readouterr().out
    assert history_column(folder, "lr") == [0.001, 0.01]
    group = load_state(folder / "last.pth")["optimizer"]["param_groups"][0]
    assert group["lr"] == group["initial_lr"] == 0.01


def test_resume_with_more_epochs_stretches_the_cosine_schedule(one_epoch_runs, tmp_path):
    folder = copy_run(one_epoch_runs, "cosine", tmp_path)
    train.fit("ldl", run_args(one_epoch_runs, folder, "--resume", str(folder / "last.pth"), "TRAIN.EPOCHS", "4"))
    lr = history_column(folder, "lr")
    assert lr[0] == 0.003
    assert lr[1] == pytest.approx(0.003 * (1 + math.cos(math.pi / 4)) / 2, rel=1e-5), "epoch 2 of 4, not of 1"


def test_resuming_a_finished_run_says_there_is_nothing_to_do(one_epoch_runs, tmp_path, capsys):
    folder = copy_run(one_epoch_runs, "step", tmp_path)
    before = (folder / "last.pth").read_bytes()
    result = train.fit("ldl", run_args(one_epoch_runs, folder, "--resume", str(folder / "last.pth")))
    out = capsys.readouterr().out
    assert "nothing to do" in out and "has finished 1 epochs and TRAIN.EPOCHS is 1" in out and "TRAIN.EPOCHS 11" in out
    assert result["last"] is None
    assert (folder / "last.pth").read_bytes() == before and history_column(folder, "epoch") == [1]


def foreign_weights(one_epoch_runs, tmp_path):
    state = load_state(one_epoch_runs / "step" / "last.pth")
    state["state_dict"] = build_model("thinage").state_dict()
    torch.save(state, tmp_path / "foreign.pth")
    return tmp_path / "foreign.pth", "does not hold a tinyage model of this project: its weights have"


def text_file(_runs, tmp_path):
    (tmp_path / "history.pth").write_text("epoch,lr\n1,0.001\n")
    return tmp_path / "history.pth", "history.pth is not a readable checkpoint"


def shipped_model(_runs, _tmp_path):
    return SHIPPED, "utkface_multitask.pth cannot be resumed: it lacks optimizer, scheduler"


@pytest.mark.parametrize("make", [foreign_weights, text_file, shipped_model])
def test_a_file_that_cannot_be_resumed_is_named_before_any_work(one_epoch_runs, tmp_path, make):
    path, message = make(one_epoch_runs, tmp_path)
    with pytest.raises(CheckpointError, match=message):
        train.fit("ldl", run_args(one_epoch_runs, tmp_path / "new", "--resume", str(path)))
    assert not (tmp_path / "new").exists(), "refused before the folder and its crop cache are made"


class CrashedBetweenWrites(BaseException):
    """Stands for a kill after best.pth was written and before last.pth was."""


def test_a_crash_between_best_and_last_never_lets_a_worse_epoch_replace_best(tmp_path, monkeypatch):
    make_split(tmp_path, 64, 16)
    folder = tmp_path / "ck"
    maes = iter([10.0, 5.0, 7.0])  # epoch 1; epoch 2, crashed after best.pth; epoch 2 again on resume
    score = train.metrics
    monkeypatch.setattr(train, "metrics", lambda pred, ages: {**score(pred, ages), "mae": next(maes)})
    write, writes = checkpoint.atomic_write, []

    def crash_before_the_second_last(path, writer):
        writes.extend([path.name] if path.suffix == ".pth" else [])
        if writes == ["best.pth", "last.pth", "best.pth", "last.pth"]:
            raise CrashedBetweenWrites
        write(path, writer)

    monkeypatch.setattr(checkpoint, "atomic_write", crash_before_the_second_last)
    with pytest.raises(CrashedBetweenWrites):
        train.fit("ldl", run_args(tmp_path, folder, *TINY, "TRAIN.EPOCHS", "2"))
    monkeypatch.setattr(checkpoint, "atomic_write", write)
    best = (folder / "best.pth").read_bytes()
    assert load_state(folder / "best.pth")["best_metric"] == 5.0 and load_state(folder / "last.pth")["epoch"] == 0
    result = train.fit("ldl", run_args(tmp_path, folder, "--resume", str(folder / "last.pth")))
    assert (folder / "best.pth").read_bytes() == best, "epoch 2's redo (MAE 7) does not replace the MAE 5 model"
    assert result["best"] == 5.0


def test_fresh_run_refuses_a_folder_holding_a_run_unless_told_to_overwrite(tmp_path, capsys):
    make_split(tmp_path, 64, 16)
    folder = tmp_path / "ck"
    train.fit("ldl", run_args(tmp_path, folder, *TINY, "TRAIN.EPOCHS", "1"))
    (folder / "notes.txt").write_text("the user's own file")
    kept = {name: (folder / name).read_bytes() for name in ("best.pth", "last.pth", "history.csv")}
    with pytest.raises(SystemExit, match=r"already holds a run \(last.pth, best.pth, history.csv, run_record.json\)"
                                         r".*--resume.*--overwrite"):
        train.fit("ldl", run_args(tmp_path, folder, *TINY, "TRAIN.EPOCHS", "1"))
    assert {name: (folder / name).read_bytes() for name in kept} == kept
    caches = sorted((folder / "cache").iterdir())
    train.fit("ldl", run_args(tmp_path, folder, "--overwrite", *TINY, "TRAIN.EPOCHS", "1", "TRAIN.LR", "0.002"))
    assert history_column(folder, "lr") == [0.002], "the old run's history is replaced, not appended to"
    assert (folder / "notes.txt").read_text() == "the user's own file" and sorted((folder / "cache").iterdir()) == caches


def run_files(folder):
    return {name: (folder / name).read_bytes() for name in run_folder.RUN_FILES}


def test_overwrite_with_resume_of_a_checkpoint_in_that_folder_is_refused_and_the_run_kept(one_epoch_runs, tmp_path):
    folder = copy_run(one_epoch_runs, "step", tmp_path)
    kept = run_files(folder)
    with pytest.raises(SystemExit, match=r"--overwrite would delete the run that --resume .*last.pth continues"):
        train.fit("ldl", run_args(one_epoch_runs, folder, "--overwrite", "--resume", str(folder / "last.pth"),
                                  "TRAIN.EPOCHS", "2"))
    assert run_files(folder) == kept


def test_overwrite_keeps_the_old_run_when_the_new_data_is_refused(one_epoch_runs, tmp_path):
    folder = copy_run(one_epoch_runs, "step", tmp_path)
    kept = run_files(folder)
    data = tmp_path / "data"
    data.mkdir()
    make_split(data, 64, 16, seed=3)
    lines = [line.split(",") for line in (data / "utk_train_align.csv").read_text().splitlines()]
    lines[40][1] = "forty"  # a typo in an age
    (data / "utk_train_align.csv").write_text("\n".join(",".join(line) for line in lines) + "\n")
    with pytest.raises(SystemExit, match=r"utk_train_align.csv, line 41: age 'forty' is not a number"):
        train.fit("ldl", run_args(data, folder, "--overwrite", *TINY, "TRAIN.EPOCHS", "1"))
    assert run_files(folder) == kept


def test_overwrite_from_another_run_does_not_inherit_the_replaced_runs_best_score(one_epoch_runs, tmp_path):
    """The replaced run's best.pth stays until the first save, but its score is not this run's to beat."""
    folder = copy_run(one_epoch_runs, "cosine", tmp_path)
    unbeatable = load_state(folder / "best.pth")
    unbeatable["best_metric"] = 0.0
    torch.save(unbeatable, folder / "best.pth")
    result = train.fit("ldl", run_args(one_epoch_runs, folder, "--overwrite", "--resume",
                                       str(one_epoch_runs / "step" / "last.pth"), "TRAIN.EPOCHS", "2"))
    assert load_state(folder / "best.pth")["best_metric"] == result["best"] > 0.0
    assert history_column(folder, "epoch") == [2], "the replaced run's history is gone"


def epoch_order(faces, epoch=0):
    """The faces of an epoch, in order (a sampler's key modulo the number of faces is the face)."""
    sampler = EpochSampler(faces, seed=get_cfg_defaults().TRAIN.SEED, batch_size=faces)
    sampler.set_epoch(epoch)
    return [key % faces for key in sampler]


def test_a_mid_epoch_resume_with_another_batch_size_skips_the_faces_done_or_is_refused(tmp_path, monkeypatch):
    make_split(tmp_path, 96, 16)
    folder, trained = tmp_path / "ck", []
    interrupt_at_step(monkeypatch, 2, trained)
    with pytest.raises(SystemExit, match="stopped by SIGINT at epoch 1, step 2"):
        train.fit("ldl", run_args(tmp_path, folder, *TINY, "TRAIN.BATCH_SIZE", "16", "TRAIN.EPOCHS", "1"))
    resume = run_args(tmp_path, folder, "--resume", str(folder / "last.pth"))
    with pytest.raises(SystemExit, match=r"after 32 faces, in batches of 16; with TRAIN.BATCH_SIZE 24 the run cannot "
                                         r"continue at the same face"):
        train.fit("ldl", resume + ["TRAIN.BATCH_SIZE", "24"])
    train.fit("ldl", resume + ["TRAIN.BATCH_SIZE", "32"])
    assert [len(batch) for batch in trained] == [16, 16, 32, 32]
    assert sorted(face for batch in trained for face in batch) == sorted(epoch_order(96)), "every face once"


def test_an_epoch_end_checkpoint_resumed_with_a_smaller_batch_starts_the_next_epoch(tmp_path, monkeypatch):
    make_split(tmp_path, 96, 16)
    folder, trained = tmp_path / "ck", []
    train.fit("ldl", run_args(tmp_path, folder, *TINY, "TRAIN.EPOCHS", "1"))
    interrupt_at_step(monkeypatch, 0, trained)
    train.fit("ldl", run_args(tmp_path, folder, "--resume", str(folder / "last.pth"), "TRAIN.BATCH_SIZE", "16",
                              "TRAIN.EPOCHS", "2"))
    assert history_column(folder, "epoch") == [1, 2]
    order = epoch_order(96, epoch=1)
    assert trained == [sorted(order[start:start + 16]) for start in range(0, 96, 16)], "epoch 2's order, in 16s"


def wait_for_lock_holder(folder, process):
    deadline = time.monotonic() + LOCK_WAIT_S
    lock = folder / files.LOCK_NAME
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1][-2000:]
        if lock.is_file() and lock.read_text().strip() == str(process.pid):
            return
        time.sleep(0.2)
    raise AssertionError(f"pid {process.pid} never took {lock}")


def test_a_second_run_in_a_locked_folder_is_refused_naming_the_first(tmp_path):
    make_split(tmp_path, 64, 16)
    folder = tmp_path / "ck"
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1")
    first = subprocess.Popen([sys.executable, str(ROOT / "train-ldl.py"), *run_args(tmp_path, folder, *TINY, "TRAIN.EPOCHS", "1000")],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_lock_holder(folder, first)
        with pytest.raises(OutputError, match=rf"ck is in use by another training run \(pid {first.pid}\)"):
            train.fit("ldl", run_args(tmp_path, folder, "--overwrite", *TINY, "TRAIN.EPOCHS", "1"))
        assert lock_holder(folder) == str(first.pid), "the refused run leaves the holder's lock file alone"
    finally:
        first.kill()
        first.wait()
    assert lock_holder(folder) == str(first.pid), "kill -9 leaves the lock file, but not the lock"
    train.fit("ldl", run_args(tmp_path, folder, "--overwrite", *TINY, "TRAIN.EPOCHS", "1"))
    assert history_column(folder, "epoch") == [1]
    assert lock_holder(folder) is None, "the run that took it over deletes it when it ends"


def lock_holder(folder):
    """The pid the folder's lock file names, or None when there is no lock file."""
    lock = folder / files.LOCK_NAME
    return lock.read_text().strip() if lock.exists() else None


def test_the_lock_file_names_its_holder_and_is_deleted_however_the_block_ends(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with files.folder_lock(tmp_path):
            assert lock_holder(tmp_path) == str(os.getpid())
            with pytest.raises(OutputError, match=rf"in use by another training run \(pid {os.getpid()}\)"):
                with files.folder_lock(tmp_path):
                    pass
            assert lock_holder(tmp_path) == str(os.getpid()), "a refused contender deletes nothing"
            1 / 0
    assert lock_holder(tmp_path) is None
    with files.folder_lock(tmp_path):
        pass
    assert lock_holder(tmp_path) is None


def test_a_run_that_opened_the_lock_file_as_its_holder_ended_locks_the_file_in_the_folder(tmp_path, monkeypatch):
    """The holder deletes the file and then unlocks it; a contender that opened it just before holds a lock on a
    file nobody can find, and must take the folder's own instead, or a third run would get in beside it."""
    holder = files.folder_lock(tmp_path)
    holder.__enter__()
    flock = files.fcntl.flock

    def holder_ends_first(handle, operation):
        holder.__exit__(None, None, None)
        monkeypatch.setattr(files.fcntl, "flock", flock)
        return flock(handle, operation)

    monkeypatch.setattr(files.fcntl, "flock", holder_ends_first)
    with files.folder_lock(tmp_path):
        assert lock_holder(tmp_path) == str(os.getpid())
        with pytest.raises(OutputError, match="in use by another training run"):
            with files.folder_lock(tmp_path):
                pass
    assert lock_holder(tmp_path) is None


def test_a_run_refused_by_its_checks_stopped_by_a_signal_or_finished_leaves_no_lock_file(tmp_path, monkeypatch):
    make_split(tmp_path, 64, 16)
    folder = tmp_path / "ck"
    load_data = train.load_data

    def terminated_while_loading(*args):
        os.kill(os.getpid(), signal.SIGTERM)
        return load_data(*args)

    monkeypatch.setattr(train, "load_data", terminated_while_loading)
    ignored = []

    def caller_handler(*_):
        """Where the run would miss the signal, the test fails instead of dying of it."""
        ignored.append(True)

    previous = signal.signal(signal.SIGTERM, caller_handler)
    try:
        with pytest.raises(SystemExit, match="SIGTERM received before the first training step"):
            train.fit("ldl", run_args(tmp_path, folder, *TINY, "TRAIN.EPOCHS", "1"))
        assert not ignored and signal.getsignal(signal.SIGTERM) is caller_handler, "the caller's handler is back"
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert lock_holder(folder) is None
    monkeypatch.setattr(train, "load_data", load_data)
    interrupt_at_step(monkeypatch, 1, [])
    with pytest.raises(SystemExit, match="stopped by SIGINT at epoch 1, step 1"):
        train.fit("ldl", run_args(tmp_path, folder, *TINY, "TRAIN.EPOCHS", "1"))
    assert lock_holder(folder) is None
    with pytest.raises(SystemExit, match="already holds a run"):
        train.fit("ldl", run_args(tmp_path, folder, *TINY, "TRAIN.EPOCHS", "1"))
    assert lock_holder(folder) is None


def refuse_to_read_data(*_args, **_kwargs):
    raise AssertionError("the data was read before the checkpoint folder was checked")


def test_checkpoint_folder_that_cannot_be_written_fails_before_any_data_is_read(tmp_path, monkeypatch):
    make_split(tmp_path, 64, 16)
    (tmp_path / "a_file").write_text("not a folder")
    monkeypatch.setattr(train, "load_data", refuse_to_read_data)
    no_cache = [*TINY, "DATA.CACHE", "False", "TRAIN.EPOCHS", "1"]  # nothing written until the first epoch's end
    with pytest.raises(OutputError, match="--checkpoint .*a_file is a file, not a folder"):
        train.fit("ldl", run_args(tmp_path, tmp_path / "a_file", *no_cache))
    with pytest.raises(OutputError, match="--checkpoint .*a_file/ck cannot be written to"):
        train.fit("ldl", run_args(tmp_path, tmp_path / "a_file" / "ck", *no_cache))  # fails for root too
    assert (tmp_path / "a_file").read_text() == "not a folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a chmod 555 folder; the path under a file above covers root")
def test_read_only_checkpoint_folder_fails_before_any_data_is_read(tmp_path, monkeypatch):
    make_split(tmp_path, 64, 16)
    (tmp_path / "ro").mkdir(mode=0o555)
    monkeypatch.setattr(train, "load_data", refuse_to_read_data)
    with pytest.raises(OutputError, match="ro cannot be written to"):
        train.fit("ldl", run_args(tmp_path, tmp_path / "ro", *TINY, "DATA.CACHE", "False"))
