import math

import numpy as np
import pytest
import torch

from defaults import NUM_AGES, get_cfg_defaults
from objectives import (ClassificationObjective, LabelDistributionObjective, MultiTaskObjective,
                        expected_age, gaussian_label_distribution)


@pytest.mark.parametrize("age", [0, 1, 37, 99, 100])
@pytest.mark.parametrize("sigma", [1.0, 2.0, 5.0])
def test_label_distribution_sums_to_one_and_peaks_at_the_age(age, sigma):
    dist = gaussian_label_distribution(torch.tensor([age]), sigma)[0]
    assert dist.shape == (NUM_AGES,)
    assert dist.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert int(dist.argmax()) == age
    assert (dist >= 0).all()


def test_label_distribution_is_symmetric_away_from_the_edges():
    dist = gaussian_label_distribution(torch.tensor([50]), 3.0)[0]
    assert torch.allclose(dist[40:50], dist[51:61].flip(0))


def test_kl_plus_l1_matches_a_hand_computation():
    cfg = get_cfg_defaults()
    cfg.LDL.SIGMA, cfg.LDL.L1_WEIGHT = 2.0, 0.5
    logits = torch.linspace(-3, 3, NUM_AGES).unsqueeze(0) * torch.tensor([[1.0]])
    ages = torch.tensor([30])
    loss, parts = LabelDistributionObjective(cfg)({"age": logits}, {"age": ages})

    grid = np.arange(NUM_AGES, dtype=np.float64)
    target = np.exp(-((grid - 30) ** 2) / (2 * 2.0**2))
    target /= target.sum()
    z = logits[0].double().numpy()
    log_p = z - math.log(np.exp(z).sum())
    mask = target > 0
    kl = float((target[mask] * (np.log(target[mask]) - log_p[mask])).sum())
    expected = float((np.exp(log_p) * grid).sum())
    l1 = abs(expected - 30)
    assert parts["kl"].item() == pytest.approx(kl, rel=1e-4)
    assert parts["l1"].item() == pytest.approx(l1, rel=1e-4)
    assert loss.item() == pytest.approx(kl + 0.5 * l1, rel=1e-4)


def test_ldl_loss_is_finite_for_extreme_logits():
    cfg = get_cfg_defaults()
    logits = torch.full((2, NUM_AGES), -1e4)
    logits[:, 0] = 1e4
    loss, _ = LabelDistributionObjective(cfg)({"age": logits}, {"age": torch.tensor([100, 0])})
    assert torch.isfinite(loss)


def test_expected_age_and_spread():
    logits = torch.full((1, NUM_AGES), -1e9)
    logits[0, 20] = logits[0, 30] = 0.0
    mean, sd = expected_age(logits)
    assert mean.item() == pytest.approx(25.0)
    assert sd.item() == pytest.approx(5.0)


def test_classification_and_multitask_losses():
    cfg = get_cfg_defaults()
    logits = torch.randn(4, NUM_AGES)
    batch = {"age": torch.tensor([1, 20, 50, 100]), "gender": torch.tensor([0, 1, 0, 1]), "race": torch.tensor([0, 1, 2, 4])}
    cls_loss, _ = ClassificationObjective(cfg)({"age": logits}, batch)
    assert cls_loss.item() == pytest.approx(torch.nn.functional.cross_entropy(logits, batch["age"]).item())
    outputs = {"age": logits, "gender": torch.randn(4, 2), "race": torch.randn(4, 5)}
    mt_loss, parts = MultiTaskObjective(cfg)(outputs, batch)
    ldl_loss, _ = LabelDistributionObjective(cfg)(outputs, batch)
    assert mt_loss.item() == pytest.approx((ldl_loss + parts["gender"] + parts["race"]).item(), rel=1e-5)
