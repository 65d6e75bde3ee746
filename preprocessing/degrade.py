"""Degraded copies of a data set's validation photos: a stand-in for photos from other cameras and eras.

    python preprocessing/degrade.py --data_dir data/utkface --dataset utkface --output_dir data/utkface_degraded
    python val.py --data_dir data/utkface_degraded --dataset utkface_degraded --model CKPT
    python preprocessing/degrade.py --data_dir data/utkface --dataset utkface --output_dir data/utkface_scanned \
        --style scan

Each photo of ``<dataset>_valid_align.csv`` is copied, seeded by its row. The
default style, ``mixed``, draws each of these with probability one half:
greyscale (black-and-white prints), a Gaussian blur (soft focus, scans), a
downscale and upscale (small faces, low resolution), then JPEG compression at
quality 20-50 (web and chat images). The ``scan`` style makes every photo a
scanned old print: a third of its resolution, sepia toning (augment.SEPIA)
with faded contrast, the scan's blur and grey film grain, each strength drawn
per photo. The pixels change, the geometry does not, so the CSV's angles and
boxes hold: the copy's CSV, ``<output_dir name>_valid_align.csv`` (with an
empty train CSV beside it), lists the same faces and labels. Comparing a
model's MAE here with its MAE on the clean photos measures how much it relies
on clean, colour, sharp input.
"""
import argparse
import io
import random
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageEnhance, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from augment import SEPIA  # noqa: E402
from files import check_output_dir  # noqa: E402
from records import Records, csv_path  # noqa: E402
from preprocessing import common  # noqa: E402

CHANCE = 0.5
BLUR_RADIUS = (0.8, 2.0)
DOWNSCALE = (0.35, 0.6)
SMALLEST_SIDE = 8
JPEG_QUALITY = (20, 50)
# the scan style: resolution kept, contrast kept (1 is the photo's), blur radius in pixels and grain sd in 0..255
SCAN_DOWNSCALE = 1 / 3
SCAN_CONTRAST = (0.45, 0.7)
SCAN_BLUR_RADIUS = (0.6, 1.2)
SCAN_GRAIN_SD = (4.0, 10.0)
PIXEL_MAX = 255
# the degraded photo is stored at a high quality, so that storing it adds nothing to the drawn damage
STORED_QUALITY = 95


def degrade(image, rng):
    """One photo of the mixed style, degraded by the choices ``rng`` draws."""
    width, height = image.size
    if rng.random() < CHANCE:
        image = image.convert("L").convert("RGB")
    if rng.random() < CHANCE:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(*BLUR_RADIUS)))
    if rng.random() < CHANCE:
        factor = rng.uniform(*DOWNSCALE)
        small = (max(SMALLEST_SIDE, int(width * factor)), max(SMALLEST_SIDE, int(height * factor)))
        image = image.resize(small, Image.BILINEAR).resize((width, height), Image.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=rng.randint(*JPEG_QUALITY))
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def scan(image, rng):
    """One photo as a scanned old print: low resolution, sepia with faded contrast, blur, then grey film grain."""
    width, height = image.size
    small = (max(SMALLEST_SIDE, round(width * SCAN_DOWNSCALE)), max(SMALLEST_SIDE, round(height * SCAN_DOWNSCALE)))
    image = image.resize(small, Image.BILINEAR).resize((width, height), Image.BILINEAR)
    image = image.convert("RGB", tuple(value for row in SEPIA for value in (*row, 0.0)))
    image = ImageEnhance.Contrast(image).enhance(rng.uniform(*SCAN_CONTRAST))
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(*SCAN_BLUR_RADIUS)))
    grain = np.random.default_rng(rng.getrandbits(64)).normal(0.0, rng.uniform(*SCAN_GRAIN_SD), (height, width, 1))
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.float64) + grain, 0, PIXEL_MAX).round().astype(np.uint8))


STYLES = {"mixed": degrade, "scan": scan}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", required=True, help="folder with <dataset>_valid_align.csv")
    parser.add_argument("--dataset", required=True, help="the CSV's prefix")
    parser.add_argument("--output_dir", required=True,
                        help="folder for the degraded photos and <its name>_valid_align.csv; pass it to val.py as --data_dir "
                             "with --dataset <its name>")
    parser.add_argument("--style", choices=list(STYLES), default="mixed",
                        help="mixed: greyscale, blur, low resolution and JPEG, each drawn per photo; scan: every photo a "
                             "scanned old print (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=common.DEFAULT_SEED, help="seed of the draws (default: %(default)s)")
    args = parser.parse_args(argv)
    records = Records(csv_path(args.data_dir, args.dataset, "valid"), args.data_dir)
    out = check_output_dir(args.output_dir, "--output_dir")
    (out / "img").mkdir(exist_ok=True)
    frame = pd.read_csv(records.path, skipinitialspace=True)
    frame.columns = [str(c).strip().lower() for c in frame.columns]
    photos = []
    for index, source in enumerate(records.files):
        name = f"img/{index:06d}.jpg"
        with Image.open(source) as image:
            made = STYLES[args.style](image.convert("RGB"), random.Random(f"{args.seed}:{index}"))
            made.save(out / name, quality=STORED_QUALITY)
        photos.append(name)
    frame["photo"] = photos
    name = out.resolve().name
    frame.to_csv(out / f"{name}_valid_align.csv", index=False)
    frame.iloc[:0].to_csv(out / f"{name}_train_align.csv", index=False)
    print(f"wrote {len(frame)} degraded photos ({args.style}) and {out / f'{name}_valid_align.csv'}")


if __name__ == "__main__":
    main()
