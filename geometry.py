"""Face geometry shared by preprocessing, training and the demo.

One convention everywhere, so that a face aligned by `preprocessing/align.py`
is cropped identically for training and evaluation (`crop_cache.py`) and by
`estimator.py` for the demo and the Python API:

* ``deg`` is an angle in degrees, counter-clockwise positive in the displayed
  image (the convention of ``cv2.getRotationMatrix2D`` and ``PIL.Image.rotate``),
  applied about the image centre ``((w - 1) / 2, (h - 1) / 2)``; the rotated
  frame keeps the original size, and whatever a crop shows from outside the
  photo is black.
* the box ``(x1, y1, x2, y2)`` is in pixel coordinates of that rotated frame.
  It may extend past the frame's edge: turning a photo about its centre carries
  a face near a corner partly (or wholly) out of the frame, while the face is
  still in the photo. The crop reads it from the photo, so it is never clamped.
* ``expand`` enlarges the box by ``expand / 2`` of its width (height) on each
  side, not clamped either: a face near the edge is framed like one in the
  middle, with black where the photo ends, rather than squeezed.

The whole rotate → crop → resize chain is one affine warp, so the rotated
full-size image is never materialised.
"""
import contextlib
import io
import math
import threading

import cv2
import numpy as np
from PIL import Image

EXIF_ORIENTATION = 0x0112
# orientations (EXIF 5..8) whose upright image is the stored one turned a quarter: width and height swap
QUARTER_TURNS = (5, 6, 7, 8)
# formats whose pixels read_rgb turns upright by the EXIF orientation while PIL reports the stored size: cv2.imdecode
# turns JPEG and PNG itself and read_rgb turns WebP, which cv2 decodes as stored (PIL already reports TIFF's upright
# size and cv2 turns its pixels; tests/test_geometry.py checks all four)
DECODER_ORIENTED_FORMATS = ("JPEG", "MPO", "PNG", "WEBP")
# how to turn the pixels of each EXIF orientation upright, as PIL.ImageOps.exif_transpose does
UPRIGHT_TURNS = {
    2: lambda image: cv2.flip(image, 1),
    3: lambda image: cv2.rotate(image, cv2.ROTATE_180),
    4: lambda image: cv2.flip(image, 0),
    5: lambda image: cv2.transpose(image),
    6: lambda image: cv2.rotate(image, cv2.ROTATE_90_CLOCKWISE),
    7: lambda image: cv2.rotate(cv2.transpose(image), cv2.ROTATE_180),
    8: lambda image: cv2.rotate(image, cv2.ROTATE_90_COUNTERCLOCKWISE),
}
# decoding at 1/2, 1/4 or 1/8 of each side: libjpeg scales a JPEG while decoding it, so the full image never exists
REDUCED_DECODE_FLAGS = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
                        8: cv2.IMREAD_REDUCED_COLOR_8}
_PIXEL_LIMIT_LOCK = threading.Lock()


def rotation_matrix(width, height, deg):
    """2x3 matrix taking original pixel coordinates to rotated ones."""
    centre = ((width - 1) / 2.0, (height - 1) / 2.0)
    return cv2.getRotationMatrix2D(centre, float(deg), 1.0)


def eye_angle(left_eye, right_eye):
    """The ``deg`` that levels the eyes.

    ``left_eye`` is the eye on the left of the image. With y pointing down, a
    positive angle means the right-hand eye sits lower, and rotating by that
    angle counter-clockwise lifts it level.
    """
    dx = right_eye[0] - left_eye[0]
    dy = right_eye[1] - left_eye[1]
    return math.degrees(math.atan2(dy, dx))


def transform_points(matrix, points):
    """Apply a 2x3 affine matrix to an (N, 2) array of points."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return points @ matrix[:, :2].T + matrix[:, 2]


def expand_box(box, expand):
    """Enlarge a box by ``expand / 2`` of its size per side."""
    x1, y1, x2, y2 = (float(v) for v in box)
    pad_x = (x2 - x1) * expand / 2.0
    pad_y = (y2 - y1) * expand / 2.0
    return (x1 - pad_x, y1 - pad_y, x2 + pad_x, y2 + pad_y)


def inside_frame(box, width, height):
    """Whether a box lies within the ``width`` x ``height`` frame (a crop that needs no padding)."""
    x1, y1, x2, y2 = box
    return 0.0 <= x1 and 0.0 <= y1 and x2 <= width and y2 <= height


def crop_matrix(deg, box, width, height, out_w, out_h):
    """2x3 matrix taking original pixels to the crop of the rotated image's box."""
    x1, y1, x2, y2 = box
    scale_x = out_w / (x2 - x1)
    scale_y = out_h / (y2 - y1)
    rot = np.vstack([rotation_matrix(width, height, deg), [0.0, 0.0, 1.0]])
    # Box edges are continuous coordinates; pixel centres sit at +0.5.
    crop = np.array(
        [
            [scale_x, 0.0, (0.5 - x1) * scale_x - 0.5],
            [0.0, scale_y, (0.5 - y1) * scale_y - 0.5],
            [0.0, 0.0, 1.0],
        ]
    )
    return (crop @ rot)[:2]


