"""TensorBoard event files for a run (LOG.TENSORBOARD True), beside history.csv and curves.png, which stay the
default log.

Researchers of this field compare runs in TensorBoard. The `tensorboard` package is imported only when the key
is on, so a run without it needs nothing more and changes nothing; writing event files downloads nothing.
Scalars: ``train/loss`` and ``train/mae`` (the epoch's running means) and ``train/lr`` at every check-in of the
loop, by global step; every validation figure of the epoch (``valid/mae``, ``valid/ca3``, …) by epoch.
"""
from pathlib import Path

EVENTS_DIR = "tensorboard"
# the validation figures history.csv logs that are plotted, by epoch
VALID_SCALARS = ("mae", "ca3", "ca5", "ca7", "gender_accuracy", "race_accuracy", "raw_mae")


class TensorBoardLog:
    """Event files under ``run_dir/tensorboard``."""

    def __init__(self, run_dir):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise SystemExit("LOG.TENSORBOARD True needs the tensorboard package: pip install -r requirements.txt, "
                             "or drop LOG.TENSORBOARD") from None
        self.folder = Path(run_dir) / EVENTS_DIR
        self.writer = SummaryWriter(log_dir=str(self.folder))

    def check_in(self, global_step, summary, lr):
        """The epoch's running training means so far and the learning rate, at one of the loop's check-ins."""
        self.writer.add_scalar("train/loss", summary["train_loss"], global_step)
        self.writer.add_scalar("train/mae", summary["train_mae"], global_step)
        self.writer.add_scalar("train/lr", lr, global_step)

    def epoch(self, epoch, result):
        """A finished epoch's validation figures (1-based ``epoch``)."""
        for name in VALID_SCALARS:
            value = result.get(name)
            if value is not None:
                self.writer.add_scalar(f"valid/{name}", value, epoch)
        self.writer.flush()

    def close(self):
        self.writer.close()


def open_log(enabled, run_dir, is_main):
    """A TensorBoardLog for the main process when ``enabled``, else None."""
    return TensorBoardLog(run_dir) if enabled and is_main else None
