"""Crashes, signals, corrupt files and numerical faults never cost more than the epoch in progress."""
import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import files
import model
import train
from checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from conftest import ROOT, make_split, utkface_files, write_csv
from dataset import FaceDataset, collate
from defaults import get_cfg_defaults
from model import fetch_verified, sha256_of
from objectives import LabelDistributionObjective
from records import DataError, Records
from runtime import EpochSampler
from files import atomic_write, remove_stale_temp_files, writing

EXACT = ["MODEL.ARCH", "tinyage", "MODEL.IMG_SIZE", "32", "TRAIN.BATCH_SIZE", "16", "TRAIN.WORKERS", "0",
         "TRAIN.EPOCHS", "3", "TRAIN.DETERMINISTIC", "True", "TRAIN.AUG", "True", "TRAIN.LR", "0.01"]
STEPS_PER_EPOCH = 6  # 96 training faces in batches of 16


def run_training(data, checkpoint, extra=(), crash=None, check=True):
    """train-ldl.py in a subprocess; with ``crash``, through tests/crash_launcher.py, which SIGKILLs it at that point."""
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1")
    launcher = [str(ROOT / "tests" / "crash_launcher.py"), crash] if crash else []
    command = [sys.executable, *launcher, str(ROOT / "train-ldl.py"), "--data_dir", str(data), "--dataset", "utk",
               "--checkpoint", str(checkpoint), *extra]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert done.returncode == 0, done.stderr[-2000:]
    return done


