"""Run a training script that kills itself with SIGKILL at a chosen moment: the crashes of the resume tests.

    python tests/crash_launcher.py POINT SCRIPT [ARGS...]

POINT is one of
    step:N          right after the run's N-th optimizer step
    validate:E:B    after B batches of the validation that follows epoch E (counted from 0)
    save:E          halfway through writing the first checkpoint file at the end of epoch E

The faults are injected here, from outside, so that the production code carries no test hooks.
"""
import os
import runpy
import signal
import sys
from pathlib import Path

from torch.optim.optimizer import register_optimizer_step_post_hook

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import checkpoint  # noqa: E402
import train  # noqa: E402


def die():
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def kill_after_steps(total):
    steps = 0

    def hook(_optimizer, _args, _kwargs):
        nonlocal steps
        steps += 1
        if steps == total:
            die()

    register_optimizer_step_post_hook(hook)


class DyingLoader:
    """The validation loader, dying when the validation after epoch ``epoch`` asks for batch ``batches`` + 1."""

    passes = 0

    def __init__(self, loader, epoch, batches):
        self.loader, self.epoch, self.batches = loader, epoch, batches

    def __iter__(self):
        this_pass = DyingLoader.passes
        DyingLoader.passes += 1
        for count, batch in enumerate(self.loader, start=1):
            yield batch
            if this_pass == self.epoch and count == self.batches:
                die()

    def __len__(self):
        return len(self.loader)

    def __getattr__(self, name):
        return getattr(self.loader, name)


def kill_in_validation(epoch, batches):
    make = train.evaluation_loader
    train.evaluation_loader = lambda *args, **kwargs: DyingLoader(make(*args, **kwargs), epoch, batches)


def kill_mid_write(epoch):
    """At epoch ``epoch``'s end-of-epoch save, write half of the first file's temp file, then die."""
    save, write_atomically = train.save_checkpoint, checkpoint.atomic_write

    def half_then_die(payload):
        def partial(path):
            with open(path, "xb") as handle:
                handle.write(payload[:len(payload) // 2])
                handle.flush()
                os.fsync(handle.fileno())
            die()
        return partial

    def saving(state, checkpoint_dir, is_best):
        if state["epoch"] == epoch and not state["interrupted"]:
            checkpoint.atomic_write = lambda path, payload: write_atomically(path, half_then_die(payload))
        return save(state, checkpoint_dir, is_best)

    train.save_checkpoint = saving


def main():
    point, script, *args = sys.argv[1:]
    kind, *numbers = point.split(":")
    numbers = [int(n) for n in numbers]
    {"step": kill_after_steps, "validate": kill_in_validation, "save": kill_mid_write}[kind](*numbers)
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
