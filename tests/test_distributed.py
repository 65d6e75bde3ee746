"""torchrun + DistributedDataParallel on CPU (gloo): same training as one process with the same global batch."""
import os
import subprocess
import sys

import pytest

import val
from checkpoint import load_checkpoint
from conftest import ROOT, make_split

RUN = ["MODEL.ARCH", "tinyage", "MODEL.IMG_SIZE", "32", "TRAIN.BATCH_SIZE", "32", "TRAIN.WORKERS", "0",
       "TRAIN.EPOCHS", "3", "TRAIN.LR", "0.003"]


def launch(data, checkpoint, processes):
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", OMP_NUM_THREADS="1")
    script = [str(ROOT / "train-ldl.py"), "--data_dir", str(data), "--dataset", "utk", "--checkpoint", str(checkpoint), *RUN]
    if processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *script]
    else:
        command = [sys.executable, *script]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_two_process_gloo_run_matches_a_single_process(tmp_path):
    make_split(tmp_path, 320, 80, seed=7)
    launch(tmp_path, tmp_path / "single", 1)
    double = launch(tmp_path, tmp_path / "ddp", 2)
    assert "x2 processes" in double.stdout
    assert double.stdout.count("epoch 3/3:") == 1, "only rank 0 logs"
    state = load_checkpoint(tmp_path / "ddp" / "last.pth")
    assert not any(key.startswith("module.") for key in state["state_dict"]), "saved without the DDP wrapper"
    report_single = val.main(["--data_dir", str(tmp_path), "--dataset", "utk", "--resume", str(tmp_path / "single" / "last.pth"),
                              "--output_dir", str(tmp_path / "r1")])
    report_ddp = val.main(["--data_dir", str(tmp_path), "--dataset", "utk", "--resume", str(tmp_path / "ddp" / "last.pth"),
                           "--output_dir", str(tmp_path / "r2")])
    assert report_ddp["n"] == 80
    assert state["metrics"]["mae"] == pytest.approx(report_ddp["mae"], abs=1e-3), "gathered validation covers every face once"
    assert report_ddp["mae"] == pytest.approx(report_single["mae"], abs=1.0)
