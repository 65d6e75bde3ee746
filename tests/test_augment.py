"""Batched augmentation on real UTKFace crops: exact properties, determinism, and the same effect as albumentations."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

import augment
import draw_augmentations
import training_data
from conftest import ROOT, utkface_files, write_csv
from crop_cache import build_crop_cache
from dataset import CachedBatches, FaceDataset
from defaults import get_cfg_defaults, merge_opts
from records import Records
from runtime import EpochSampler, Runtime, make_loader

SIDE = 64
PIXEL_HALF = 127
ALL_OFF = ["AUG.FLIP_P", "0.0", "AUG.AFFINE_P", "0.0", "AUG.LIGHT_P", "0.0", "AUG.SATURATION_P", "0.0", "AUG.CAST_P",
           "0.0", "AUG.GAMMA_P", "0.0", "AUG.GREY_P", "0.0", "AUG.BLUR_P", "0.0", "AUG.JPEG_P", "0.0"]


def aug_config(*overrides):
    return merge_opts(get_cfg_defaults(), list(overrides)).AUG


@pytest.fixture(scope="module")
def crops():
    """Eight real faces as a uint8 (8, 3, SIDE, SIDE) batch."""
    images = [np.array(Image.open(path).convert("RGB").resize((SIDE, SIDE))) for path, *_ in utkface_files()[:8]]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def test_every_face_is_augmented_by_its_own_key_whatever_its_batch(crops):
    augmenter = augment.BatchAugmenter(aug_config("AUG.GREY_P", "0.3", "AUG.BLUR_P", "0.3", "AUG.JPEG_P", "0.3",
                                                  "AUG.CAST_P", "0.3", "AUG.SCAN_P", "0.5"), seed=7)
    indices = torch.arange(100, 108)
    whole = augmenter(crops, 3, indices)
    order = torch.tensor([5, 0, 7])
    part = augmenter(crops[order], 3, indices[order])
    torch.testing.assert_close(part, whole[order], rtol=0, atol=1e-3)
    torch.testing.assert_close(augmenter(crops, 3, indices), whole, rtol=0, atol=0)
    assert not torch.equal(augmenter(crops, 4, indices), whole), "another epoch draws anew"
    assert not torch.equal(augment.BatchAugmenter(augmenter.aug, seed=8)(crops, 3, indices), whole), "another seed too"


def test_draws_are_uniform_and_probabilities_hold():
    draws = augment.Draws(augment.sample_keys(0, 0, np.arange(20_000)))
    values = draws.uniform(augment.FLIP)
    assert 0.0 <= values.min() and values.max() < 1.0
    counts, _ = np.histogram(values, bins=10, range=(0, 1))
    assert counts.min() > 1_800 and counts.max() < 2_200, "each tenth holds 2,000 +- 10%"
    assert abs(draws.chance(augment.GREY, 0.3).mean() - 0.3) < 0.02
    other = draws.uniform(augment.GREY)
    assert abs(np.corrcoef(values, other)[0, 1]) < 0.05, "streams are independent"


def test_nothing_drawn_leaves_the_crops_exactly_as_they_were(crops):
    out = augment.BatchAugmenter(aug_config(*ALL_OFF), seed=0)(crops, 0, torch.arange(8))
    assert torch.equal(out, crops.float())


def test_flip_is_an_exact_mirror_and_grey_is_the_luma(crops):
    flipped = augment.BatchAugmenter(aug_config(*ALL_OFF, "AUG.FLIP_P", "1.0"), seed=0)(crops, 0, torch.arange(8))
    torch.testing.assert_close(flipped, crops.float().flip(3), rtol=0, atol=1e-3)
    grey = augment.BatchAugmenter(aug_config(*ALL_OFF, "AUG.GREY_P", "1.0"), seed=0)(crops, 0, torch.arange(8))
    luma = torch.einsum("c,nchw->nhw", torch.tensor(augment.LUMA), crops.float())
    for channel in range(3):
        torch.testing.assert_close(grey[:, channel], luma, rtol=0, atol=1e-3)


def test_brightness_and_contrast_keep_the_range(crops):
    out = augment.BatchAugmenter(aug_config(*ALL_OFF, "AUG.LIGHT_P", "1.0", "AUG.BRIGHTNESS", "0.5",
                                            "AUG.CONTRAST", "0.5"), seed=1)(crops, 0, torch.arange(8))
    assert float(out.min()) >= 0.0 and float(out.max()) <= 255.0
    assert not torch.equal(out, crops.float())


# a blur sigma this small is a kernel of one tap: the scan's blur leaves the pixels as they are
NO_BLUR = "1e-6"


def sepia(crops):
    return torch.einsum("ij,njhw->nihw", torch.tensor(augment.SEPIA), crops.float()).clamp(0.0, 255.0)


def test_a_scan_tones_sepia_and_fades_the_contrast(crops):
    scan = ["AUG.SCAN_P", "1.0", "AUG.SCAN_GRAIN", "0.0", "AUG.SCAN_BLUR", NO_BLUR]
    toned = augment.BatchAugmenter(aug_config(*ALL_OFF, *scan, "AUG.SCAN_FADE", "0.0"), seed=0)(crops, 0, torch.arange(8))
    torch.testing.assert_close(toned, sepia(crops), rtol=0, atol=1e-3)
    faded = augment.BatchAugmenter(aug_config(*ALL_OFF, *scan, "AUG.SCAN_FADE", "0.9"), seed=0)(crops, 0, torch.arange(8))
    spread = lambda x: x.mean(1).std(dim=(1, 2))  # noqa: E731
    assert bool((spread(faded) < spread(toned) + 1e-3).all()) and float(spread(faded).sum()) < 0.9 * float(spread(toned).sum())


def test_a_scans_grain_is_grey_centred_and_the_same_in_any_batch(crops):
    aug = aug_config(*ALL_OFF, "AUG.SCAN_P", "1.0", "AUG.SCAN_FADE", "0.0", "AUG.SCAN_BLUR", NO_BLUR,
                     "AUG.SCAN_GRAIN", "0.05")
    out = augment.BatchAugmenter(aug, seed=0)(crops, 0, torch.arange(8))
    inside = (sepia(crops) > 20).all(1, keepdim=True) & (sepia(crops) < 235).all(1, keepdim=True)
    grain = (out - sepia(crops)) * inside
    torch.testing.assert_close(grain[:, 0], grain[:, 1], rtol=0, atol=1e-3)
    torch.testing.assert_close(grain[:, 0], grain[:, 2], rtol=0, atol=1e-3)
    sds = augment.scan_choices(augment.Draws(augment.sample_keys(0, 0, np.arange(8))), aug, SIDE)[2]
    measured = np.array([float(g[m].std()) for g, m in zip(grain[:, 0], inside[:, 0])])
    np.testing.assert_allclose(measured, sds, rtol=0.1, atol=0.3)
    assert abs(float(grain.sum() / inside.sum())) < 0.5, "grain adds no brightness"
    alone = augment.BatchAugmenter(aug, seed=0)(crops[3:4], 0, torch.arange(3, 4))
    torch.testing.assert_close(alone, out[3:4], rtol=0, atol=1e-3)


def psnr(a, b):
    return 10 * np.log10(255.0**2 / np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))


@pytest.mark.parametrize("quality", [30, 60, 90])
def test_jpeg_artefacts_match_a_real_jpeg_round_trip(crops, quality):
    """Ours against PIL's encoder at the same quality: far closer to it than either is to the original."""
    ours = augment.jpeg_compress(crops.float(), torch.full((8,), float(quality)))
    ours = ours.round().permute(0, 2, 3, 1).numpy().astype(np.uint8)
    originals = crops.permute(0, 2, 3, 1).numpy()
    real = []
    for image in originals:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "JPEG", quality=quality)
        real.append(np.array(Image.open(buffer)))
    real = np.stack(real)
    assert psnr(ours, real) > 38.0
    assert abs(psnr(ours, originals) - psnr(real, originals)) < 1.0, "as much loss as a real JPEG"


