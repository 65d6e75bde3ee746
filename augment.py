"""Augmentation of whole training batches, on the training device.

Crops arrive as one uint8 batch from the crop cache. Every random choice is a
pure function of (run seed, epoch, the sample's position in the epoch's order),
drawn from a counter-based hash instead of a stateful generator, so a sample
is augmented the same way whatever batch it lands in, on any device, in any
process, and after a ``kill -9`` and ``--resume``; and a face that balanced
sampling draws several times in an epoch gets a new augmentation each time.
Geometry is one affine warp for the batch (``affine_grid`` + ``grid_sample``),
colour one 3x3 matrix and offset per face (a scanned print's sepia and fading
among them), and blur, a scan's blur and film grain, and JPEG artefacts run
only on the faces that drew them; nothing loops over faces in Python.

The ``AUG.*`` keys of defaults.py set every range and probability.
`albumentations_pipeline` builds the same augmentation per sample (the
original's path), for ``AUG.BACKEND albumentations`` and bench.py's baseline.
"""
import math
import os
import random

import numpy as np
import torch
import torch.nn.functional as F

from normalize import device_constant, float_planes

# albumentations (imported for AUG.BACKEND albumentations) would otherwise look for a newer version online
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

# constants of Chris Wellons' "lowbias32" integer hash
HASH_MULTIPLIERS = (np.uint32(0x7FEB352D), np.uint32(0x846CA68B))
HASH_SHIFTS = (16, 15, 16)
UNIT = float(2**32)
# ITU-R BT.601 luma, as JPEG and ToGray use
LUMA = (0.299, 0.587, 0.114)
PIXEL_MAX = 255.0
# a Gaussian kernel reaches this many sigmas on each side
BLUR_RADIUS_SIGMAS = 3.0
# blur sigmas are drawn from this share of AUG.BLUR_SIGMA up to all of it, so every blurred face is visibly blurred
BLUR_MIN_SHARE = 0.3

# One named stream per random choice: the streams of a face are independent.
STREAMS = ("FLIP", "AFFINE", "ANGLE", "SCALE", "SHIFT_X", "SHIFT_Y", "LIGHT", "BRIGHTNESS", "CONTRAST", "SATURATE",
           "SATURATION", "CAST", "CAST_R", "CAST_G", "CAST_B", "GAMMA_ON", "GAMMA", "GREY", "BLUR_ON", "BLUR", "JPEG_ON",
           "JPEG", "SCAN", "SCAN_FADE", "SCAN_BLUR", "SCAN_GRAIN", "SCAN_GRAIN_SEED")
(FLIP, AFFINE, ANGLE, SCALE, SHIFT_X, SHIFT_Y, LIGHT, BRIGHTNESS, CONTRAST, SATURATE, SATURATION,
 CAST, CAST_R, CAST_G, CAST_B, GAMMA_ON, GAMMA, GREY, BLUR_ON, BLUR, JPEG_ON, JPEG,
 SCAN, SCAN_FADE, SCAN_BLUR, SCAN_GRAIN, SCAN_GRAIN_SEED) = range(len(STREAMS))
# the sepia toning of an old print, RGB → RGB (the matrix of albumentations' ToSepia, so both backends tone alike)
SEPIA = ((0.393, 0.769, 0.189), (0.349, 0.686, 0.168), (0.272, 0.534, 0.131))

# JPEG (ITU-T T.81, Annex K) quantisation tables at quality 50
JPEG_BLOCK = 8
JPEG_LUMA_TABLE = (
    (16, 11, 10, 16, 24, 40, 51, 61), (12, 12, 14, 19, 26, 58, 60, 55),
    (14, 13, 16, 24, 40, 57, 69, 56), (14, 17, 22, 29, 51, 87, 80, 62),
    (18, 22, 37, 56, 68, 109, 103, 77), (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101), (72, 92, 95, 98, 112, 100, 103, 99))
JPEG_CHROMA_TABLE = (
    (17, 18, 24, 47, 99, 99, 99, 99), (18, 21, 26, 66, 99, 99, 99, 99),
    (24, 26, 56, 99, 99, 99, 99, 99), (47, 66, 99, 99, 99, 99, 99, 99),
    (99, 99, 99, 99, 99, 99, 99, 99), (99, 99, 99, 99, 99, 99, 99, 99),
    (99, 99, 99, 99, 99, 99, 99, 99), (99, 99, 99, 99, 99, 99, 99, 99))
