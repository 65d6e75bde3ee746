"""The three training objectives and the label distributions behind them.

Each objective maps the model's output dict and a batch's labels to a scalar
loss and a few named parts for the progress bar. The prediction is the same
for all three: the expectation (and spread) of the softmax over ages 0..100.
"""
import numpy as np
import torch
import torch.nn.functional as F

from defaults import NUM_AGES, all_keys, config_value, get_cfg_defaults, key_help
from records import age_bin_frequency

# config sections that only some objectives read; every other section is the loop's, read by all three
OBJECTIVE_SECTIONS = ("LDL", "MT")


def age_values(device=None, dtype=torch.float32):
    return torch.arange(NUM_AGES, device=device, dtype=dtype)


def gaussian_label_distribution(ages, sigma, sigma_per_year=0.0):
    """DLDL's target: a Gaussian around each true age, sd ``sigma + sigma_per_year * age``, normalised over 0..100.

    Normalising over the finite range keeps it a distribution at the edges
    (age 0 or 100), where half the Gaussian would otherwise be cut off.
    """
    ages = ages.to(torch.float32).unsqueeze(1)
    grid = age_values(ages.device).unsqueeze(0)
    sd = sigma + sigma_per_year * ages
    log_density = -((grid - ages) ** 2) / (2.0 * sd**2)
    return torch.softmax(log_density, dim=1)


def age_loss_weights(train_ages, bin_width, power):
    """LDL.BALANCE's weight for each age 0..100: (training faces in its bin)^-power, scaled so that the training
    faces' mean weight is 1 (the loss keeps its size, the learning rate its meaning). Ages no training face has keep
    weight 0; no face of theirs is ever weighed."""
    train_ages = np.asarray(train_ages)
    per_face = age_bin_frequency(train_ages, bin_width) ** -power
    table = np.zeros(NUM_AGES)
    table[train_ages] = per_face
    return torch.tensor(table / per_face.mean(), dtype=torch.float32)


def expected_age(logits):
    """Mean and standard deviation of the predicted age distribution."""
    return distribution_moments(torch.softmax(logits.float(), dim=1))


def distribution_moments(probs):
    """Mean and standard deviation of age distributions (rows of ``probs`` over ages 0..100)."""
    mean, variance = mean_and_variance(probs)
    return mean, variance.sqrt()


def rank_loss(log_probs, ages):
    """Ordinal regression's loss read off the age distribution: for each threshold k in 0..99, the binary
    cross-entropy of P(age > k) (the distribution's mass above k) against whether the true age is above k, summed
    over the thresholds. Mass d years from the true age crosses d thresholds on the wrong side, so it costs more the
    farther it lies, which KL to a Gaussian target does not ask. Both sides come from log-cumulative sums of
    ``log_probs``, never the log of a difference near 0."""
    at_or_below = torch.logcumsumexp(log_probs, dim=1)[:, :-1]
    above = torch.logcumsumexp(log_probs.flip(1), dim=1).flip(1)[:, 1:]
    is_above = age_values(ages.device).unsqueeze(0)[:, :-1] < ages.unsqueeze(1)
    return -torch.where(is_above, above, at_or_below).sum(dim=1)


def mean_and_variance(probs):
    """Mean and variance of age distributions; the variance is a sum of non-negative terms, so its gradient stays
    finite where the sd's would not (a distribution on one age)."""
    grid = age_values(probs.device)
    mean = probs @ grid
    return mean, (probs * (grid.unsqueeze(0) - mean.unsqueeze(1)) ** 2).sum(dim=1)


class ClassificationObjective:
    """train.py: cross-entropy over the 101 ages."""

    name = "cls"
    script = "train.py"
    sections = ()
    multitask = False

    def __init__(self, cfg):
        self.cfg = cfg

    def see_training_ages(self, ages):
        """Nothing to learn from the training ages: cross-entropy weighs every face alike."""

    def __call__(self, outputs, batch):
        loss = F.cross_entropy(outputs["age"].float(), batch["age"])
        return loss, {"ce": loss.detach()}


