"""Faces drawn on a photo: a box and an "age ± sd" label each, sized to the image; demo.py and app.py draw alike."""
import functools

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from defaults import PERCENT
from model import ATTRIBUTE_HEADS

# label height as a share of the image's longer side, so labels read alike at any resolution
FONT_FRACTION = 0.03
MIN_FONT_PX = 12
LINE_FRACTION = 0.004
LABEL_PAD_FRACTION = 0.2
BOX_COLOR = (0, 230, 0)
TEXT_COLOR = (0, 0, 0)


@functools.lru_cache(maxsize=None)
def label_font(size):
    """Pillow's bundled scalable font: it has the ± sign, which cv2.putText cannot draw."""
    return ImageFont.load_default(size=size)


def draw_label(draw, text, left, bottom, font, pad, width):
    """Text on a filled box whose lower edge sits at ``bottom`` (pushed inside the image when needed)."""
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    box_w, box_h = x1 - x0 + 2 * pad, y1 - y0 + 2 * pad
    top = max(0, bottom - box_h)
    left = min(max(0, left), max(0, width - box_w))
    draw.rectangle((left, top, left + box_w, top + box_h), fill=BOX_COLOR)
    draw.text((left + pad - x0, top + pad - y0), text, fill=TEXT_COLOR, font=font)


def attributes(face):
    """", female 93%, asian 81%" for a multitask model's face: each label given (see --min_attribute_prob) with its
    probability, so that a guess never reads as a fact; "" otherwise."""
    return "".join(f", {face[head]} {PERCENT * face[f'{head}_prob']:.0f}%" for head in ATTRIBUTE_HEADS
                   if face.get(head) is not None)


def annotate(rgb, faces, caption=None):
    """A copy of the frame with each face's box and "age ± sd" label, sized to the image so it reads at any resolution."""
    height, width = rgb.shape[:2]
    side = max(height, width)
    font_px = max(MIN_FONT_PX, round(FONT_FRACTION * side))
    line = max(1, round(LINE_FRACTION * side))
    pad = max(1, round(LABEL_PAD_FRACTION * font_px))
    font = label_font(font_px)
    image = Image.fromarray(rgb)
    draw = ImageDraw.Draw(image)
    for face in faces:
        x1, y1, x2, y2 = face["box"]
        draw.rectangle((x1, y1, x2, y2), outline=BOX_COLOR, width=line)
        draw_label(draw, f"{face['age']:.0f} ± {face['age_sd']:.0f}{attributes(face)}", x1, y1, font, pad, width)
    if caption:
        draw_label(draw, caption, 0, 0, font, pad, width)
    return np.asarray(image)