def weights(path):
    return torch.load(path, weights_only=True)["state_dict"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    data = tmp_path_factory.mktemp("exact")
    make_split(data, 96, 32, seed=5)
    run_training(data, data / "reference", EXACT)
    return data, weights(data / "reference" / "last.pth")


def temp_files(folder):
    return sorted(p.name for p in folder.glob(f".*{files.PART_SUFFIX}"))


# mid-epoch (epoch 2, step 3), during the validation after epoch 2, and halfway through writing epoch 2's checkpoint
@pytest.mark.parametrize("crash", [f"step:{STEPS_PER_EPOCH + 3}", "validate:1:1", "save:1"])
def test_sigkill_then_resume_gives_bit_identical_weights(reference, tmp_path, crash):
    data, expected = reference
    checkpoint = tmp_path / "ck"
    killed = run_training(data, checkpoint, EXACT, crash=crash, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    state = load_checkpoint(checkpoint / "last.pth")
    assert state["epoch"] == 0, "the previous good checkpoint survives the kill"
    if crash.startswith("save"):
        assert len(temp_files(checkpoint)) == 1, "killed halfway through a checkpoint write"
    run_training(data, checkpoint, ["--resume", str(checkpoint / "last.pth")])
    assert_same_weights(weights(checkpoint / "last.pth"), expected)
    assert temp_files(checkpoint) == [], "the killed write's temp file is cleaned up by the resumed run"


def test_sigterm_saves_an_interrupted_checkpoint_that_resumes_exactly(reference, tmp_path):
    data, expected = reference
    checkpoint = tmp_path / "ck"
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1")
    command = [sys.executable, str(ROOT / "train-ldl.py"), "--data_dir", str(data), "--dataset", "utk",
               "--checkpoint", str(checkpoint), *EXACT]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = b""
    while b"epoch 1/3" not in seen:  # tqdm's first bar: the loop is running
        chunk = os.read(process.stderr.fileno(), 4096)
        assert chunk, "training ended before it started"
        seen += chunk
    process.send_signal(signal.SIGTERM)
    _, rest = process.communicate(timeout=120)
    stderr = (seen + rest).decode()
    assert process.returncode != 0
    assert "stopped by SIGTERM" in stderr and "--resume" in stderr
    state = load_checkpoint(checkpoint / "last.pth")
    assert state["interrupted"] is True
    run_training(data, checkpoint, ["--resume", str(checkpoint / "last.pth")])
    assert_same_weights(weights(checkpoint / "last.pth"), expected)


def test_truncated_and_code_running_files_are_refused(reference, tmp_path):
    data, _ = reference
    payload = (data / "reference" / "last.pth").read_bytes()
    for offset in (0, 10, len(payload) // 3, len(payload) - 100):
        path = tmp_path / f"cut{offset}.pth"
        path.write_bytes(payload[:offset])
        with pytest.raises(CheckpointError, match="truncated or corrupt"):
            load_checkpoint(path)

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state_dict": {}, "payload": Exploit()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(tmp_path / "evil.pth")
    assert not marker.exists()


class NanAtCall(LabelDistributionObjective):
    """The DLDL-v2 loss, turned NaN at its NAN_CALL-th call: a numerical fault injected from the test."""

    NAN_CALL = 7  # 64 faces in batches of 16: 4 steps an epoch, so epoch 2, step 3

    def __init__(self, cfg):
        super().__init__(cfg)
        self.calls = 0

    def __call__(self, outputs, batch):
        loss, parts = super().__call__(outputs, batch)
        self.calls += 1
        return (loss * float("nan") if self.calls == self.NAN_CALL else loss), parts


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    make_split(tmp_path, 64, 16)
    checkpoint = tmp_path / "ck"
    args = ["--data_dir", str(tmp_path), "--dataset", "utk", "--checkpoint", str(checkpoint),
            "MODEL.ARCH", "tinyage", "MODEL.IMG_SIZE", "32", "TRAIN.BATCH_SIZE", "16", "TRAIN.WORKERS", "0", "TRAIN.EPOCHS", "2"]
    monkeypatch.setitem(train.OBJECTIVES, "ldl", NanAtCall)
    with pytest.raises(SystemExit, match=r"loss became nan at epoch 2, step 3"):
        train.fit("ldl", args)
    state = load_checkpoint(checkpoint / "last.pth")
    assert state["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())


def test_image_lost_mid_run_is_named_or_skipped_and_counted(tmp_path):
    rows = utkface_files()[:3]
    (tmp_path / "gone.jpg").write_bytes(rows[0][0].read_bytes())
    path = tmp_path / "m_train_align.csv"
    write_csv(path, [(tmp_path / "gone.jpg", 30, 0, 0)] + rows[1:])
    records = Records(path, tmp_path)
    (tmp_path / "gone.jpg").write_bytes(b"corrupted during training")
    with pytest.raises(DataError, match="line 2.*gone.jpg.*DATA.ON_BAD_IMAGE skip"):
        FaceDataset(records, 32, 0.0)[0]
    skipping = FaceDataset(records, 32, 0.0, on_bad_image="skip")
    batch = collate([skipping[i] for i in range(3)])
    assert batch["skipped"] == 1 and len(batch["age"]) == 2


def interrupt_at_step(monkeypatch, calls, trained):
    """train_step, recording each batch's faces in ``trained`` and sending this process SIGINT during its
    ``calls``-th call: the run stops after that step, with a checkpoint, as after a Ctrl-C."""
    step = train.train_step

    def recording(model, batch, *args, **kwargs):
        trained.append(sorted(batch["index"].tolist()))
        if len(trained) == calls:
            os.kill(os.getpid(), signal.SIGINT)
        return step(model, batch, *args, **kwargs)

    monkeypatch.setattr(train, "train_step", recording)


def test_a_batch_whose_images_were_all_lost_still_counts_as_a_step(tmp_path, monkeypatch):
    """The resumed run skips exactly the batches the stopped one went through, the one it skipped whole included."""
    faces = []
    for index, (file, age, gender, ethnicity) in enumerate(utkface_files()[:64]):
        (tmp_path / f"face{index}.jpg").write_bytes(file.read_bytes())
        faces.append((tmp_path / f"face{index}.jpg", age, gender, ethnicity))
    write_csv(tmp_path / "utk_train_align.csv", faces)
    write_csv(tmp_path / "utk_valid_align.csv", utkface_files()[64:80])
    sampler = EpochSampler(64, seed=get_cfg_defaults().TRAIN.SEED, batch_size=16)
    sampler.set_epoch(0)
    batches = [sorted(batch) for batch in (np.array(list(sampler)) % 64).reshape(4, 16).tolist()]
    load_data = train.load_data

    originals = {index: faces[index][0].read_bytes() for index in batches[1]}

    def load_then_lose_the_second_batch(*args):
        """Each run checks the photos whole, then loses the second batch's (the resumed run never reads them)."""
        for index, data in originals.items():
            faces[index][0].write_bytes(data)
        loaded = load_data(*args)
        for index in batches[1]:
            faces[index][0].write_bytes(b"lost after the check")
        return loaded

    monkeypatch.setattr(train, "load_data", load_then_lose_the_second_batch)
    trained = []
    interrupt_at_step(monkeypatch, 2, trained)
    args = ["--data_dir", str(tmp_path), "--dataset", "utk", "--checkpoint", str(tmp_path / "ck"), "MODEL.ARCH", "tinyage",
            "MODEL.IMG_SIZE", "32", "TRAIN.BATCH_SIZE", "16", "TRAIN.WORKERS", "0", "TRAIN.EPOCHS", "1",
            "DATA.CACHE", "False", "DATA.ON_BAD_IMAGE", "skip"]
    with pytest.raises(SystemExit, match="stopped by SIGINT at epoch 1, step 3"):
        train.fit("ldl", args)
    train.fit("ldl", args + ["--resume", str(tmp_path / "ck" / "last.pth")])
    assert trained == [batches[0], batches[2], batches[3]], "batch 2 (all lost) skipped, no batch trained twice"


def test_verified_download(tmp_path, monkeypatch):
    source = tmp_path / "weights.pth"
    torch.save({"w": torch.ones(1)}, source)
    digest = sha256_of(source)
    cache = tmp_path / "cache"
    monkeypatch.setattr(model, "WEIGHTS_CACHE", cache)
    assert fetch_verified(source.as_uri(), digest).read_bytes() == source.read_bytes()
    with pytest.raises(SystemExit, match="does not match the pinned"):
        fetch_verified(source.as_uri(), "f" * 64)
    assert not (cache / f"{'f' * 16}-weights.pth").exists(), "a file that fails verification is removed"


URL = "https://example.org/weights.pth"
# the download timeout the test sets, and how long the whole refused download may take
SHORT_TIMEOUT_S = 1
STALLED_BOUND_S = 15


def test_a_server_that_accepts_and_never_answers_fails_the_download_within_its_timeout(tmp_path, monkeypatch):
    """A local server that takes the connection and stays silent: the run stops with the limit named, no file left."""
    monkeypatch.setattr(model, "WEIGHTS_CACHE", tmp_path / "cache")
    monkeypatch.setattr(model, "DOWNLOAD_TIMEOUT_S", SHORT_TIMEOUT_S)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()  # the kernel completes the handshake; nothing ever reads or answers
        url = f"http://127.0.0.1:{server.getsockname()[1]}/weights.pth"
        start = time.monotonic()
        with pytest.raises(SystemExit, match=f"no answer within {SHORT_TIMEOUT_S} s"):
            fetch_verified(url, "0" * 64)
        assert time.monotonic() - start < STALLED_BOUND_S
    assert list((tmp_path / "cache").iterdir()) == []


@pytest.mark.parametrize("digest", ["../x", "0" * 63 + "/", "../" + "0" * 61, "g" * 64, "0" * 65])
def test_a_sha256_that_is_not_64_hex_digits_is_refused_before_any_download(tmp_path, monkeypatch, digest):
    """The digest names the cached file: a value with / or .. would write or delete outside the cache."""
    monkeypatch.setattr(model, "WEIGHTS_CACHE", tmp_path / "cache")
    monkeypatch.setattr(model, "fetch_url", lambda url, path: pytest.fail("downloaded"))
    with pytest.raises(SystemExit, match="is not 64 hexadecimal digits"):
        fetch_verified(URL, digest)
    assert not (tmp_path / "cache").exists()



@pytest.mark.parametrize("failure", [KeyboardInterrupt, ConnectionResetError])
def test_an_interrupted_download_leaves_no_part_file(tmp_path, monkeypatch, failure):
    """Ctrl-C (or a dropped connection) halfway through a download: the cache holds nothing, not half a file."""
    monkeypatch.setattr(model, "WEIGHTS_CACHE", tmp_path / "cache")

    def half_then_fail(url, filename):
        Path(filename).write_bytes(b"half of the weights")
        raise failure

    monkeypatch.setattr(model, "fetch_url", half_then_fail)
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        fetch_verified(URL, "0" * 64)
    assert list((tmp_path / "cache").iterdir()) == []


def test_concurrent_downloads_of_one_file_write_apart_and_rename_it_whole(tmp_path, monkeypatch):
    """Two processes (here threads) fetching the same weights at once: each writes its own temporary file, named
    after its pid and a random token, and renames it whole over the target."""
    monkeypatch.setattr(model, "WEIGHTS_CACHE", tmp_path / "cache")
    payload = os.urandom(1 << 16)
    both_halfway = threading.Barrier(2, timeout=60)
    temp_names = []

    def in_two_halves(url, filename):
        temp_names.append(Path(filename).name)
        with open(filename, "wb") as handle:
            handle.write(payload[:len(payload) // 2])
            handle.flush()
            both_halfway.wait()
            handle.write(payload[len(payload) // 2:])
        return filename, None

    monkeypatch.setattr(model, "fetch_url", in_two_halves)
    fetched = []
    threads = [threading.Thread(target=lambda: fetched.append(fetch_verified(URL, hashlib.sha256(payload).hexdigest())))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    owner = f".{os.getpid()}@{socket.gethostname()}.part"
    assert len(set(temp_names)) == 2 and all(name.endswith(owner) for name in temp_names)
    assert len(fetched) == 2 and all(path.read_bytes() == payload for path in fetched)
    assert [path.name for path in (tmp_path / "cache").iterdir()] == [fetched[0].name], "no temporary file is left"


def test_a_dead_writers_temporary_files_go_and_a_live_ones_stay(tmp_path):
    """files.remove_stale_temp_files: this process's file in progress, another live process's and another machine's stay;
    a dead process's goes, and so does one carrying this process's pid that it is not writing (a killed writer whose
    pid the system gave again, as in a restarted container)."""
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                           check=True)
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    host = socket.gethostname()
    try:
        named = {f".w.pth.0a0a0a0a.{pid}@{machine}.part": stays for pid, machine, stays in (
            (running.pid, host, True), (int(ended.stdout), "elsewhere.example", True),
            (int(ended.stdout), host, False), (os.getpid(), host, False))}
        for name in named:
            (tmp_path / name).write_bytes(b"part of a file")
        with writing(tmp_path / "w.pth") as mine:
            mine.write_bytes(b"in progress")
            remove_stale_temp_files(tmp_path, ["w.pth"])
            assert mine.exists()
            os.replace(mine, tmp_path / "w.pth")
        kept = [name for name, stays in named.items() if stays] + ["w.pth"]
        assert sorted(path.name for path in tmp_path.iterdir()) == sorted(kept)
    finally:
        running.kill()
        running.wait()


def test_a_runs_output_folder_check_removes_what_killed_writers_left_there(tmp_path):
    """val.py's and demo.py's outputs, the preprocessing CSVs, a run's folder: a dead writer's temporary file goes
    when the next run checks the folder; a live writer's stays, and so does the name of a file it is not."""
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                           check=True)
    host = socket.gethostname()
    dead = f".report.json.0a0a0a0a.{int(ended.stdout)}@{host}.part"
    live = f".errors.csv.0b0b0b0b.{os.getppid()}@{host}.part"
    mine = "notes.part"
    for name in (dead, live, mine):
        (tmp_path / name).write_bytes(b"part of a file")
    files.check_output_dir(tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([live, mine])


def test_atomic_checkpoint_leaves_no_partial_files(tmp_path):
    save_checkpoint({"state_dict": {}, "epoch": 0, "objective": "ldl", "config": {}}, tmp_path, is_best=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pth", "last.pth"]


class WriterDied(Exception):
    pass


def test_a_write_that_dies_halfway_leaves_the_old_file_and_no_temp_file(tmp_path):
    """A writer that opened the target itself would have truncated it before dying."""
    path = tmp_path / "history.csv"
    path.write_text("the previous content\n")

    def dies_halfway(partial):
        partial.write_bytes(b"half of the new")
        raise WriterDied

    with pytest.raises(WriterDied):
        atomic_write(path, dies_halfway)
    assert path.read_text() == "the previous content\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.csv"]


def test_atomic_write_renames_a_complete_temp_file_over_the_target(tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    path.write_text("old")
    seen = []
    replace = os.replace

    def observing_replace(source, target):
        seen.append((Path(source).parent, Path(source).read_text(), Path(target).read_text()))
        replace(source, target)

    monkeypatch.setattr(files.os, "replace", observing_replace)
    atomic_write(path, b"new content")
    assert seen == [(tmp_path, "new content", "old")], "complete temp file in the same folder, target untouched until the rename"
    assert path.read_text() == "new content"


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_atomic_write_honours_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        atomic_write(tmp_path / "best.pth", b"x")
    finally:
        os.umask(previous)
    assert (tmp_path / "best.pth").stat().st_mode & 0o777 == mode