def test_blur_softens_every_chosen_face(crops):
    out = augment.BatchAugmenter(aug_config(*ALL_OFF, "AUG.BLUR_P", "1.0", "AUG.BLUR_SIGMA", "0.03"),
                                 seed=0)(crops, 0, torch.arange(8))
    detail = lambda x: (x[..., 1:] - x[..., :-1]).abs().mean(dim=(1, 2, 3))  # noqa: E731
    before, after = detail(crops.float()), detail(out)
    assert bool((after < 0.9 * before).all()) and float(after.mean()) < 0.7 * float(before.mean())


def summary(images):
    """Mean grey, its spread, share of black (border) pixels and colourfulness, over many augmented copies."""
    grey = images.mean(1)
    return np.array([float(grey.mean()), float(grey.mean((1, 2)).std()), float((images.amax(1) < 1).float().mean()),
                     float((images - grey.unsqueeze(1)).abs().mean())])


def test_same_effect_as_the_albumentations_pipeline(crops):
    """Many augmented copies of one real face: the two backends agree on brightness, its spread, borders and colour."""
    aug = aug_config("AUG.GREY_P", "0.2", "AUG.CAST_P", "0.3", "AUG.BLUR_P", "0.2", "AUG.JPEG_P", "0.2",
                     "AUG.SCAN_P", "0.3")
    copies = 400
    face = crops[:1].expand(copies, -1, -1, -1)
    ours = augment.BatchAugmenter(aug, seed=0)(face, 0, torch.arange(copies))
    pipeline = augment.SeededPipeline(aug, SIDE)
    image = crops[0].permute(1, 2, 0).numpy()
    theirs = [pipeline(image, index) for index in range(copies)]
    theirs = torch.from_numpy(np.stack(theirs)).permute(0, 3, 1, 2).float()
    ours_stats, their_stats = summary(ours), summary(theirs)
    np.testing.assert_allclose(ours_stats[[0, 1, 3]], their_stats[[0, 1, 3]], rtol=0.1)
    assert abs(ours_stats[2] - their_stats[2]) < 0.015, "black borders from the warp cover a similar share"


