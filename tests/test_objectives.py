import math

import numpy as np
import pytest
import torch

from defaults import NUM_AGES, get_cfg_defaults, merge_opts
from conftest import utkface_files
from objectives import (ClassificationObjective, LabelDistributionObjective, MultiTaskObjective,
                        distribution_moments, expected_age, gaussian_label_distribution)


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


def test_label_distribution_sd_grows_with_age_as_sigma_per_year_says():
    """LDL.SIGMA_PER_YEAR: a child's target is narrow, an old person's wide; away from the range's edges the target's
    sd is SIGMA + SIGMA_PER_YEAR * age (0 keeps DLDL-v2's one sd for every age)."""
    ages = torch.tensor([5, 20, 45, 70])
    _, sd = distribution_moments(gaussian_label_distribution(ages, 1.0, 0.05))
    torch.testing.assert_close(sd, 1.0 + 0.05 * ages.float(), rtol=1e-3, atol=1e-3)
    _, fixed = distribution_moments(gaussian_label_distribution(ages, 1.5, 0.0))
    torch.testing.assert_close(fixed, torch.full((4,), 1.5), rtol=1e-3, atol=1e-3)


def test_age_loss_weights_give_every_age_bin_the_same_share_of_real_utkface_faces():
    """LDL.BALANCE 1 on UTKFace's real ages: each 5-year bin's faces weigh the same in all (the 26-year-olds no longer
    outweigh the 90-year-olds 50 to 1), and the mean weight over the faces is 1, so the loss keeps its size."""
    ages = np.array([min(age, 100) for _, age, _, _ in utkface_files()])
    objective = LabelDistributionObjective(merge_opts(get_cfg_defaults(), ["LDL.BALANCE", "1.0"]))
    objective.see_training_ages(ages)
    per_face = objective.age_weights[torch.from_numpy(ages)].double()
    assert per_face.mean().item() == pytest.approx(1.0, rel=1e-6)
    bins = torch.from_numpy(ages // 5)
    per_bin = torch.zeros(int(bins.max()) + 1, dtype=torch.float64).index_add_(0, bins, per_face)
    present = per_bin[torch.bincount(bins) > 0]
    torch.testing.assert_close(present, torch.full_like(present, present.mean().item()))
    unweighted = LabelDistributionObjective(get_cfg_defaults())
    unweighted.see_training_ages(ages)
    assert unweighted.age_weights is None, "LDL.BALANCE 0 weighs every face alike"


@pytest.mark.parametrize("extra_term", [[], ["LDL.VARIANCE_WEIGHT", "0.05"], ["LDL.RANK_WEIGHT", "0.5"]],
                         ids=["kl_and_l1", "variance", "rank"])
def test_balanced_ldl_loss_is_the_weighted_mean_of_each_faces_own_loss(extra_term):
    """LDL.BALANCE weighs every term of a face's loss, the variance and rank terms included."""
    cfg = merge_opts(get_cfg_defaults(), ["LDL.BALANCE", "0.5", *extra_term])
    objective = LabelDistributionObjective(cfg)
    objective.see_training_ages([3, 25, 25, 25, 25, 80])
    torch.manual_seed(0)
    logits, ages = torch.randn(3, NUM_AGES), torch.tensor([3, 25, 80])
    loss, _ = objective({"age": logits}, {"age": ages})
    plain = LabelDistributionObjective(merge_opts(get_cfg_defaults(), extra_term))
    own = torch.stack([plain({"age": logits[i:i + 1]}, {"age": ages[i:i + 1]})[0] for i in range(3)])
    weights = objective.age_weights[ages]
    assert weights[0] == weights[2] == pytest.approx(2 * weights[1].item()), "a bin of 4 faces: (4/1)^-0.5 = 1/2"
    assert loss.item() == pytest.approx((own * weights).mean().item(), rel=1e-5)


def test_variance_weight_adds_the_predicted_distributions_variance():
    """LDL.VARIANCE_WEIGHT (mean-variance loss's variance term): half the mass on 20 and half on 30 has variance 25
    years^2, so the loss grows by exactly weight * 25; at 0 the loss is DLDL-v2's and reports no variance part."""
    logits = torch.full((1, NUM_AGES), -1e9)
    logits[0, 20] = logits[0, 30] = 0.0
    batch = {"age": torch.tensor([25])}
    plain_loss, plain_parts = LabelDistributionObjective(get_cfg_defaults())({"age": logits}, batch)
    cfg = merge_opts(get_cfg_defaults(), ["LDL.VARIANCE_WEIGHT", "0.1"])
    loss, parts = LabelDistributionObjective(cfg)({"age": logits}, batch)
    assert "var" not in plain_parts
    assert parts["var"].item() == pytest.approx(25.0)
    assert loss.item() == pytest.approx(plain_loss.item() + 0.1 * 25.0, rel=1e-6)


def test_variance_term_narrows_the_distribution_and_keeps_finite_gradients_on_one_age():
    """A gradient step on the variance term alone (the loss with it minus the loss without) makes the distribution
    tighter; on a distribution already on one age its gradient is finite, where the sd's would be 0 * inf."""
    with_variance = LabelDistributionObjective(merge_opts(get_cfg_defaults(), ["LDL.VARIANCE_WEIGHT", "1"]))
    without = LabelDistributionObjective(get_cfg_defaults())
    batch = {"age": torch.tensor([30, 60])}
    torch.manual_seed(0)
    logits = torch.randn(2, NUM_AGES, requires_grad=True)
    (with_variance({"age": logits}, batch)[0] - without({"age": logits}, batch)[0]).backward()
    before = with_variance({"age": logits.detach()}, batch)[1]["var"].item()
    after = with_variance({"age": logits.detach() - 0.05 * logits.grad}, batch)[1]["var"].item()
    assert after < before
    one_age = torch.full((1, NUM_AGES), -1e4)
    one_age[0, 40] = 1e4
    one_age.requires_grad_(True)
    with_variance({"age": one_age}, {"age": torch.tensor([40])})[0].backward()
    assert torch.isfinite(one_age.grad).all()


@pytest.mark.parametrize("years_off", [-20, -5, -1, 1, 5, 20])
def test_rank_weight_costs_ln2_for_each_threshold_between_the_mass_and_the_true_age(years_off):
    """LDL.RANK_WEIGHT: with half the mass on the true age 30 and half |d| years away, each of the |d| thresholds
    between them holds P(age > k) = 1/2 where the truth is certain (ln 2 each); every other threshold is certain and
    right. So the rank part is |d| ln 2, growing with the distance, and the loss grows by weight times it."""
    logits = torch.full((1, NUM_AGES), -1e4)
    logits[0, 30] = logits[0, 30 + years_off] = 0.0
    batch = {"age": torch.tensor([30])}
    plain_loss, plain_parts = LabelDistributionObjective(get_cfg_defaults())({"age": logits}, batch)
    loss, parts = LabelDistributionObjective(merge_opts(get_cfg_defaults(), ["LDL.RANK_WEIGHT", "0.5"]))(
        {"age": logits}, batch)
    assert "rank" not in plain_parts
    assert parts["rank"].item() == pytest.approx(abs(years_off) * math.log(2), rel=1e-5)
    assert loss.item() == pytest.approx(plain_loss.item() + 0.5 * abs(years_off) * math.log(2), rel=1e-5)


@pytest.mark.parametrize("age", [0, 10, 100])
def test_rank_term_moves_the_estimate_toward_the_true_age_with_finite_gradients(age):
    """A gradient step on the rank term alone moves a distribution sitting on age 50 toward the true age; its
    gradient is finite, and the estimate moves, even at the ends of the range and with the mass far from the truth."""
    with_rank = LabelDistributionObjective(merge_opts(get_cfg_defaults(), ["LDL.RANK_WEIGHT", "1"]))
    without = LabelDistributionObjective(get_cfg_defaults())
    batch = {"age": torch.tensor([age])}
    logits = torch.full((1, NUM_AGES), -30.0)
    logits[0, 50] = 30.0
    logits.requires_grad_(True)
    (with_rank({"age": logits}, batch)[0] - without({"age": logits}, batch)[0]).backward()
    assert torch.isfinite(logits.grad).all()
    before, _ = expected_age(logits.detach())
    after, _ = expected_age(logits.detach() - 1.0 * logits.grad)
    assert abs(after.item() - age) < abs(before.item() - age)