# libjpeg's quality scaling: below 50 the tables grow as 50/q, above they shrink linearly to 1 at 100
JPEG_MID_QUALITY = 50
JPEG_MAX_QUALITY = 100
JPEG_LEVEL_SHIFT = 128.0
JPEG_CHROMA_OFFSET = 128.0
# JFIF's full-range YCbCr, and back
RGB_TO_YCBCR = ((0.299, 0.587, 0.114), (-0.168736, -0.331264, 0.5), (0.5, -0.418688, -0.081312))
YCBCR_TO_RGB = tuple(map(tuple, np.linalg.inv(np.array(RGB_TO_YCBCR, dtype=np.float32)).tolist()))
# 4:2:0 chroma: a colour value per 2x2 pixels, as most cameras and web images store it
CHROMA_SUBSAMPLING = 2


def hash32(x):
    """A well-mixed 32-bit hash of each element of a uint32 array (multiplication wraps mod 2**32)."""
    x = np.atleast_1d(np.asarray(x, dtype=np.uint32))
    x = x ^ (x >> np.uint32(HASH_SHIFTS[0]))
    x = x * HASH_MULTIPLIERS[0]
    x = x ^ (x >> np.uint32(HASH_SHIFTS[1]))
    x = x * HASH_MULTIPLIERS[1]
    return x ^ (x >> np.uint32(HASH_SHIFTS[2]))


def sample_keys(seed, epoch, positions):
    """One 32-bit key per sample: a hash chain over (seed, epoch, position in the epoch's order), each taken
    mod 2**32."""
    mod = lambda value: np.asarray(value, dtype=np.int64) % (2**32)  # noqa: E731
    base = hash32(hash32(mod(seed)) ^ mod(epoch).astype(np.uint32))
    return hash32(base ^ mod(positions).astype(np.uint32))


class Draws:
    """Uniform numbers in [0, 1) for each face, one independent stream per random choice.

    All streams of all faces come from one hash of a (faces, streams) table,
    in NumPy on the host: a few microseconds per batch, and the same numbers
    whatever device the pixels are on.
    """

    def __init__(self, keys):
        stream_keys = hash32(np.arange(1, len(STREAMS) + 1, dtype=np.uint32))
        self.table = hash32(np.asarray(keys, dtype=np.uint32).reshape(-1, 1) ^ stream_keys.reshape(1, -1)) / UNIT

    def uniform(self, stream):
        return self.table[:, stream]

    def symmetric(self, stream, limit):
        """Uniform in [-limit, limit]."""
        return (2.0 * self.uniform(stream) - 1.0) * limit

    def chance(self, stream, probability):
        return self.uniform(stream) < probability


class BatchAugmenter:
    """The training augmentation of defaults.py's AUG section, for whole uint8 batches."""

    def __init__(self, aug, seed):
        self.aug = aug
        self.seed = seed

    def __call__(self, images, epoch, positions):
        """uint8 (B, 3, H, W) RGB → augmented float32 in 0..255, the same shape; ``positions``: each sample's place in
        the epoch's order (runtime.EpochSampler)."""
        draws = Draws(sample_keys(self.seed, epoch, torch.as_tensor(positions).cpu().numpy()))
        device = images.device
        images = warp(float_planes(images), on(device, affine_matrices(draws, self.aug)))
        matrix, contrast, brightness, gamma = colour_transforms(draws, self.aug)
        images = adjust_colour(images, *on(device, (matrix, contrast, brightness, gamma)), gamma != 1.0)
        side = images.shape[-1]
        images = blur(images, *on(device, blur_choices(draws, self.aug, side)), blur_radius(self.aug.BLUR_SIGMA, side))
        images = scan_texture(images, draws, self.aug)
        return jpeg_artefacts(images, *on(device, jpeg_choices(draws, self.aug)))


def on(device, arrays):
    """NumPy parameters as float32 tensors on the pixels' device, copied without waiting for it. Which faces a step
    applies to (bool arrays) stays on the host: picking them from a mask on the device would make the host wait."""
    if isinstance(arrays, tuple):
        return tuple(on(device, array) for array in arrays)
    array = np.asarray(arrays)
    if array.dtype == np.bool_:
        return array
    return host_to_device(array.astype(np.float32), device)


