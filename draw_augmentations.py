"""Draw a photo's face augmented by both backends (augment.py's batches and albumentations), to compare them by eye.

    python draw_augmentations.py samples/astronaut.jpg docs/augmentation.png AUG.GREY_P 0.15
"""
import argparse

import numpy as np
import torch
from PIL import Image, ImageDraw

from augment import BatchAugmenter, SeededPipeline
from defaults import get_cfg_defaults, merge_opts
from geometry import aligned_crop, read_rgb
from preprocessing.align import FaceAligner


def picture(photo, output, size, copies, aug):
    """A PNG grid of one photo's largest face: the aligned crop, then ``copies`` augmented versions per backend."""
    rgb = read_rgb(photo)
    face = FaceAligner().align_largest(rgb) if rgb is not None else None
    if face is None:
        raise SystemExit(f"{photo}: no readable face to augment")
    crop = aligned_crop(rgb, face.deg, face.box, 0.0, size)
    batch = torch.from_numpy(crop).permute(2, 0, 1).unsqueeze(0).expand(copies, -1, -1, -1)
    ours = BatchAugmenter(aug, seed=0)(batch, 0, torch.arange(copies)).round().byte().permute(0, 2, 3, 1).numpy()
    pipeline = SeededPipeline(aug, size)
    theirs = [pipeline(crop, index) for index in range(copies)]
    label_width = size
    grid = Image.new("RGB", (label_width + size * (copies + 1), 2 * size), "white")
    draw = ImageDraw.Draw(grid)
    for row, (name, images) in enumerate((("batch", ours), ("albumentations", theirs))):
        draw.text((4, row * size + size // 2), name, fill="black")
        grid.paste(Image.fromarray(crop), (label_width, row * size))
        for column, image in enumerate(images, start=1):
            grid.paste(Image.fromarray(np.asarray(image)), (label_width + column * size, row * size))
    grid.save(output)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Draw a photo's face augmented by both backends, to compare them "
                                                 "by eye: the crop, then copies from augment.py and albumentations.")
    parser.add_argument("photo", help="a photo with a face, e.g. samples/astronaut.jpg")
    parser.add_argument("output", help="the PNG to write")
    parser.add_argument("--size", type=int, default=96, help="crop side in pixels (default: %(default)s)")
    parser.add_argument("--copies", type=int, default=10, help="augmented copies per backend (default: %(default)s)")
    parser.add_argument("opts", nargs="*", metavar="KEY VALUE", help="AUG.* overrides, e.g. AUG.GREY_P 0.15")
    args = parser.parse_intermixed_args(argv)
    cfg = merge_opts(get_cfg_defaults(), args.opts)
    picture(args.photo, args.output, args.size, args.copies, cfg.AUG)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
