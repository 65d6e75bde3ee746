"""Rotate + crop + expand on synthetic images whose geometry is known exactly."""
import numpy as np
import pytest

from geometry import aligned_crop, eye_angle, expand_box, rotation_matrix, transform_points


def square_image(size=200, box=(60, 80, 140, 160)):
    image = np.zeros((size, size, 3), np.uint8)
    x1, y1, x2, y2 = box
    image[y1:y2, x1:x2] = 255
    return image


def test_crop_without_rotation_is_the_box():
    crop = aligned_crop(square_image(), 0.0, (60, 80, 140, 160), 0.0, 40)
    assert crop.shape == (40, 40, 3)
    assert crop.mean() > 250


def test_expand_adds_half_per_side_and_is_clamped():
    assert expand_box((60, 80, 140, 160), 0.5, 200, 200) == (40, 60, 160, 180)
    assert expand_box((10, 10, 110, 110), 1.0, 200, 200) == (0, 0, 160, 160)
    crop = aligned_crop(square_image(), 0.0, (60, 80, 140, 160), 1.0, 80)
    # the white square fills the middle half of the expanded crop
    white = np.argwhere(crop[..., 0] > 127)
    assert white.min(0).tolist() == pytest.approx([20, 20], abs=1)
    assert white.max(0).tolist() == pytest.approx([59, 59], abs=1)


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
    from PIL import Image

    from conftest import utkface_files
    from geometry import image_size, read_rgb

    path = tmp_path / f"photo.{fmt.lower()}"
    exif = Image.Exif()
    exif[0x0112] = orientation
    with Image.open(utkface_files()[0][0]) as face:
        face.crop((0, 0, 200, 150)).save(path, fmt, exif=exif.tobytes())
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