def host_to_device(array, device):
    """A NumPy array on ``device`` without the host waiting: a GPU copies from pinned memory asynchronously, while a
    copy from pageable memory first waits for the work already queued."""
    tensor = torch.from_numpy(array)
    return (tensor.pin_memory() if device.type == "cuda" else tensor).to(device, non_blocking=True)


def affine_matrices(draws, aug):
    """(B, 2, 3) output → input matrices: undo the shift, rotate back, unzoom, then mirror.

    A face that drew no warp gets the identity (or a mirror), which bilinear
    sampling at the pixel centres reproduces exactly.
    """
    flip = np.where(draws.chance(FLIP, aug.FLIP_P), -1.0, 1.0)
    active = draws.chance(AFFINE, aug.AFFINE_P)
    angle = np.deg2rad(draws.symmetric(ANGLE, aug.ROTATE)) * active
    scale = 1.0 + draws.symmetric(SCALE, aug.SCALE) * active
    # normalised coordinates span 2 per side
    shift_x = 2.0 * draws.symmetric(SHIFT_X, aug.SHIFT) * active
    shift_y = 2.0 * draws.symmetric(SHIFT_Y, aug.SHIFT) * active
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
    return np.stack([
        np.stack([cos * flip, sin * flip, -(cos * shift_x + sin * shift_y) * flip], 1),
        np.stack([-sin, cos, sin * shift_x - cos * shift_y], 1),
    ], 1)


def colour_transforms(draws, aug):
    """Per face: a 3x3 colour matrix (cast, then saturation or greyscale, then a scan's sepia), contrast (a scan's
    fading lowers it), brightness and gamma."""
    gains = 1.0 + np.stack([draws.symmetric(s, aug.CAST) for s in (CAST_R, CAST_G, CAST_B)], 1) \
        * draws.chance(CAST, aug.CAST_P).reshape(-1, 1)
    saturation = 1.0 + draws.symmetric(SATURATION, aug.SATURATION) * draws.chance(SATURATE, aug.SATURATION_P)
    saturation = np.where(draws.chance(GREY, aug.GREY_P), 0.0, saturation).reshape(-1, 1, 1)
    grey = np.ones((3, 1)) * np.asarray(LUMA).reshape(1, 3)
    matrix = (saturation * np.eye(3) + (1.0 - saturation) * grey) * gains.reshape(-1, 1, 3)
    scanned = draws.chance(SCAN, aug.SCAN_P)
    matrix = np.where(scanned.reshape(-1, 1, 1), np.asarray(SEPIA) @ matrix, matrix)
    light = draws.chance(LIGHT, aug.LIGHT_P)
    contrast = 1.0 + draws.symmetric(CONTRAST, aug.CONTRAST) * light
    contrast = contrast * np.where(scanned, 1.0 - aug.SCAN_FADE * draws.uniform(SCAN_FADE), 1.0)
    brightness = draws.symmetric(BRIGHTNESS, aug.BRIGHTNESS) * light * PIXEL_MAX
    gamma = np.where(draws.chance(GAMMA_ON, aug.GAMMA_P), 1.0 + draws.symmetric(GAMMA, aug.GAMMA), 1.0)
    return matrix, contrast, brightness, gamma


def blur_radius(max_sigma_share, side):
    """Half-width of the blur kernels: fixed by the largest sigma (a share of the crop side), so a face blurs alike
    in any batch."""
    return max(1, math.ceil(BLUR_RADIUS_SIGMAS * max_sigma_share * side))


def blur_choices(draws, aug, side):
    """Which faces blur, and each one's sigma in pixels (a share of the crop side)."""
    max_sigma = aug.BLUR_SIGMA * side
    sigmas = max_sigma * (BLUR_MIN_SHARE + (1.0 - BLUR_MIN_SHARE) * draws.uniform(BLUR))
    return draws.chance(BLUR_ON, aug.BLUR_P), sigmas


def scan_choices(draws, aug, side):
    """Which faces look like a scanned print (their sepia and fading are in `colour_transforms`), each one's scan
    blur sigma in pixels (drawn as `blur_choices` draws), and each one's film grain, as an sd in 0..255 units."""
    sigmas = aug.SCAN_BLUR * side * (BLUR_MIN_SHARE + (1.0 - BLUR_MIN_SHARE) * draws.uniform(SCAN_BLUR))
    return draws.chance(SCAN, aug.SCAN_P), sigmas, aug.SCAN_GRAIN * PIXEL_MAX * draws.uniform(SCAN_GRAIN)


