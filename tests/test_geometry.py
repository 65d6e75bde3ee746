"""Rotate + crop + expand on synthetic images whose geometry is known exactly, and decoding as the project reads photos."""
from pathlib import Path

import numpy as np
import pytest

from geometry import CropError, aligned_crop, eye_angle, expand_box, inside_frame, rotation_matrix, transform_points


def square_image(size=200, box=(60, 80, 140, 160)):
    image = np.zeros((size, size, 3), np.uint8)
    x1, y1, x2, y2 = box
    image[y1:y2, x1:x2] = 255
    return image


def test_crop_without_rotation_is_the_box():
    crop = aligned_crop(square_image(), 0.0, (60, 80, 140, 160), 0.0, 40)
    assert crop.shape == (40, 40, 3)
    assert crop.mean() > 250


def test_expand_adds_half_per_side_and_is_not_clamped():
    assert expand_box((60, 80, 140, 160), 0.5) == (40, 60, 160, 180)
    assert expand_box((10, 10, 110, 110), 1.0) == (-40, -40, 160, 160)
    crop = aligned_crop(square_image(), 0.0, (60, 80, 140, 160), 1.0, 80)
    # the white square fills the middle half of the expanded crop
    white = np.argwhere(crop[..., 0] > 127)
    assert white.min(0).tolist() == pytest.approx([20, 20], abs=1)
    assert white.max(0).tolist() == pytest.approx([59, 59], abs=1)


BIG_W, BIG_H = 4000, 3000
CHIP_SCALE = 2
# the chip's distance from the photo's edges: its expanded box, turned by up to 15 degrees, stays in the photo
CORNER_MARGIN = 120
# the same face sampled at the same places differs only by the rounding of cv2's fixed-point (1/32 px) warp weights:
# measured 0.08 mean, 3 at most, against tens for a squeezed crop
SAME_CROP_MEAN, SAME_CROP_MAX = 0.2, 4


def chip_on_canvas(left, top):
    """A real face, scaled up, on a large grey photo with its top-left corner at (left, top)."""
    import cv2

    from conftest import utkface_files
    from geometry import read_rgb

    chip = read_rgb(utkface_files()[0][0])
    chip = cv2.resize(chip, None, fx=CHIP_SCALE, fy=CHIP_SCALE, interpolation=cv2.INTER_CUBIC)
    canvas = np.full((BIG_H, BIG_W, 3), 128, np.uint8)
    canvas[top:top + chip.shape[0], left:left + chip.shape[1]] = chip
    return canvas, chip.shape[0]


def box_in_rotated_frame(left, top, side, deg):
    """The chip's square turned into the frame rotated by ``deg``, as align.py carries a detector's box."""
    centre = transform_points(rotation_matrix(BIG_W, BIG_H, deg), [(left + (side - 1) / 2, top + (side - 1) / 2)])[0]
    x, y = centre + 0.5
    return (x - side / 2, y - side / 2, x + side / 2, y + side / 2)


@pytest.mark.parametrize("deg", [10, 15, -10, -15])
def test_a_face_near_a_corner_crops_as_in_the_middle_however_far_its_box_leaves_the_rotated_frame(deg):
    """The box of a tilted face near a corner leaves the frame turned about the photo's centre; its crop still shows
    the face, as the same face in the middle of the photo does."""
    size, expand = 128, 0.25
    middle, side = chip_on_canvas(1800, 1300)
    expected = aligned_crop(middle, deg, box_in_rotated_frame(1800, 1300, side, deg), expand, size)
    near, right, bottom = CORNER_MARGIN, BIG_W - side - CORNER_MARGIN, BIG_H - side - CORNER_MARGIN
    for left, top in ((near, near), (right, near), (right, bottom), (near, bottom)):
        photo, _ = chip_on_canvas(left, top)
        box = box_in_rotated_frame(left, top, side, deg)
        assert not inside_frame(box, BIG_W, BIG_H)
        crop = aligned_crop(photo, deg, box, expand, size)
        difference = np.abs(crop.astype(int) - expected)
        assert difference.mean() < SAME_CROP_MEAN and difference.max() <= SAME_CROP_MAX, (left, top)


def test_a_box_hanging_off_the_photo_is_padded_with_black_not_squeezed():
    white = np.full((200, 200, 3), 255, np.uint8)
    crop = aligned_crop(white, 0.0, (160, 50, 240, 130), 0.0, 80)  # half in the photo, half past its right edge
    assert crop[:, :40].min() == 255 and not crop[:, 40:].any()


@pytest.mark.parametrize("box, deg", [((50, 50, 50, 90), 0.0), ((50, 50, 50.5, 90), 0.0), ((0, 0, np.inf, 10), 0.0),
                                      ((0, 0, 10, 10), np.nan)])
def test_a_box_that_frames_nothing_is_a_crop_error_naming_it(box, deg):
    with pytest.raises(CropError, match=r"frames nothing in the 200x200 image"):
        aligned_crop(square_image(), deg, box, 0.0, 40)