class CropError(ValueError):
    """A face that cannot be cropped: its angle or box is not finite, or the box is under a pixel wide or high."""


def aligned_crop(image, deg, box, expand, size):
    """Rotate by ``deg``, crop the expanded ``box`` and resize to ``size`` x ``size``.

    The one crop of preprocessing, training and inference. The box is read
    from the photo wherever it lies in the rotated frame, and what lies outside
    the photo is black, the same black that rotates into the frame's corners,
    so a box inside the frame crops exactly as it always has. The warp is done
    at the box's native resolution and then resized with area averaging, so
    that shrinking a large face does not alias.
    """
    height, width = image.shape[:2]
    box = expand_box(box, expand)
    box_w, box_h = box[2] - box[0], box[3] - box[1]
    if not (np.isfinite([deg, *box]).all() and box_w >= 1 and box_h >= 1):
        edges = ", ".join(f"{v:g}" for v in box)
        raise CropError(f"box ({edges}) at deg {deg:g} frames nothing in the {width}x{height} image: deg and box "
                        f"must be finite, the box at least a pixel wide and high")
    native_w = max(1, int(math.ceil(box_w)))
    native_h = max(1, int(math.ceil(box_h)))
    matrix = crop_matrix(deg, box, width, height, native_w, native_h)
    native = cv2.warpAffine(
        image, matrix, (native_w, native_h), flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT, borderValue=0,
    )
    shrinking = native_w > size or native_h > size
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(native, (size, size), interpolation=interpolation)


# what OpenCV decodes
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".dib", ".webp",
                            ".tif", ".tiff", ".jp2", ".pbm", ".pgm", ".ppm", ".pnm"})


def read_rgb(path):
    """Decode an image file to RGB uint8, upright, or None when it cannot be read."""
    return decode_rgb(np.fromfile(str(path), dtype=np.uint8))


def decode_rgb(data, reduce=1):
    """Decode an image held in memory (bytes or uint8 array) as `read_rgb` decodes a file; None when it cannot be.

    Greyscale becomes three equal channels, alpha is dropped, 16 bits per
    channel become 8, and a photo stored sideways is turned upright by its
    EXIF orientation. ``reduce`` (2, 4 or 8) decodes at that fraction of each
    side, for photos too large to hold whole.
    """
    data = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else data
    if data.size == 0:
        return None
    image = cv2.imdecode(data, REDUCED_DECODE_FLAGS[reduce])
    if image is None:
        return None
    image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB, dst=image)  # in place: a large photo is not held twice
    turn = UPRIGHT_TURNS.get(_webp_orientation(data))
    return image if turn is None else turn(image)


def _webp_orientation(data):
    """The EXIF orientation of a WebP, which cv2 decodes as stored; 1 (upright) for every other format."""
    if bytes(data[:4]) != b"RIFF" or bytes(data[8:12]) != b"WEBP":
        return 1
    with open_image(io.BytesIO(data)) as image:
        return _orientation(image)


def image_size(path):
    """(width, height) of the image as ``read_rgb`` decodes it, read from the header alone.

    A phone photo stored sideways carries an EXIF orientation that the decoder
    applies, so boxes (found on decoded pixels) are checked against the
    upright size. PIL's decompression-bomb limit does not apply here: only the
    header is read, and a 200-megapixel photo is a photo. ``path`` may also be
    a binary file object. Raises OSError for a file that is not an image.
    """
    return image_header(path)[1:]


def image_header(path):
    """(format, width, height) from the header alone, the size as `image_size` gives it; OSError for a non-image."""
    with open_image(path) as image:
        width, height = image.size
        if image.format in DECODER_ORIENTED_FORMATS and _orientation(image) in QUARTER_TURNS:
            width, height = height, width
        return image.format, width, height


def open_image(path):
    """PIL's Image.open without its decompression-bomb limit, for callers that check the size themselves.

    The limit is lifted only while the header is read (the check is made
    there), so pixels may be loaded from the image afterwards without the lock.
    """
    with _no_pixel_limit():
        return Image.open(path)


def _orientation(image):
    """The EXIF orientation in the header (1, upright, when there is none); never decodes pixels."""
    raw = image.info.get("exif")
    if not raw:
        return 1
    exif = Image.Exif()
    try:
        exif.load(raw)
    except Exception:  # PIL raises SyntaxError and others for corrupt EXIF, which decoders ignore too
        return 1
    return exif.get(EXIF_ORIENTATION, 1)


@contextlib.contextmanager
def _no_pixel_limit():
    """PIL refuses to even open a file whose header claims many pixels; lift that while reading a header."""
    with _PIXEL_LIMIT_LOCK:
        previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = previous