def grain_noise(draws, chosen, sds, size):
    """(chosen faces, 1, H, W) Gaussian film grain, one grey value per pixel, scaled by each face's sd.

    Every pixel's numbers hash from the face's own key, as every other draw does, so the grain is the same in
    any batch, on any device and after a resume; Box–Muller turns two uniforms into a Gaussian.
    """
    height, width = size
    seeds = (draws.uniform(SCAN_GRAIN_SEED)[chosen] * UNIT).astype(np.uint32)
    pixels = hash32(np.arange(2 * height * width, dtype=np.uint32))
    uniforms = hash32(seeds.reshape(-1, 1) ^ pixels.reshape(1, -1)) / UNIT
    first, second = uniforms[:, :height * width], uniforms[:, height * width:]
    gaussian = np.sqrt(-2.0 * np.log1p(-first)) * np.cos(2.0 * math.pi * second)
    return (gaussian * sds[chosen].reshape(-1, 1)).reshape(-1, 1, height, width)


def scan_texture(images, draws, aug):
    """The scan's blur, then film grain kept in range, on the faces that drew a scan."""
    side = images.shape[-1]
    chosen, sigmas, grain_sds = scan_choices(draws, aug, side)
    if not chosen.any():
        return images
    images = blur(images, chosen, on(images.device, sigmas), blur_radius(aug.SCAN_BLUR, side))
    noise = on(images.device, grain_noise(draws, chosen, grain_sds, images.shape[-2:]))
    return _on_subset(images, chosen, lambda subset, positions: (subset + noise).clamp_(0.0, PIXEL_MAX))


def jpeg_choices(draws, aug):
    """Which faces get JPEG artefacts, and each one's quality, between AUG.JPEG_QUALITY and 100."""
    qualities = np.round(aug.JPEG_QUALITY + (JPEG_MAX_QUALITY - aug.JPEG_QUALITY) * draws.uniform(JPEG))
    return draws.chance(JPEG_ON, aug.JPEG_P), qualities


def warp(images, theta):
    """Flip, rotate, zoom and shift every face in one ``grid_sample``; black comes in at the edges."""
    grid = affine_grid(theta, *images.shape[2:])
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def affine_grid(theta, height, width):
    """``F.affine_grid(theta, ..., align_corners=False)`` written as outer sums: a fraction of its cost on a CPU."""
    xs = (2.0 * torch.arange(width, device=theta.device, dtype=theta.dtype) + 1.0) / width - 1.0
    ys = (2.0 * torch.arange(height, device=theta.device, dtype=theta.dtype) + 1.0) / height - 1.0
    grid = torch.empty(len(theta), height, width, 2, device=theta.device, dtype=theta.dtype)
    for axis in range(2):
        torch.add((theta[:, axis, 0:1] * xs).unsqueeze(1), (theta[:, axis, 1:2] * ys + theta[:, axis, 2:3]).unsqueeze(2),
                  out=grid[..., axis])
    return grid


def adjust_colour(images, matrix, contrast, brightness, gamma, gamma_on):
    """Colour matrix, contrast about the mean grey and brightness in one pass; then gamma where ``gamma_on`` says.

    The mean grey of the mixed image is the colour matrix applied to the
    mean colour, so contrast and brightness fold into the same matrix product.
    """
    count = images.shape[0]
    flat = images.contiguous().view(count, 3, -1)
    luma = device_constant(LUMA, images.device)
    mean_grey = torch.bmm(matrix, flat.mean(2, keepdim=True)).squeeze(2) @ luma
    offset = ((1.0 - contrast) * mean_grey + brightness).view(-1, 1, 1).expand(count, 3, 1)
    images = torch.baddbmm(offset, contrast.view(-1, 1, 1) * matrix, flat).clamp_(0.0, PIXEL_MAX).view_as(images)
    return _on_subset(images, gamma_on,
                      lambda subset, positions: PIXEL_MAX * (subset / PIXEL_MAX).pow(gamma[positions].view(-1, 1, 1, 1)))


def _on_subset(images, chosen, transform):
    """Apply ``transform(subset, positions)`` only to the faces where ``chosen`` (a NumPy mask) is set, in place."""
    if chosen.any():
        positions = host_to_device(np.flatnonzero(chosen), images.device)
        images[positions] = transform(images[positions], positions)
    return images


