"""How one preprocessing run divides its labelled images: one split into train, valid and test, or K folds.

Every split is drawn before face detection, so that an image's side depends only on the seed and the labelled
list, not on which faces the detector finds; the images are then aligned once, whatever the number of folds.
``valid_ratio`` and ``test_ratio`` are shares of all the images. With subjects (a person's id), a split can keep
each person on one side (``by_subject``): shares are then met as closely as whole persons allow.

A `Layout` names, for one output folder, the indices of the samples on each side, each side in input order.
"""
import random
from collections import Counter
from dataclasses import dataclass

SIDES = ("train", "valid", "test")
FOLD_FOLDER = "fold{}"
MIN_FOLDS = 2


@dataclass(frozen=True)
class Layout:
    """One output set: ``folder`` under the output folder ("" for the folder itself), ``fold`` its number (None for
    a single split) and ``sides``, each side's sample indices ("test" only where there is a test part)."""

    folder: str
    fold: int | None
    sides: dict


def single(samples, valid_ratio, test_ratio, seed, by_subject=False, fixed_test=()):
    """One Layout: ``round(valid_ratio * n)`` samples for valid, then ``round(test_ratio * n)`` of the rest for test
    (none when 0: then the split is the train/valid split of earlier versions, draw for draw).

    ``fixed_test``: indices that are the test part as a publisher lists it; valid is then ``valid_ratio`` of the
    others, and ``test_ratio`` is not used.
    """
    check_shares(valid_ratio, test_ratio)
    rng = random.Random(seed)
    fixed_test = set(fixed_test)
    rest = [index for index in range(len(samples)) if index not in fixed_test]
    valid = _draw(samples, rest, round(valid_ratio * len(rest)), rng, by_subject)
    rest = [index for index in rest if index not in valid]
    test = fixed_test or _draw(samples, rest, round(test_ratio * len(samples)), rng, by_subject)
    sides = {"train": [index for index in rest if index not in test], "valid": sorted(valid)}
    if test_ratio or fixed_test:
        sides["test"] = sorted(test)
    return [Layout("", None, sides)]


def folds(samples, count, valid_ratio, seed, by_subject=False):
    """``count`` Layouts in folders fold0 … fold{count-1}: their test parts are disjoint and together hold every
    sample (whole persons when ``by_subject``); each fold's valid part, ``round(valid_ratio * n)`` samples, is drawn
    from the other folds' test parts and the rest is train."""
    check_fold_count(samples, count, valid_ratio, by_subject)
    rng = random.Random(seed)
    parts = _subject_parts(samples, count, rng) if by_subject else _random_parts(len(samples), count, rng)
    layouts = []
    for fold, test in enumerate(parts):
        rest = [index for index in range(len(samples)) if index not in test]
        valid = _draw(samples, rest, round(valid_ratio * len(samples)), rng, by_subject)
        sides = {"train": [index for index in rest if index not in valid], "valid": sorted(valid),
                 "test": sorted(test)}
        layouts.append(Layout(FOLD_FOLDER.format(fold), fold, sides))
    return layouts


def check_shares(valid_ratio, test_ratio):
    if valid_ratio + test_ratio > 1:
        raise SystemExit(f"--valid_ratio {valid_ratio} and --test_ratio {test_ratio} add up to more than 1; "
                         "lower one of them")


def check_fold_count(samples, count, valid_ratio, by_subject):
    """SystemExit, before any detection, for a fold count the images (or persons) cannot fill, or a valid share
    that leaves a fold no training images."""
    units = len({sample.subject for sample in samples}) if by_subject else len(samples)
    what = "persons" if by_subject else "images"
    if count > units:
        raise SystemExit(f"--folds {count}: there are only {units} {what}; pass at most --folds {units}")
    if valid_ratio + 1 / count >= 1:
        raise SystemExit(f"--valid_ratio {valid_ratio} with --folds {count} leaves no training images (each fold's "
                         f"test part is 1/{count} of them); lower --valid_ratio or raise --folds")


def _draw(samples, candidates, target, rng, by_subject):
    """``target`` of the ``candidates`` drawn at random (whole subjects until that many when ``by_subject``)."""
    if by_subject:
        chosen = _draw_subjects([samples[index] for index in candidates], target, rng)
        return {index for index in candidates if samples[index].subject in chosen}
    order = list(candidates)
    rng.shuffle(order)
    return set(order[:target])


def _draw_subjects(samples, target, rng):
    """Subjects drawn at random until they hold ``target`` samples or more."""
    sizes = Counter(sample.subject for sample in samples)
    subjects = sorted(sizes)
    rng.shuffle(subjects)
    chosen, count = set(), 0
    for subject in subjects:
        if count >= target:
            break
        chosen.add(subject)
        count += sizes[subject]
    return chosen


def _random_parts(size, count, rng):
    """The indices 0..size-1 shuffled and dealt into ``count`` parts whose sizes differ by at most one."""
    order = list(range(size))
    rng.shuffle(order)
    return [set(order[fold::count]) for fold in range(count)]


def _subject_parts(samples, count, rng):
    """Whole subjects, in random order, each dealt to the part with the fewest samples so far (the first such):
    parts as even as persons allow, and with one part per person, leave-one-person-out."""
    members = {}
    for index, sample in enumerate(samples):
        members.setdefault(sample.subject, []).append(index)
    subjects = sorted(members)
    rng.shuffle(subjects)
    parts = [set() for _ in range(count)]
    for subject in subjects:
        smallest = min(range(count), key=lambda fold: len(parts[fold]))
        parts[smallest].update(members[subject])
    return parts