class LabelDistributionObjective:
    """train-ldl.py: DLDL-v2, KL(target || predicted) + L1_WEIGHT * |expected age - true age|, plus
    VARIANCE_WEIGHT * the predicted distribution's variance and RANK_WEIGHT * rank_loss when those are above 0."""

    name = "ldl"
    script = "train-ldl.py"
    sections = ("LDL",)
    multitask = False

    def __init__(self, cfg):
        self.sigma = cfg.LDL.SIGMA
        self.sigma_per_year = cfg.LDL.SIGMA_PER_YEAR
        self.l1_weight = cfg.LDL.L1_WEIGHT
        self.variance_weight = cfg.LDL.VARIANCE_WEIGHT
        self.rank_weight = cfg.LDL.RANK_WEIGHT
        self.balance = cfg.LDL.BALANCE
        self.age_bin = cfg.TRAIN.AGE_BIN
        self.age_weights = None

    def see_training_ages(self, ages):
        """LDL.BALANCE's per-age weights come from the training set's ages, before the first step."""
        if self.balance:
            self.age_weights = age_loss_weights(ages, self.age_bin, self.balance)

    def __call__(self, outputs, batch):
        logits = outputs["age"].float()
        target = gaussian_label_distribution(batch["age"], self.sigma, self.sigma_per_year)
        # kl_div takes log-probabilities: log_softmax never takes the log of zero.
        log_probs = F.log_softmax(logits, dim=1)
        kl = F.kl_div(log_probs, target, reduction="none").sum(dim=1)
        mean, variance = mean_and_variance(log_probs.exp())
        terms = {"kl": kl, "l1": (mean - batch["age"].float()).abs()}
        if self.variance_weight:
            terms["var"] = variance
        if self.rank_weight:
            terms["rank"] = rank_loss(log_probs, batch["age"])
        if self.age_weights is not None:
            weights = self.age_weights.to(logits.device)[batch["age"]]
            terms = {name: value * weights for name, value in terms.items()}
        terms = {name: value.mean() for name, value in terms.items()}
        loss = (terms["kl"] + self.l1_weight * terms["l1"] + self.variance_weight * terms.get("var", 0.0)
                + self.rank_weight * terms.get("rank", 0.0))
        return loss, {name: value.detach() for name, value in terms.items()}


class MultiTaskObjective(LabelDistributionObjective):
    """train-mt.py: the LDL loss plus cross-entropy for gender and ethnicity."""

    name = "mt"
    script = "train-mt.py"
    sections = ("LDL", "MT")
    multitask = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.gender_weight = cfg.MT.GENDER_WEIGHT
        self.ethnicity_weight = cfg.MT.RACE_WEIGHT

    def __call__(self, outputs, batch):
        age_loss, parts = super().__call__(outputs, batch)
        gender = F.cross_entropy(outputs["gender"].float(), batch["gender"])
        ethnicity = F.cross_entropy(outputs["race"].float(), batch["race"])
        loss = age_loss + self.gender_weight * gender + self.ethnicity_weight * ethnicity
        return loss, {**parts, "gender": gender.detach(), "race": ethnicity.detach()}


OBJECTIVES = {o.name: o for o in (ClassificationObjective, LabelDistributionObjective, MultiTaskObjective)}


def refuse_ignored_settings(name, base, cfg, recipe, opts):
    """SystemExit naming the keys that objective ``name`` never reads and that this command line (the ``recipe`` of
    --config, the KEY VALUE ``opts``) sets apart from ``base`` (the defaults, or a resumed run's config): the run
    would ignore them without a word. A key left at its base value sets nothing, so a recipe may carry another
    objective's keys at their defaults."""
    unread = set(OBJECTIVE_SECTIONS) - set(OBJECTIVES[name].sections)
    ignored = [key for key in all_keys(cfg)
               if key.split(".")[0] in unread and config_value(cfg, key) != config_value(base, key)]
    if not ignored:
        return
    named = ", ".join(f"{key} {config_value(cfg, key)} (read by {' and '.join(scripts_reading(key))})"
                      for key in ignored)
    where = [f"by --config {recipe}"] if set(ignored) - set(opts[0::2]) else []
    where += ["on the command line"] if set(ignored) & set(opts[0::2]) else []
    raise SystemExit(f"{OBJECTIVES[name].script} does not read {named}, set {' and '.join(where)}, and would train "
                     f"without it. Train with the script named, or leave the setting out (a key at its default is "
                     f"accepted)")


def scripts_reading(section_or_key):
    """The training scripts whose objective reads a config section (``MT``) or key (``MT.GENDER_WEIGHT``)."""
    return [objective.script for objective in OBJECTIVES.values() if section_or_key.split(".")[0] in objective.sections]


def config_key_help(name):
    """-h's list of the config keys objective ``name``'s script reads: each with its default, the values it takes
    and its meaning."""
    unread = [section for section in OBJECTIVE_SECTIONS if section not in OBJECTIVES[name].sections]
    listed = [section for section in get_cfg_defaults() if section not in unread]
    others = "; ".join(f"{section}.* (read by {' and '.join(scripts_reading(section))})" for section in unread)
    others = f"\nNot listed, as {OBJECTIVES[name].script} does not read them: {others}." if unread else ""
    return (f"config keys, as KEY VALUE after the flags or nested by section in a --config recipe (the default, then "
            f"the values it takes):\n{key_help(listed)}{others}")
