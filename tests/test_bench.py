"""bench.py: the JSON contract of docs/design.md, and ratios taken within a round."""
import json
import subprocess
import sys

import pytest
from conftest import ROOT, make_split

import bench

DESIGN_KEYS = {"train_img_s", "compute_img_s", "ratio", "val_img_s", "amp", "device_name", "gflop_per_img",
               "train_gflops", "peak_gflops", "peak_rss_mb", "baseline_train_img_s", "speedup"}


def test_ratios_pair_the_windows_of_one_round():
    loop = [100.0, 50.0, 90.0]
    compute = [100.0, 100.0, 100.0]
    assert bench.median_ratio(loop, compute) == 0.9
    assert bench.median_ratio([2.0, 4.0, 6.0], [1.0, 2.0, 3.0], scale=3.0) == 6.0
    calls = []
    rounds = bench.timed_rounds(2, {"a": lambda: calls.append("a") or 1.0, "b": lambda: calls.append("b") or 2.0})
    assert calls == ["a", "b", "a", "b"]
    assert rounds == {"a": [1.0, 1.0], "b": [2.0, 2.0]}
    derived = bench.ratios({"train_img_s": [10.0, 20.0, 30.0], "compute_img_s": [20.0, 20.0, 30.0],
                            "peak_gflops": [100.0, 100.0, 100.0]}, gflop_per_img=2.0)
    assert derived == {"ratio": 1.0, "peak_share": 0.4}, "only the ratios whose windows were timed"


def test_bench_prints_design_keys_on_any_aligned_csv(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    make_split(data, 40, 8)
    result = subprocess.run(
        [sys.executable, "bench.py", "--arch", "tinyage", "--img_size", "32", "--batch", "8", "--steps", "2",
         "--rounds", "2", "--baseline", "--baseline_workers", "0", "--fp32", "--data_dir", str(data),
         "--dataset", "utk"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert DESIGN_KEYS <= report.keys()
    assert report["rounds"] == 2 and report["steps"] == 2
    # the JSON rounds to 3 decimals, and a 32 px image is about 0.1 GFLOP: 1% covers the rounding
    assert report["train_gflops"] == pytest.approx(report["train_img_s"] * report["gflop_per_img"], rel=0.01)
    assert all(report[key] > 0 for key in ("train_img_s", "compute_img_s", "baseline_train_img_s", "peak_gflops",
                                            "gflop_per_img", "val_img_s", "amp_speedup", "speedup"))
