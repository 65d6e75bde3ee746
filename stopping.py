"""How a training run stops: on a signal, after the current step and with a checkpoint; on a non-finite loss, at once
and with nothing saved. Under DDP every rank stops at the same step, whichever rank the signal or the loss reached.
"""
import contextlib
import signal
import sys

import torch

from runtime import gather_objects, teardown


class TrainingError(SystemExit):
    """A run that cannot go on; a SystemExit so that the message is printed without a traceback."""


class StopRequest:
    """SIGINT/SIGTERM ask the loop to stop after the current step; a second signal exits at once.

    Under DDP a signal that reached only some ranks stops all of them (see agree_any); ``signal`` names it, or
    says that it came through another rank.
    """

    def __init__(self):
        self.signal = None
        self.previous = {}

    def install(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self.handle)

    def restore(self):
        """Put back the handlers that were there before: a caller of fit() gets its own Ctrl-C back."""
        for sig, handler in self.previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)

    def handle(self, signum, _frame):
        if self.signal is not None:
            raise SystemExit(f"second {signal.Signals(signum).name}: exiting at once")
        self.signal = signal.Signals(signum).name
        print(f"\n{self.signal} received: finishing this step and saving a checkpoint "
              f"(send it again to exit at once)", file=sys.stderr, flush=True)


def agree_any(runtime, *flags):
    """Each flag, True on every rank when it is True on any (one all-reduce); the flags as they are in one process."""
    if not runtime.distributed:
        return flags
    votes = torch.tensor([float(flag) for flag in flags], device=runtime.device)
    torch.distributed.all_reduce(votes, op=torch.distributed.ReduceOp.MAX)
    return tuple(bool(vote) for vote in votes.tolist())


def step_votes(runtime, stop, empty, batches_may_empty):
    """(stop now, skip this batch), before a step.

    In one process both are known for free. Under DDP the ranks must agree, and an all-reduce waits for the
    device, so it is taken every step only when a batch can lose all its images (``batches_may_empty``:
    DATA.ON_BAD_IMAGE skip); a stop signal otherwise waits for the next check-in, where every rank stops at the
    same step.
    """
    if not runtime.distributed:
        return stop.signal is not None, empty
    if batches_may_empty:
        return agree_any(runtime, stop.signal is not None, empty)
    return False, empty


def stop_on_non_finite_loss(runtime, values, epoch):
    """Stop every rank at once, with one message naming the first step whose loss was not finite on any rank.

    ``values`` is this rank's EpochTally.read(). Nothing of this epoch is saved: the last good checkpoint stays.
    """
    firsts = [(step, loss) for step, loss in gather_objects(runtime, (values["first_bad_step"], values["bad_loss"]))
              if step >= 0]
    step, loss = min(firsts)
    teardown(runtime)
    if not runtime.is_main:
        raise SystemExit(1)
    raise TrainingError(
        f"loss became {loss} at epoch {epoch + 1}, step {int(step) + 1}; training stopped and the last good "
        f"checkpoint was kept. Try a lower TRAIN.LR, or TRAIN.AMP off."
    )


def stop_after_epoch_if_asked(runtime, stop, epoch, last_checkpoint):
    """A signal during validation or saving, to any rank: every rank stops here, the epoch's checkpoint saved."""
    if agree_any(runtime, stop.signal is not None)[0]:
        stop.signal = stop.signal or "a signal to another rank"
        teardown(runtime)
        raise TrainingError(f"stopped by {stop.signal} after epoch {epoch + 1}; "
                            f"continue with --resume {last_checkpoint}")


@contextlib.contextmanager
def sigterm_unwinds():
    """SIGTERM before the loop's StopRequest takes over ends the run as Ctrl-C does, by an exception, not by the
    default instant death: the folder's lock file is then removed on the way out, not left with a dead pid."""
    def stop(_signum, _frame):
        raise TrainingError("SIGTERM received before the first training step: stopped, nothing saved")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
