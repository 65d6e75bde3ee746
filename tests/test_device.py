"""--device cuda on a machine without CUDA: every entry point refuses it with the same message, before any work."""
import pytest
import torch

import app
import bench
import demo
import train
import val
from conftest import ROOT
from estimator import DEFAULT_WEIGHTS, AgeEstimator
from runtime import NO_CUDA_MESSAGE

QUICK = ["MODEL.ARCH", "tinyage", "MODEL.IMG_SIZE", "32", "TRAIN.BATCH_SIZE", "32", "TRAIN.EPOCHS", "1",
         "TRAIN.WORKERS", "0"]


@pytest.fixture(autouse=True)
def no_cuda(monkeypatch):
    """This machine as one without a GPU, whatever it has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def entry_points(data, tmp_path):
    """Each way a user names a device, asking for CUDA."""
    out = str(tmp_path / "out")
    return {
        "train.py": lambda: train.fit("ldl", ["--data_dir", str(data), "--dataset", "utk", "--checkpoint",
                                              str(tmp_path / "ck"), "--device", "cuda"] + QUICK),
        "val.py": lambda: val.main(["--data_dir", str(data), "--dataset", "utk", "--resume", str(DEFAULT_WEIGHTS),
                                    "--output_dir", out, "--device", "cuda"]),
        "demo.py": lambda: demo.main(["--img_dir", str(ROOT / "samples"), "--output_dir", out, "--device", "cuda"]),
        "bench.py": lambda: bench.main(["--steps", "1", "--rounds", "1", "--device", "cuda"]),
        "app.py": lambda: app.main(["--device", "cuda", "--port", "0"]),
        "the API": lambda: AgeEstimator.from_checkpoint(device="cuda"),
    }


def test_cuda_without_cuda_is_refused_everywhere_with_one_message(utk_small, tmp_path):
    for name, run in entry_points(utk_small[0], tmp_path).items():
        with pytest.raises(SystemExit) as refused:
            run()
        assert str(refused.value) == NO_CUDA_MESSAGE, name
    assert not (tmp_path / "ck").exists() and not (tmp_path / "out").exists(), "refused before any folder is made"