def gaussian_kernels(sigmas, radius):
    """(N, 2 * radius + 1) normalised 1-D Gaussian kernels."""
    offsets = torch.arange(-radius, radius + 1, device=sigmas.device, dtype=torch.float32)
    kernels = torch.exp(-0.5 * (offsets.view(1, -1) / sigmas.view(-1, 1)) ** 2)
    return kernels / kernels.sum(1, keepdim=True)


def blur(images, chosen, sigmas, radius):
    """Gaussian blur with a per-face sigma: soft focus, motion, low resolution."""

    def apply(subset, positions):
        count, channels, height, width = subset.shape
        kernels = gaussian_kernels(sigmas[positions], radius).repeat_interleave(channels, 0)
        planes = F.pad(subset.reshape(1, count * channels, height, width), [radius] * 4, mode="replicate")
        planes = F.conv2d(planes, kernels.view(-1, 1, 1, 2 * radius + 1), groups=count * channels)
        planes = F.conv2d(planes, kernels.view(-1, 1, 2 * radius + 1, 1), groups=count * channels)
        return planes.view(count, channels, height, width)

    return _on_subset(images, chosen, apply)


def jpeg_tables(qualities, device):
    """(N, 2, 8, 8) luma and chroma quantisation tables for each quality, scaled as libjpeg does."""
    qualities = qualities.clamp(1, JPEG_MAX_QUALITY)
    scale = torch.where(qualities < JPEG_MID_QUALITY, 5000.0 / qualities, 200.0 - 2.0 * qualities)
    base = device_constant((JPEG_LUMA_TABLE, JPEG_CHROMA_TABLE), device)
    return torch.floor((base.unsqueeze(0) * scale.view(-1, 1, 1, 1) + 50.0) / 100.0).clamp(1.0, 255.0)


def dct_matrix(device):
    """The orthonormal 8-point DCT-II, as a matrix: JPEG's transform of each row and column of a block."""
    n = torch.arange(JPEG_BLOCK, dtype=torch.float32, device=device)
    matrix = torch.cos(math.pi * (2 * n.view(1, -1) + 1) * n.view(-1, 1) / (2 * JPEG_BLOCK))
    matrix[0] /= math.sqrt(2.0)
    return matrix * math.sqrt(2.0 / JPEG_BLOCK)


