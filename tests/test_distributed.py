"""torchrun + DistributedDataParallel on CPU (gloo): exact properties of distributed training on real faces.

Two processes must train on exactly what one process trains on: each rank
takes its slice of every global batch, one DDP step equals one step of one
process over the whole global batch, validation scores every face once, and
a signal that reaches one rank stops them all.
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import ddp_step
import scoring
import train
import training_data
import val
from checkpoint import TEST_REPORT_DIR, load_checkpoint
from conftest import ROOT, make_split, utkface_files, write_csv
from crop_cache import build_crop_cache
from records import Records
from runtime import EpochSampler, Runtime

# fp32, so that the training-time validation and val.py agree to 1e-3 whatever their batches
RUN = ["MODEL.ARCH", "tinyage", "MODEL.IMG_SIZE", "32", "TRAIN.BATCH_SIZE", "32", "TRAIN.WORKERS", "0", "TRAIN.LR", "0.003",
       "TRAIN.AMP", "off"]
ODD_VALID = 37


def torchrun(script_args, processes=2, **popen):
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *script_args]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def finish(process, timeout=300):
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out.decode(), err.decode()


def shards(size, world, batch, seed=3, epoch=2):
    samplers = [EpochSampler(size, seed=seed, rank=r, world_size=world, batch_size=batch) for r in range(world)]
    for sampler in samplers:
        sampler.set_epoch(epoch)
    return [list(sampler) for sampler in samplers]


@pytest.mark.parametrize("size, world, batch", [(101, 2, 16), (100, 3, 8), (20, 2, 16)])
def test_rank_shards_are_disjoint_and_slice_every_global_batch_of_one_process(size, world, batch):
    parts = shards(size, world, batch)
    single = shards(size, 1, batch * world)[0]
    flat = [key for part in parts for key in part]
    assert len(flat) == len(set(flat)), "no face on two ranks"
    assert set(flat) == set(single), "together the ranks train on exactly what one process trains on"
    steps = max(1, len(parts[0]) // batch)
    per_step = len(parts[0]) // steps
    for step in range(steps):
        joined = [key for part in parts for key in part[step * per_step:(step + 1) * per_step]]
        assert joined == single[step * per_step * world:(step + 1) * per_step * world]


def test_a_global_batch_that_does_not_split_evenly_and_sync_bn_on_a_cpu_are_refused():
    cfg = ddp_step.config()
    three = Runtime(device=torch.device("cpu"), world_size=3)
    with pytest.raises(SystemExit, match="must split evenly over the 3 processes; use a multiple of 3"):
        training_data.rank_batch_size(cfg, three)
    cfg.TRAIN.SYNC_BN = True
    with pytest.raises(SystemExit, match="TRAIN.SYNC_BN needs CUDA"):
        train.wrap_model(torch.nn.Linear(2, 2), cfg, three, multi_gpu=False)


def test_evaluation_shards_score_every_face_once_with_an_odd_count():
    parts = []
    for rank in range(2):
        sampler = EpochSampler(ODD_VALID, shuffle=False, rank=rank, world_size=2)
        parts += [key % ODD_VALID for key in sampler]
    assert sorted(parts) == list(range(ODD_VALID))


def test_shuffle_seed_and_epoch_are_mixed():
    def order(seed, epoch):
        sampler = EpochSampler(500, seed=seed, batch_size=500)
        sampler.set_epoch(epoch)
        return [key % 500 for key in sampler]

    assert order(43, 0) != order(42, 1), "seed 43 does not replay seed 42 one epoch later"
    assert order(42, 1) == order(42, 1)


def test_one_ddp_step_equals_one_step_of_one_process_and_validation_is_gathered(tmp_path):
    make_split(tmp_path, 64, ODD_VALID, seed=11)
    out = tmp_path / "ddp.pth"
    code, _, err = finish(torchrun([str(ROOT / "tests" / "ddp_step.py"), str(tmp_path), str(out)]))
    assert code == 0, err[-3000:]
    ddp = torch.load(out, weights_only=True)
    assert ddp["votes"] == [True, True, False], "a flag raised on any rank is raised on all"

    cfg = ddp_step.config()
    runtime = Runtime(device=torch.device("cpu"))
    records = {split: Records(tmp_path / f"utk_{split}_align.csv", tmp_path) for split in ("train", "valid")}
    crops = {split: build_crop_cache(rec, cfg.MODEL.IMG_SIZE, 0.0, tmp_path / "cache_single", 0, split)
             for split, rec in records.items()}
    single = ddp_step.step_update(cfg, runtime, ddp_step.first_batch(records["train"], crops["train"], runtime,
                                                                     ddp_step.GLOBAL_BATCH), wrap=False)
    assert single.keys() == ddp["update"].keys()
    moved = sum(float(v.abs().sum()) for v in single.values())
    assert moved > 0
    for name, change in single.items():
        torch.testing.assert_close(ddp["update"][name], change, rtol=1e-4, atol=1e-6, msg=name)

    model = ddp_step.fresh_model(cfg, runtime)
    alone = scoring.score_model(model, scoring.evaluation_loader(records["valid"], cfg, runtime, crops["valid"]), runtime, cfg)
    assert not np.isnan(ddp["age"].numpy()).any() and len(ddp["age"]) == ODD_VALID
    np.testing.assert_allclose(ddp["age"].numpy(), alone["age"], rtol=0, atol=1e-4)


def test_two_process_run_logs_once_saves_plain_weights_and_scores_every_face(tmp_path):
    make_split(tmp_path, 160, ODD_VALID, seed=7)
    write_csv(tmp_path / "utk_test_align.csv", utkface_files()[-ODD_VALID:])
    script = [str(ROOT / "train-ldl.py"), "--data_dir", str(tmp_path), "--dataset", "utk", "--checkpoint",
              str(tmp_path / "ddp"), *RUN, "TRAIN.EPOCHS", "1"]
    code, out, err = finish(torchrun(script))
    assert code == 0, err[-3000:]
    assert "x2 processes" in out
    assert out.count("epoch 1/1:") == 1, "only rank 0 logs"
    state = load_checkpoint(tmp_path / "ddp" / "last.pth")
    assert not any(key.startswith("module.") for key in state["state_dict"]), "saved without the DDP wrapper"
    report = val.main(["--data_dir", str(tmp_path), "--dataset", "utk", "--resume", str(tmp_path / "ddp" / "last.pth"),
                       "--output_dir", str(tmp_path / "report")])
    assert report["n"] == ODD_VALID
    assert state["metrics"]["mae"] == pytest.approx(report["mae"], abs=1e-3), "gathered validation covers every face once"
    assert out.count("scored once on test") == 1
    assert json.loads((tmp_path / "ddp" / TEST_REPORT_DIR / "report.json").read_text())["n"] == ODD_VALID, \
        "the best model scored on every test face once, over both ranks"


def children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as handle:
        return [int(child) for child in handle.read().split()]


def test_a_signal_to_one_rank_stops_every_rank_with_a_checkpoint(tmp_path):
    make_split(tmp_path, 640, 16, seed=9)
    script = [str(ROOT / "train-ldl.py"), "--data_dir", str(tmp_path), "--dataset", "utk", "--checkpoint",
              str(tmp_path / "ddp"), *RUN, "TRAIN.EPOCHS", "50", "TRAIN.BATCH_SIZE", "16"]
    process = torchrun(script)
    seen = b""
    while b"epoch 1/50" not in seen:  # rank 0's progress bar: both ranks are in the loop
        chunk = os.read(process.stderr.fileno(), 4096)
        assert chunk, "training ended before it started"
        seen += chunk
    time.sleep(1)
    ranks = children(process.pid)
    assert len(ranks) == 2
    os.kill(ranks[-1], signal.SIGTERM)
    code, _, err = finish(process, timeout=120)
    assert code != 0
    state = load_checkpoint(tmp_path / "ddp" / "last.pth")
    assert state["interrupted"] is True and state["epoch"] == 0, "rank 0 saved the step where every rank stopped"
    assert "--resume" in (seen.decode() + err)


@pytest.mark.parametrize("world", [2, 4])
def test_a_mid_epoch_position_skips_the_same_faces_for_any_number_of_processes(world):
    """A checkpoint's step counts global batches (TRAIN.BATCH_SIZE is the global batch), and every rank skips
    ``step`` batches of its share: a run resumed with another number of processes continues at the same face."""
    size, batch, step = 200, 16, 5
    one = EpochSampler(size, seed=3, batch_size=batch)
    one.set_epoch(2, skip=step * batch)
    ranks = [EpochSampler(size, seed=3, rank=rank, world_size=world, batch_size=batch // world) for rank in range(world)]
    for sampler in ranks:
        sampler.set_epoch(2, skip=step * sampler.batch_size)
    assert sorted(key for sampler in ranks for key in sampler) == sorted(one)


def test_a_non_finite_loss_on_one_rank_stops_every_rank_at_once_with_one_message(tmp_path):
    """Rank 1's loss turns NaN at epoch 2, step 3; rank 0's stays finite until the NaN gradients reach it. Both
    ranks stop together, rank 0 saying where; nothing of epoch 2 is saved."""
    make_split(tmp_path, 64, 16, seed=13)
    script = [str(ROOT / "tests" / "ddp_nan_loss.py"), "1", "7", str(tmp_path), "--data_dir", str(tmp_path),
              "--dataset", "utk", "--checkpoint", str(tmp_path / "ddp"), *RUN, "TRAIN.BATCH_SIZE", "16",
              "TRAIN.EPOCHS", "2"]
    process = torchrun(script, start_new_session=True)
    try:
        code, _, err = finish(process, timeout=600)
    finally:
        if process.poll() is None:  # a rank left waiting in an all-reduce
            os.killpg(process.pid, signal.SIGKILL)
    assert code != 0
    endings = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert endings[0]["message"].startswith("loss became nan at epoch 2, step 3;"), endings
    assert endings[1] == {"code": 1, "message": ""}, "one message, from rank 0"
    assert err.count("loss became") == 1
    state = load_checkpoint(tmp_path / "ddp" / "last.pth")
    assert state["epoch"] == 0 and all(torch.isfinite(v).all() for v in state["state_dict"].values()
                                       if v.is_floating_point())
