"""Where and how a run executes: device, processes, seeds, samplers and loaders.

One code path serves the CPU, one GPU, DataParallel (``--multi_gpu``) and
DistributedDataParallel under torchrun, so the training loop never asks which.
"""
import contextlib
import os
import random
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler

from dataset import collate, sample_key

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
NO_CUDA_MESSAGE = "--device cuda was asked for, but PyTorch sees no CUDA device; use --device cpu"
# TRAIN.WORKERS -1 on a GPU: enough to feed it, not so many that they crowd the host
MAX_AUTO_WORKERS = 8


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0


def resolve_device(device=None):
    """``None``: CUDA when PyTorch sees a GPU, else the CPU. Asking for CUDA without one is an error, never a
    silent run on the CPU; every script and the Python API ask here, so they refuse it alike."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(NO_CUDA_MESSAGE)
    return device


def setup_runtime(device_name=None):
    """Join the torchrun process group when launched by torchrun; otherwise a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = resolve_device(device_name).type == "cuda"
    if cuda:
        device = torch.device("cuda", local_rank if world_size > 1 else torch.cuda.current_device())
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return Runtime(device=device, rank=rank, world_size=world_size, local_rank=local_rank)


def teardown(runtime):
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed, deterministic=False):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=False)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def cpu_has_native_bf16():
    """AVX-512 BF16 or AMX: bf16 matrix products in hardware, about twice the fp32 rate.

    Without them, oneDNN emulates bf16 and autocast is slower than fp32.
    """
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def resolve_amp(amp, device):
    """``TRAIN.AMP`` as it applies on ``device``: "auto" becomes bf16, fp16 or off.

    auto: bf16 on CPUs and GPUs that compute it natively, fp16 (with a gradient
    scaler) on older GPUs, fp32 ("off") on other CPUs.
    """
    if amp == "fp16" and device.type != "cuda":
        raise SystemExit("TRAIN.AMP fp16 needs a CUDA GPU; on a CPU use auto, bf16 or off")
    if amp != "auto":
        return amp
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    return "bf16" if cpu_has_native_bf16() else "off"


def precision_name(amp, device):
    """What ``TRAIN.AMP`` computes in on ``device``, as people name it: bf16, fp16 or fp32."""
    resolved = resolve_amp(amp, device)
    return "fp32" if resolved == "off" else resolved


def autocast(runtime, amp):
    """The mixed-precision context for ``TRAIN.AMP`` on this run's device (a no-op for off)."""
    resolved = resolve_amp(amp, runtime.device)
    if resolved == "off":
        return contextlib.nullcontext()
    return torch.autocast(runtime.device.type, dtype=AMP_DTYPES[resolved])


class EpochSampler(Sampler):
    """Indices for one epoch and one rank, resumable mid-epoch.

    The order is a pure function of (seed, epoch), so a resumed run sees the
    same batches as an uninterrupted one. Each yielded key is a
    dataset.sample_key: the epoch, the sample's position in the epoch's order
    (the same for any batch size or number of processes) and the face index,
    which ``key % len(data)`` gives. The augmentation is seeded by
    (epoch, position).

    With ``weights``, an epoch is ``size`` draws with replacement in
    proportion to them (balanced sampling) instead of a permutation.

    Training (``batch_size`` given, per rank): the epoch is cut into global
    batches of ``batch_size * world_size`` faces and every rank takes its own
    contiguous slice of each, so DistributedDataParallel trains on exactly the
    batches a single process would. The incomplete last global batch is
    dropped, as ``drop_last`` does, unless it is the only one. Evaluation
    (no ``batch_size``): rank r takes faces r, r + W, ..., without padding, so
    every face is scored exactly once.
    """

    def __init__(self, size, seed=0, shuffle=True, rank=0, world_size=1, batch_size=None, weights=None):
        self.size = size
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.batch_size = batch_size
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch, skip=0):
        """Start ``epoch``, leaving out the first ``skip`` indices already trained on."""
        self.epoch = epoch
        self.skip = skip

    def epoch_order(self):
        """This epoch's order: a permutation, or ``size`` draws with replacement by ``weights``.

        (seed, epoch) are mixed, so seed 43 never replays seed 42 an epoch later.
        """
        if not self.shuffle:
            return torch.arange(self.size)
        mixed = np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0]
        generator = torch.Generator().manual_seed(int(mixed))
        if self.weights is not None:
            return torch.multinomial(self.weights, self.size, replacement=True, generator=generator)
        return torch.randperm(self.size, generator=generator)

    def positions(self):
        """This rank's places in the epoch's order (which is ``size`` long), in the order it takes them."""
        if self.batch_size is None:
            return torch.arange(self.rank, self.size, self.world_size)
        global_batch = self.batch_size * self.world_size
        full = self.size // global_batch
        if full == 0:
            share = self.size // self.world_size
            return torch.arange(self.rank * share, (self.rank + 1) * share)
        return torch.arange(full * global_batch).view(full, self.world_size, self.batch_size)[:, self.rank].reshape(-1)

    def __iter__(self):
        positions = self.positions()[self.skip:]
        return iter(sample_key(self.epoch, positions, self.epoch_order()[positions], self.size).tolist())

    def __len__(self):
        return max(0, len(self.positions()) - self.skip)


def resolve_workers(workers, runtime):
    """TRAIN.WORKERS -1: none on a CPU, where the model needs every core; several on a GPU."""
    if workers >= 0:
        return workers
    return min(MAX_AUTO_WORKERS, os.cpu_count() or 1) if runtime.device.type == "cuda" else 0


def make_loader(dataset, sampler, batch_size, workers, runtime, seed=0):
    """A loader with its own generator, so that making one never moves the global torch RNG."""
    cuda = runtime.device.type == "cuda"
    workers = resolve_workers(workers, runtime)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=cuda,
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(seed),
        multiprocessing_context="fork" if workers > 0 and sys.platform != "win32" else None,
    )


def gather_objects(runtime, value):
    """Every rank's ``value``, in rank order; just ``[value]`` in a single process."""
    if not runtime.distributed:
        return [value]
    gathered = [None] * runtime.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def unwrap(model):
    """The bare model inside DataParallel, DistributedDataParallel or torch.compile."""
    model = getattr(model, "_orig_mod", model)
    return model.module if hasattr(model, "module") else model

