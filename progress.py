"""What a training run tells its user as it goes: where its files are, the time left, and a speed that fell.

A run can last hours, so each epoch's line ends with the time the whole run still needs (from this run's own pace)
and the clock time it should end; and since a second job on the same CPU or GPU silently halves the pace, the run
says so once, when an epoch trains at under half the speed of its best.
"""
import time
from pathlib import Path

from checkpoint import BEST_NAME, LAST_NAME
from history import CURVES_NAME, HISTORY_NAME

# an epoch that trains at under this share of the run's best speed gets the one warning
SLOWDOWN_SHARE = 0.5


def run_files(checkpoint_dir, cache_dir):
    """One line naming the run's files; ``cache_dir`` is None when the crop cache is off."""
    folder = Path(checkpoint_dir)
    cache = f"crop cache in {cache_dir}" if cache_dir is not None else "no crop cache (DATA.CACHE False)"
    return (f"run folder {folder}: {LAST_NAME}, {BEST_NAME}, {folder / HISTORY_NAME} and {folder / CURVES_NAME} "
            f"after each epoch; {cache}")


def duration(seconds):
    """``1h 05m``, ``4m 10s`` or ``35s``."""
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {seconds:02d}s" if minutes else f"{seconds}s"


def clock_time(when):
    """``14:05`` today, ``Thu 14:05`` on another day."""
    end = time.localtime(when)
    return time.strftime("%H:%M" if end[:3] == time.localtime()[:3] else "%a %H:%M", end)


class RunPace:
    """The run's speed epoch by epoch: the time left for the whole run, and whether the speed has halved.

    ``trained`` takes an epoch's training part (its steps and seconds), ``epoch_done`` the whole epoch's seconds
    (validation and checkpoints included); the time left is the epochs to go at the last epoch's pace, its
    training scaled to full epochs, so that a resumed run's partial first epoch counts right.
    """

    def __init__(self, epochs, steps_per_epoch, batch_size):
        self.epochs, self.steps_per_epoch, self.batch_size = epochs, steps_per_epoch, batch_size
        self.best = None  # (images per second, epoch)
        self.warned = False
        self.steps = self.train_seconds = 0

    def trained(self, steps, seconds):
        self.steps, self.train_seconds = steps, seconds

    def speed(self):
        """Training images per second in the last epoch."""
        return self.steps * self.batch_size / max(self.train_seconds, 1e-9)

    def epoch_done(self, epoch, seconds):
        """(the epoch line's ending: speed, time left and end of the run; a one-time slowdown warning or None)."""
        speed = self.speed()
        warning = self.slowdown(epoch, speed)
        if self.best is None or speed > self.best[0]:
            self.best = (speed, epoch)
        left = self.epochs - epoch - 1
        if not left:
            return f"{speed:.0f} img/s", warning
        per_epoch = self.steps_per_epoch * self.train_seconds / max(self.steps, 1) + seconds - self.train_seconds
        return (f"{speed:.0f} img/s; {duration(left * per_epoch)} left ({left} epoch{'s' if left > 1 else ''}), "
                f"done about {clock_time(time.time() + left * per_epoch)}"), warning

    def slowdown(self, epoch, speed):
        if self.warned or self.best is None or speed >= SLOWDOWN_SHARE * self.best[0]:
            return None
        self.warned = True
        return (f"warning: epoch {epoch + 1} trained at {speed:.0f} img/s, {speed / self.best[0]:.0%} of the "
                f"{self.best[0]:.0f} img/s of epoch {self.best[1] + 1}: another process may be competing for this "
                f"machine's CPU or GPU (see top or nvidia-smi). The run goes on; this is said once.")