def quantise_blocks(plane, tables, dct):
    """Round the DCT coefficients of every 8x8 block of (N, H, W) planes to multiples of the tables."""
    count, height, width = plane.shape
    blocks = plane.view(count, height // JPEG_BLOCK, JPEG_BLOCK, width // JPEG_BLOCK, JPEG_BLOCK).transpose(2, 3)
    coefficients = dct @ (blocks - JPEG_LEVEL_SHIFT) @ dct.T
    table = tables.view(count, 1, 1, JPEG_BLOCK, JPEG_BLOCK)
    blocks = dct.T @ (torch.round(coefficients / table) * table) @ dct + JPEG_LEVEL_SHIFT
    return blocks.transpose(2, 3).reshape(count, height, width)


def jpeg_compress(images, qualities):
    """What a JPEG round trip at each face's quality does: 4:2:0 chroma, 8x8 DCT blocks, quantisation."""
    height, width = images.shape[-2:]
    unit = JPEG_BLOCK * CHROMA_SUBSAMPLING
    pad_h, pad_w = -height % unit, -width % unit
    padded = F.pad(images, [0, pad_w, 0, pad_h], mode="replicate")
    to_ycbcr = device_constant(RGB_TO_YCBCR, images.device)
    ycbcr = torch.einsum("ij,njhw->nihw", to_ycbcr, padded)
    ycbcr[:, 1:] += JPEG_CHROMA_OFFSET
    tables = jpeg_tables(qualities, images.device)
    dct = dct_matrix(images.device)
    luma = quantise_blocks(ycbcr[:, 0], tables[:, 0], dct)
    chroma = F.avg_pool2d(ycbcr[:, 1:], CHROMA_SUBSAMPLING)
    chroma = torch.stack([quantise_blocks(chroma[:, c], tables[:, 1], dct) for c in range(2)], 1)
    chroma = F.interpolate(chroma, scale_factor=CHROMA_SUBSAMPLING, mode="bilinear", align_corners=False)
    ycbcr = torch.cat([luma.unsqueeze(1), chroma - JPEG_CHROMA_OFFSET], 1)
    rgb = torch.einsum("ij,njhw->nihw", device_constant(YCBCR_TO_RGB, images.device), ycbcr)
    return rgb[:, :, :height, :width].clamp(0.0, PIXEL_MAX)


def jpeg_artefacts(images, chosen, qualities):
    """JPEG compression at a per-face quality, as web and phone photos have."""
    return _on_subset(images, chosen, lambda subset, positions: jpeg_compress(subset, qualities[positions]))


def albumentations_pipeline(aug, img_size):
    """The same augmentation per sample with albumentations (the original's path), from the same AUG keys."""
    import albumentations as A
    import cv2

    steps = [
        A.HorizontalFlip(p=aug.FLIP_P),
        # keep_ratio: one zoom for x and y, as the batch path (albumentations' default zooms them independently)
        A.Affine(scale=(1 - aug.SCALE, 1 + aug.SCALE), keep_ratio=True, translate_percent=(-aug.SHIFT, aug.SHIFT),
                 rotate=(-aug.ROTATE, aug.ROTATE), border_mode=cv2.BORDER_CONSTANT, fill=0, p=aug.AFFINE_P),
        A.MultiplicativeNoise(multiplier=(1 - aug.CAST, 1 + aug.CAST), per_channel=True, p=aug.CAST_P),
        A.ColorJitter(brightness=0, contrast=0, saturation=(1 - aug.SATURATION, 1 + aug.SATURATION), hue=0,
                      p=aug.SATURATION_P),
        A.ToGray(p=aug.GREY_P),
        # contrast about the mean grey (ColorJitter's, as the batch path does; RandomBrightnessContrast's scales
        # about black), then brightness, together with one probability
        A.Sequential([
            A.ColorJitter(brightness=0, contrast=(1 - aug.CONTRAST, 1 + aug.CONTRAST), saturation=0, hue=0, p=1),
            A.RandomBrightnessContrast(brightness_limit=aug.BRIGHTNESS, contrast_limit=0, p=1),
        ], p=aug.LIGHT_P),
        A.RandomGamma(gamma_limit=(100 * (1 - aug.GAMMA), 100 * (1 + aug.GAMMA)), p=aug.GAMMA_P),
    ]
    if aug.BLUR_P > 0:
        max_sigma = aug.BLUR_SIGMA * img_size
        steps.append(A.GaussianBlur(sigma_limit=(BLUR_MIN_SHARE * max_sigma, max_sigma), p=aug.BLUR_P))
    if aug.SCAN_P > 0:
        steps.append(scan_steps(A, aug, img_size))
    if aug.JPEG_P > 0:
        steps.append(A.ImageCompression(quality_range=(aug.JPEG_QUALITY, JPEG_MAX_QUALITY), p=aug.JPEG_P))
    return A.Compose(steps)


def scan_steps(A, aug, img_size):
    """A scanned print, as the batch path makes it: sepia, faded contrast, the scan's blur and grey film grain."""
    max_sigma = aug.SCAN_BLUR * img_size
    return A.Sequential([
        A.ToSepia(p=1),
        A.ColorJitter(brightness=0, contrast=(1 - aug.SCAN_FADE, 1), saturation=0, hue=0, p=1),
        A.GaussianBlur(sigma_limit=(BLUR_MIN_SHARE * max_sigma, max_sigma), p=1),
        A.GaussNoise(std_range=(0, aug.SCAN_GRAIN), per_channel=False, p=1),
    ], p=aug.SCAN_P)


class SeededPipeline:
    """The albumentations pipeline, called with one seed per sample, so a face is augmented the same way in any
    loader worker and after a resume.

    The seed starts one random stream that all the transforms draw from in turn. ``Compose.set_random_seed``
    would instead give every transform its own generator with the same seed: each transform's first draw
    (whether it applies) and its parameters would then be equal, so the transforms fire together and the
    augmentation is harsher than its probabilities say.
    """

    def __init__(self, aug, img_size):
        self.pipeline = albumentations_pipeline(aug, img_size)

    def __call__(self, image, seed):
        self.pipeline.set_random_state(np.random.default_rng(seed), random.Random(seed))
        return self.pipeline(image=image)["image"]