def test_both_backends_make_the_same_scan(crops):
    """Many scans of one real face: the same warm tone, brightness, fading and loss of detail in both backends."""
    aug = aug_config(*ALL_OFF, "AUG.SCAN_P", "1.0")
    copies = 400
    ours = augment.BatchAugmenter(aug, seed=0)(crops[:1].expand(copies, -1, -1, -1), 0, torch.arange(copies))
    pipeline = augment.SeededPipeline(aug, SIDE)
    image = crops[0].permute(1, 2, 0).numpy()
    theirs = torch.from_numpy(np.stack([pipeline(image, index) for index in range(copies)])).permute(0, 3, 1, 2).float()
    looks = lambda x: np.array([*x.mean((0, 2, 3)).tolist(), float(x.mean(1).std((1, 2)).mean()),  # noqa: E731
                                float((x[..., 1:] - x[..., :-1]).abs().mean())])
    np.testing.assert_allclose(looks(ours), looks(theirs), rtol=0.05)
    assert not np.allclose(looks(ours), looks(crops[:1].float()), rtol=0.05), "a scan changes the face"


def test_per_sample_transforms_draw_independently(crops):
    """Flip and greyscale at 0.5 each, over 400 seeds: all four combinations come up about 100 times each.

    Seeding every albumentations transform with the same seed would make them fire together (only "both"
    and "neither"), an augmentation harsher than its probabilities say.
    """
    aug = aug_config("AUG.FLIP_P", "0.5", "AUG.GREY_P", "0.5", "AUG.AFFINE_P", "0", "AUG.LIGHT_P", "0",
                     "AUG.SATURATION_P", "0", "AUG.GAMMA_P", "0")
    image = crops[0].permute(1, 2, 0).numpy().copy()
    image[:, :SIDE // 4] = 255  # a white band on the left, so that a flip shows
    pipeline = augment.SeededPipeline(aug, SIDE)
    combinations = {}
    for seed in range(400):
        out = pipeline(image, seed).astype(np.int16)
        grey = bool(np.all(out[..., 0] == out[..., 1]) and np.all(out[..., 1] == out[..., 2]))
        flipped = bool(out[:, -(SIDE // 4):].mean() > out[:, :SIDE // 4].mean())
        combinations[flipped, grey] = combinations.get((flipped, grey), 0) + 1
    assert len(combinations) == 4 and min(combinations.values()) >= 60, combinations
    assert pipeline(image, 7).tobytes() == pipeline(image, 7).tobytes(), "one seed, one augmentation"


def test_both_backends_zoom_width_and_height_alike():
    """A face's width to its height is an age cue: zooming keeps it, as a white disc stays round in both backends."""
    import cv2

    disc = np.zeros((SIDE, SIDE, 3), np.uint8)
    cv2.circle(disc, (SIDE // 2, SIDE // 2), SIDE // 4, (255, 255, 255), -1)
    aug = aug_config(*ALL_OFF, "AUG.AFFINE_P", "1.0", "AUG.ROTATE", "0.0", "AUG.SHIFT", "0.0", "AUG.SCALE", "0.3")
    copies = 20
    batch = augment.BatchAugmenter(aug, seed=0)(torch.from_numpy(disc).permute(2, 0, 1)[None].expand(copies, -1, -1, -1),
                                                0, torch.arange(copies))
    pipeline = augment.SeededPipeline(aug, SIDE)
    images = {"batch": list(batch.permute(0, 2, 3, 1).numpy()), "albumentations": [pipeline(disc, s) for s in range(copies)]}
    for backend, zoomed in images.items():
        sides = []
        for image in zoomed:
            inside = image[..., 0] > PIXEL_HALF
            rows, columns = np.flatnonzero(inside.any(1)), np.flatnonzero(inside.any(0))
            sides.append((columns[-1] - columns[0], rows[-1] - rows[0]))
        assert len({height for _, height in sides}) > 1, f"{backend}: the zoom varies"
        assert all(abs(width - height) <= 1 for width, height in sides), f"{backend}: (width, height) {sides}"


# a warp and a light change on every sample: each draw of them is continuous, so two samples' augmentations differ
# unless their random choices are the same
ALWAYS_WARPED = ["AUG.AFFINE_P", "1.0", "AUG.LIGHT_P", "1.0"]
CPU = Runtime(torch.device("cpu"))


def training_set(tmp_path, rows, side=32):
    path = tmp_path / "k_train_align.csv"
    write_csv(path, rows)
    records = Records(path, tmp_path)
    return records, build_crop_cache(records, side, 0.0, tmp_path / "cache", 0, "k_train")


def augmented_samples(records, crops, sampler, batch_size, backend, cfg):
    """(position, face, augmented image) of every sample an epoch of ``sampler`` yields, through the training path
    of ``backend``: gathered from the crop cache and augmented as a batch, or per sample in the loader."""
    if backend == "batch":
        augmenter = augment.BatchAugmenter(cfg.AUG, cfg.TRAIN.SEED)
        batches = ((batch, augmenter(batch["image"], sampler.epoch, batch["position"]))
                   for batch in CachedBatches(records, crops, sampler, batch_size, CPU))
    else:
        dataset = FaceDataset(records, crops.shape[1], 0.0, augment=augment.SeededPipeline(cfg.AUG, crops.shape[1]),
                              crops=crops, seed=cfg.TRAIN.SEED)
        batches = ((batch, batch["image"].float()) for batch in make_loader(dataset, sampler, batch_size, 0, CPU))
    return [(int(position), int(index), image) for batch, images in batches
            for position, index, image in zip(batch["position"], batch["index"], images)]


@pytest.mark.parametrize("backend", ["batch", "albumentations"])
def test_a_face_that_balanced_sampling_draws_many_times_is_augmented_anew_each_time(tmp_path, backend):
    """19 faces of one age bin and one face alone in another: with TRAIN.BALANCE 2 the lone face is most of every
    epoch, and each of its draws gets its own augmentation (keyed on its position in the epoch, not on the face)."""
    rows = utkface_files()
    common = [row for row in rows if row[1] == 26][:19]
    rare = next(row for row in rows if row[1] == 80)
    records, crops = training_set(tmp_path, common + [rare])
    cfg = merge_opts(get_cfg_defaults(), ALWAYS_WARPED + ["TRAIN.BALANCE", "2.0"])
    sampler = EpochSampler(len(records), seed=cfg.TRAIN.SEED, batch_size=8,
                           weights=training_data.sampling_weights(records, cfg))
    sampler.set_epoch(1)
    copies = [image for _, index, image in augmented_samples(records, crops, sampler, 8, backend, cfg)
              if index == len(common)]
    assert len(copies) >= 10, "the lone face is drawn again and again"
    assert len({copy.numpy().tobytes() for copy in copies}) == len(copies), "every draw augmented differently"


@pytest.mark.parametrize("backend", ["batch", "albumentations"])
def test_a_samples_augmentation_is_the_same_for_any_batch_size_process_count_and_resume(tmp_path, backend):
    """Without balancing: one epoch in batches of 8 in one process, in batches of 4 on each of two processes, and
    resumed after 8 faces give every position the same face and the same augmentation; a second pass repeats it."""
    records, crops = training_set(tmp_path, utkface_files()[:24])
    cfg = merge_opts(get_cfg_defaults(), ALWAYS_WARPED)

    def epoch(world_size, batch_size, skip=0):
        samples = {}
        for rank in range(world_size):
            sampler = EpochSampler(len(records), seed=cfg.TRAIN.SEED, rank=rank, world_size=world_size,
                                   batch_size=batch_size)
            sampler.set_epoch(2, skip=skip)
            samples.update({position: (index, image) for position, index, image
                            in augmented_samples(records, crops, sampler, batch_size, backend, cfg)})
        return samples

    reference = epoch(1, 8)
    assert sorted(reference) == list(range(24)) and len({index for index, _ in reference.values()}) == 24
    for samples in (epoch(1, 8), epoch(2, 4), epoch(1, 8, skip=8)):
        assert set(samples) <= set(reference)
        for position, (index, image) in samples.items():
            assert index == reference[position][0]
            torch.testing.assert_close(image, reference[position][1], rtol=0, atol=1e-3)
    assert len(epoch(1, 8, skip=8)) == 16
    assert all(torch.equal(image, reference[position][1]) for position, (_, image) in epoch(1, 8).items()), \
        "the same run, bit for bit"


def test_the_drawing_script_shows_the_same_crop_to_both_backends_and_their_copies_beside_it(tmp_path):
    """One row per backend: the aligned crop, then its augmented copies; both rows start from the same crop."""
    size, copies = 48, 3
    out = tmp_path / "augmentation.png"
    draw_augmentations.main([str(ROOT / "samples" / "astronaut.jpg"), str(out), "--size", str(size),
                             "--copies", str(copies), "AUG.GREY_P", "1"])
    grid = np.asarray(Image.open(out).convert("RGB"))
    assert grid.shape == (2 * size, size * (copies + 2), 3)
    crops = [grid[row * size:(row + 1) * size, size:2 * size] for row in range(2)]
    assert np.array_equal(crops[0], crops[1])
    for row in range(2):
        for column in range(2, copies + 2):
            copy = grid[row * size:(row + 1) * size, column * size:(column + 1) * size].astype(int)
            assert (copy[..., 0] == copy[..., 1]).all() and (copy[..., 1] == copy[..., 2]).all(), "AUG.GREY_P 1 greys every copy"

