"""An epoch's running training figures (loss, MAE, head accuracies), summed on the device so that a step never waits."""
import torch

from model import ATTRIBUTE_HEADS
from objectives import expected_age


class EpochTally:
    """An epoch's running sums, kept on the training device, so that adding a step's numbers never waits for it.

    ``read`` fetches them in one transfer, at the loop's check-ins. The first step whose loss was not finite, and
    that loss, are kept on the device the same way, so the loop can name them without looking at every loss.
    """

    def __init__(self, device):
        self.seen = 0
        self.step = None  # the last step added, for the check-in's log
        self.sums = {}
        self.first_bad_step = torch.full((), -1.0, dtype=torch.float64, device=device)
        self.bad_loss = torch.zeros((), dtype=torch.float64, device=device)

    def add(self, loss, outputs, labels, step):
        with torch.no_grad():
            loss = loss.detach().double()
            mean, _ = expected_age(outputs["age"].detach())
            parts = {"loss": loss * len(mean), "error": (mean.double() - labels["age"].double()).abs().sum()}
            for head in ATTRIBUTE_HEADS:
                if head in outputs:
                    parts[head] = (outputs[head].detach().argmax(1) == labels[head]).sum().double()
            for name, value in parts.items():
                self.sums[name] = self.sums.get(name, 0.0) + value
            first = ~torch.isfinite(loss) & (self.first_bad_step < 0)
            self.first_bad_step = torch.where(first, float(step), self.first_bad_step)
            self.bad_loss = torch.where(first, loss, self.bad_loss)
        self.seen += len(mean)
        self.step = step

    def read(self):
        """The sums, the first non-finite step (-1: none) and its loss, as numbers: one wait for the device."""
        values = torch.stack([*self.sums.values(), self.first_bad_step, self.bad_loss]).tolist()
        return dict(zip([*self.sums, "first_bad_step", "bad_loss"], values))

    def summary(self, values):
        """Mean loss, MAE and head accuracies over the faces seen, from ``read``'s numbers."""
        seen = max(self.seen, 1)
        return {"train_loss": values.get("loss", 0.0) / seen, "train_mae": values.get("error", 0.0) / seen,
                **{f"train_{head}_accuracy": values[head] / seen for head in ATTRIBUTE_HEADS if head in values}}
