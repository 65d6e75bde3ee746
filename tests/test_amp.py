"""TRAIN.AMP auto: bf16 where the hardware computes it natively, fp16 with a scaler on older GPUs, fp32 otherwise."""
import re
from pathlib import Path

import pytest
import torch

import runtime
from defaults import get_cfg_defaults, merge_opts
from estimator import inference_amp
from runtime import Runtime, autocast, resolve_amp

CPU = torch.device("cpu")
CUDA = torch.device("cuda", 0)
CPUINFO = Path("/proc/cpuinfo")
# AVX-512 BF16 or AMX tiles: the CPU multiplies bf16 matrices in hardware
NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_tile"}


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "off")])
def test_auto_on_a_cpu_follows_native_bf16(monkeypatch, native, expected):
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native)
    assert resolve_amp("auto", CPU) == expected


@pytest.mark.parametrize("bf16, expected", [(True, "bf16"), (False, "fp16")])
def test_auto_on_a_gpu_prefers_bf16_then_fp16(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
    assert resolve_amp("auto", CUDA) == expected


def test_explicit_settings_are_kept_and_fp16_needs_cuda():
    assert resolve_amp("off", CPU) == "off" and resolve_amp("bf16", CPU) == "bf16"
    with pytest.raises(SystemExit, match="fp16 needs a CUDA GPU"):
        resolve_amp("fp16", CPU)


@pytest.mark.skipif(not CPUINFO.is_file(), reason="the CPU's flags are read from Linux's /proc/cpuinfo")
def test_native_bf16_is_found_exactly_on_cpus_whose_flags_list_bf16_or_amx():
    """The operating system's own list of CPU features, not the call under test, says what this CPU computes."""
    flags = set(re.search(r"^flags\s*:(.*)$", CPUINFO.read_text(), re.MULTILINE).group(1).split())
    assert runtime.cpu_has_native_bf16() == bool(flags & NATIVE_BF16_FLAGS)


def test_autocast_runs_convolutions_in_the_resolved_dtype(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    conv = torch.nn.Conv2d(3, 4, 3)
    with autocast(Runtime(device=CPU), "auto"):
        assert conv(torch.zeros(1, 3, 8, 8)).dtype == torch.bfloat16
    with autocast(Runtime(device=CPU), "off"):
        assert conv(torch.zeros(1, 3, 8, 8)).dtype == torch.float32


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("trained, scored", [("off", "off"), ("bf16", "bf16"), ("fp16", "off"), ("auto", None)])
def test_a_saved_model_is_scored_in_its_own_training_precision_as_it_resolves_here(monkeypatch, native, trained, scored):
    """estimator.inference_amp, the one rule of val.py, demo.py and the API: "auto" honours the model's TRAIN.AMP;
    a GPU's fp16 becomes fp32 on a CPU, which has no fp16 autocast; an explicit choice is kept."""
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native)
    cfg = merge_opts(get_cfg_defaults(), ["TRAIN.AMP", trained])
    assert inference_amp("auto", cfg, CPU) == (scored or resolve_amp("auto", CPU))
    assert inference_amp("off", cfg, CPU) == "off" and inference_amp("bf16", cfg, CPU) == "bf16"
    with pytest.raises(SystemExit, match="fp16 needs a CUDA GPU"):
        inference_amp("fp16", cfg, CPU)