@pytest.mark.parametrize("deg", [-30, -10, 15, 45])
def test_rotation_levels_a_tilted_pair_of_eyes(deg):
    """Two dots on a line tilted by ``deg``: rotating by eye_angle makes them level."""
    size = 200
    centre = np.array([100.0, 100.0])
    direction = np.array([np.cos(np.radians(deg)), np.sin(np.radians(deg))])
    left, right = centre - 30 * direction, centre + 30 * direction
    angle = eye_angle(left, right)
    assert angle == pytest.approx(deg)
    matrix = rotation_matrix(size, size, angle)
    new_left, new_right = transform_points(matrix, [left, right])
    assert new_left[1] == pytest.approx(new_right[1], abs=1e-6)
    assert new_left[0] < new_right[0]

    image = np.zeros((size, size, 3), np.uint8)
    for x, y in (left, right):
        image[int(round(y)) - 2:int(round(y)) + 3, int(round(x)) - 2:int(round(x)) + 3] = 255
    crop = aligned_crop(image, angle, (0, 0, size, size), 0.0, size)
    ys, xs = np.nonzero(crop[..., 0] > 60)
    left_half, right_half = xs < 100, xs >= 100
    assert ys[left_half].mean() == pytest.approx(ys[right_half].mean(), abs=1.0)


def test_rotation_is_about_the_centre_and_counter_clockwise():
    matrix = rotation_matrix(201, 101, 90)
    centre, right_of_centre = transform_points(matrix, [(100, 50), (110, 50)])
    assert centre == pytest.approx([100, 50])
    # counter-clockwise on screen (y down): a point to the right moves up
    assert right_of_centre == pytest.approx([100, 40])


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "TIFF", "WEBP"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_image_size_is_the_size_read_rgb_decodes(tmp_path, fmt, orientation):
    """One notion of an image's size: the header's, turned as cv2 turns the pixels by the EXIF orientation."""
    from geometry import image_size, read_rgb

    path = sideways_photo(tmp_path, fmt, orientation)
    height, width = read_rgb(path).shape[:2]
    assert image_size(path) == (width, height)


def test_image_size_of_a_jpeg_with_corrupt_exif_is_its_stored_size(tmp_path):
    from PIL import Image

    from conftest import utkface_files
    from geometry import image_size, read_rgb

    path = tmp_path / "corrupt_exif.jpg"
    with Image.open(utkface_files()[0][0]) as face:
        face.crop((0, 0, 200, 150)).save(path, "JPEG", exif=b"Exif\x00\x00garbage")
    assert image_size(path) == (200, 150) == read_rgb(path).shape[1::-1]


def utkface_crop():
    """A real face, cropped to 200 x 150 so that a quarter turn shows in the shape."""
    from PIL import Image

    from conftest import utkface_files

    with Image.open(utkface_files()[0][0]) as face:
        return face.crop((0, 0, 200, 150)).convert("RGB")


def sideways_photo(tmp_path, fmt, orientation, **options):
    """The real face crop saved in ``fmt`` with an EXIF orientation tag, as a phone stores a photo taken sideways."""
    from PIL import Image

    path = tmp_path / f"photo.{fmt.lower()}"
    exif = Image.Exif()
    exif[0x0112] = orientation
    utkface_crop().save(path, fmt, exif=exif.tobytes(), **options)
    return path


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "TIFF", "WEBP"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_read_rgb_turns_a_photo_stored_sideways_upright(tmp_path, fmt, orientation):
    """Pixels as PIL's exif_transpose shows them (a phone photo stored sideways is scored upright), in every format."""
    from PIL import Image, ImageOps

    from geometry import read_rgb

    path = sideways_photo(tmp_path, fmt, orientation, **({"lossless": True} if fmt == "WEBP" else {}))
    with Image.open(path) as stored:
        upright = np.asarray(ImageOps.exif_transpose(stored).convert("RGB"), dtype=np.int16)
    decoded = read_rgb(path)
    assert decoded.shape == upright.shape
    assert np.abs(decoded.astype(np.int16) - upright).mean() < 1.0  # JPEG decoders may round a pixel differently


def test_decode_rgb_reads_greyscale_alpha_and_16_bit_as_the_8_bit_rgb_they_show(tmp_path):
    """Three equal channels for greyscale, the colour without alpha, and 16 bits scaled to 8: exactly, not roughly."""
    import cv2

    from geometry import decode_rgb, read_rgb

    rgb = np.asarray(utkface_crop())
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    alpha = np.tile(np.arange(200, dtype=np.uint8), (150, 1))  # from transparent to nearly opaque
    cases = {
        "grey": (grey, np.dstack([grey] * 3)),
        "rgba": (cv2.cvtColor(np.dstack([rgb, alpha]), cv2.COLOR_RGBA2BGRA), rgb),
        "rgb16": (cv2.cvtColor(rgb.astype(np.uint16) * 257, cv2.COLOR_RGB2BGR), rgb),
        "grey16": (grey.astype(np.uint16) * 257, np.dstack([grey] * 3)),
        "rgba16": (cv2.cvtColor(np.dstack([rgb, alpha]).astype(np.uint16) * 257, cv2.COLOR_RGBA2BGRA), rgb),
    }
    for name, (stored, shown) in cases.items():
        path = tmp_path / f"{name}.png"
        assert cv2.imwrite(str(path), stored)
        assert np.array_equal(read_rgb(path), shown), name
        assert np.array_equal(decode_rgb(path.read_bytes()), shown), name


def test_decode_rgb_reduced_decodes_a_jpeg_at_a_fraction_of_each_side():
    from geometry import decode_rgb

    data = (Path(__file__).resolve().parents[1] / "samples" / "astronaut.jpg").read_bytes()
    full = decode_rgb(data)
    for reduce in (2, 4, 8):
        assert decode_rgb(data, reduce).shape == (-(-full.shape[0] // reduce), -(-full.shape[1] // reduce), 3)


def test_decode_rgb_gives_none_for_what_is_not_an_image():
    from geometry import decode_rgb

    jpeg = (Path(__file__).resolve().parents[1] / "samples" / "astronaut.jpg").read_bytes()
    for data in (b"", b"age,name\n34,someone\n", jpeg[:200]):
        assert decode_rgb(data) is None
