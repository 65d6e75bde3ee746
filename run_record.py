"""What made a training run, kept with it: a figure that cannot be traced to its command, code, data and machine
cannot be reproduced or compared.

The record names the command line, the config, the code's git commit (and whether the working tree had changes),
the versions of the packages that shape the numbers, the CPU or GPU, the precision and the sha256 of the split's
CSVs. It is plain data (strings, numbers, booleans, lists and dicts), so a checkpoint that carries it still loads
with ``torch.load(weights_only=True)``; the run folder holds it as ``run_record.json`` too, and val.py's report
repeats the record of the checkpoint it scored.
"""
import importlib.metadata
import platform
import shlex
import subprocess
import sys
from pathlib import Path

from preprocessing import split_record
from records import csv_path

RECORD_NAME = "run_record.json"
UNKNOWN = "unknown"
# the packages whose version changes what a run computes; each with the distributions that may provide it
PACKAGES = {"torch": ("torch",), "torchvision": ("torchvision",), "dlib": ("dlib", "dlib-bin"),
            "albumentations": ("albumentations",)}
GIT_TIMEOUT_S = 10
CODE_DIR = Path(__file__).resolve().parent


def collect(argv, cfg_dict, data_dir, dataset, device, precision):
    """The record of a run started with ``argv`` (the arguments after the script's name), training with the
    config ``cfg_dict`` on ``device`` at ``precision``, on the CSVs of ``dataset`` in ``data_dir``."""
    return {
        "command": shlex.join([Path(sys.argv[0]).name, *argv]),
        "argv": list(argv),
        "config": cfg_dict,
        "git": git_state(),
        "packages": package_versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device_name(device),
        "precision": precision,
        "split_sha256": split_hashes(data_dir, dataset),
    }


def git_state(code_dir=CODE_DIR):
    """{"commit", "dirty"} of the checkout the code runs from; "unknown" for both outside a git checkout or
    without git."""
    try:
        commit = _git(code_dir, "rev-parse", "HEAD").strip()
        dirty = bool(_git(code_dir, "status", "--porcelain").strip())
    except (OSError, subprocess.SubprocessError):
        return {"commit": UNKNOWN, "dirty": UNKNOWN}
    return {"commit": commit, "dirty": dirty}


def _git(code_dir, *args):
    return subprocess.run(["git", "-C", str(code_dir), *args], capture_output=True, text=True, check=True,
                          timeout=GIT_TIMEOUT_S).stdout


def package_versions():
    """{package: version, or "not installed"}."""
    versions = {}
    for package, distributions in PACKAGES.items():
        versions[package] = "not installed"
        for distribution in distributions:
            try:
                versions[package] = importlib.metadata.version(distribution)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return versions


def device_name(device):
    """The GPU's name for a CUDA device, else the CPU's."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def cpu_name():
    """The CPU's model name (Linux's /proc/cpuinfo), or what platform knows of it elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or UNKNOWN


def split_hashes(data_dir, dataset):
    """{CSV name: sha256} of the split's CSVs that exist in ``data_dir``."""
    paths = [csv_path(data_dir, dataset, side) for side in split_record.SIDES + split_record.OPTIONAL_SIDES]
    return {path.name: split_record.digest(path.read_bytes()) for path in paths if path.is_file()}
