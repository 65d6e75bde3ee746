"""Face detection and eye alignment, shared by the preprocessing scripts and the demo.

Every caller goes through `FaceAligner`, so a face is aligned identically when
a data set is prepared and when a trained model meets a new photo. The result
follows the convention of `geometry.py`: ``deg`` levels the eyes
(counter-clockwise positive, about the image centre, same output size) and
``box`` is the face in pixel coordinates of that rotated image, ready for
``geometry.aligned_crop(image, face.deg, face.box, expand, size)``.

Pipeline: dlib detector (HOG by default, CNN on request) → dlib landmarks
(5 points by default, 68 on request) on an upright patch around the face →
eye centres → ``deg`` via `geometry.eye_angle` → landmarks once more on a
patch turned by ``deg`` → the final ``deg`` → the detector's box, turned with
the face, in the rotated image.
"""
from dataclasses import dataclass

import cv2
import dlib
import numpy as np

import geometry
from dlib_models import model_file

DETECTORS = ("hog", "cnn")
LANDMARK_MODELS = (5, 68)

CNN_DETECTOR_FILE = "mmod_human_face_detector.dat"
LANDMARK_FILES = {
    5: "shape_predictor_5_face_landmarks.dat",
    68: "shape_predictor_68_face_landmarks.dat",
}

# Landmark indices of (left-in-image eye, right-in-image eye) of an upright
# face. The 5-point model lists the subject's right eye (outer, inner corner),
# then the subject's left eye (outer, inner), then the nose; the subject's
# left eye is on the right of the image. The 68-point model (iBUG 300-W) lists
# 36-41 for the eye on the left of the image and 42-47 for the other one.
EYE_LANDMARKS = {
    5: ((2, 3), (0, 1)),
    68: (tuple(range(36, 42)), tuple(range(42, 48))),
}

# Detection passes tried in order until one finds a face, as
# (border added on each side as a fraction of the longer image side, number
# of 2x upsamplings). The first pass is the plain image. Tight crops whose
# face touches the frame (UTKFace, MegaAge) need the replicated border; faces
# under the HOG window (80x80 pixels) need the upsampling. On a sample of
# 2,000 UTKFace crops the passes find a face in 97.8%, 98.4% and 99.3% of the
# images cumulatively.
AUTO_PASSES = ((0.0, 0), (0.1, 0), (0.25, 1))
# With an explicit upsample count a single pass runs, with this border.
FIXED_PASS_BORDER = 0.1
# A video or webcam frame gets one pass: this plain one, or the explicit
# upsample count's. With no face in view, the photo search (every pass above,
# then the roll search below, the last padded and upsampled) costs seconds a
# frame on a CPU and stalls the stream; a face missed in one frame is found in
# the next.
VIDEO_PASS = (0.0, 0)
# When no pass finds an upright face, the last pass is repeated on the image
# turned by each of these angles (degrees) in turn: dlib's frontal detectors
# lose some faces whose head is tilted by 15 degrees or more.
ROLL_SEARCH_DEGS = (-15.0, 15.0, -30.0, 30.0)
# Photos larger than this (longer side, pixels) are searched for faces at this
# size: the HOG detector's cost grows with the pixel count and faces in large
# photos are large. Landmarks are still located at full resolution.
DETECT_MAX_SIDE = 1280

# Landmarks are located on a patch around the face, turned so the face is
# upright: dlib's landmark models are trained on upright faces, and a second
# look at the turned face halves the angle error at 30 degrees of tilt. In the
# patch the face is resized to PATCH_FACE_SIZE pixels, because dlib returns
# landmarks rounded to whole pixels (a pixel is about 1 degree between the
# eyes of a 60-pixel face); the patch spans PATCH_FACES face sizes. Measured on
# 100 UTKFace faces turned by -30..30 degrees: median angle error 0.14 degrees,
# 99% within 1.9 degrees.
REFINE_PASSES = 1
PATCH_FACES = 2.0
PATCH_FACE_SIZE = 256.0


def model_paths(detector="hog", landmarks=5):
    """The model files a `FaceAligner` with these settings loads, as
    ``{'detector': path or None, 'landmarks': path}``.

    Cheap (no model is loaded), so a program can check the installation
    before it starts worker processes. FileNotFoundError names a missing file.
    """
    if detector not in DETECTORS:
        raise ValueError(f"detector must be one of {DETECTORS}, not {detector!r}")
    if landmarks not in LANDMARK_MODELS:
        raise ValueError(f"landmarks must be one of {LANDMARK_MODELS}, not {landmarks!r}")
    return {
        "detector": str(model_file(CNN_DETECTOR_FILE)) if detector == "cnn" else None,
        "landmarks": str(model_file(LANDMARK_FILES[landmarks])),
    }


@dataclass(frozen=True, eq=False)
class Face:
    """One aligned face.

    ``deg`` and ``box`` (x1, y1, x2, y2) follow `geometry.py`'s convention:
    ``box`` is in the image rotated by ``deg``. ``det_box`` is the detector's
    box in the original image, for drawing. ``landmarks`` are the landmark
    points in the original image, pixel-centre coordinates, shape (N, 2).
    ``score`` is the detector's confidence (HOG: SVM margin; CNN: MMOD score).
    """

    deg: float
    box: tuple
    det_box: tuple
    score: float
    landmarks: np.ndarray

    @property
    def area(self):
        """Area of ``det_box`` in pixels: how `FaceAligner` ranks faces."""
        x1, y1, x2, y2 = self.det_box
        return (x2 - x1) * (y2 - y1)


@dataclass(frozen=True)
class _Detection:
    """A detector hit in the original image: an upright box in the frame
    turned by ``frame_deg`` (0 unless found by the roll search)."""

    centre: np.ndarray  # pixel-centre coordinates in the original image
    width: float
    height: float
    frame_deg: float
    score: float


class FaceAligner:
    """Detects faces with dlib and measures the angle that levels their eyes.

    ``detector``: ``'hog'`` (dlib's frontal face detector, fast on a CPU) or
    ``'cnn'`` (dlib's MMOD CNN, more robust to pose, slow without CUDA).
    ``landmarks``: ``5`` or ``68``, dlib's landmark model.
    ``upsample``: ``None`` tries the passes in `AUTO_PASSES` and stops at the
    first that finds a face, which suits one-face crops (the data sets); an
    integer runs one pass with that many 2x upsamplings, which finds every
    face at that resolution (the demo, group photos: 1 finds faces down to
    about 40 pixels).
    ``video``: frames of a stream, each searched with one pass (VIDEO_PASS,
    or ``upsample``'s) and no roll search, so that a frame costs the same
    bounded time whether a face is in view or not.
    """

    def __init__(self, detector="hog", landmarks=5, upsample=None, video=False):
        if upsample is not None and upsample < 0:
            raise ValueError(f"upsample must be None or >= 0, not {upsample}")
        paths = model_paths(detector, landmarks)
        if detector == "hog":
            self._hog = dlib.get_frontal_face_detector()
            self._cnn = None
        else:
            self._hog = None
            self._cnn = dlib.cnn_face_detection_model_v1(paths["detector"])
        self._predictor = dlib.shape_predictor(paths["landmarks"])
        self._eyes = EYE_LANDMARKS[landmarks]
        if upsample is not None:
            self._passes = ((FIXED_PASS_BORDER, upsample),)
        else:
            self._passes = (VIDEO_PASS,) if video else AUTO_PASSES
        self._roll_degs = () if video else ROLL_SEARCH_DEGS

    def align_all(self, rgb):
        """Every face in an RGB uint8 image (H, W, 3), largest first."""
        rgb = np.ascontiguousarray(rgb)
        faces = [self._align(rgb, hit) for hit in self._detect(rgb)]
        return sorted(faces, key=lambda face: face.area, reverse=True)

    def align_largest(self, rgb):
        """The largest face in an RGB uint8 image, or None when there is none."""
        faces = self.align_all(rgb)
        return faces[0] if faces else None

    # Detection -------------------------------------------------------------

    def _detect(self, rgb):
        """Upright passes first, then the roll search (photos only) with the last pass."""
        height, width = rgb.shape[:2]
        scale = min(1.0, DETECT_MAX_SIDE / max(height, width))
        if min(height, width) * scale < 1:
            return []  # a strip (1 x 5000 pixels) holds no face, and shrunk to the detection size it is empty
        small = rgb if scale == 1.0 else cv2.resize(
            rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA
        )
        searches = [(border, upsample, 0.0) for border, upsample in self._passes]
        last_border, last_upsample = self._passes[-1]
        searches += [(last_border, last_upsample, deg) for deg in self._roll_degs]
        for border_fraction, upsample, frame_deg in searches:
            hits = self._detect_in_view(small, scale, border_fraction, upsample, frame_deg)
            if hits:
                return hits
        return []

    def _detect_in_view(self, small, scale, border_fraction, upsample, frame_deg):
        """Detections in ``small`` given a border and turned by ``frame_deg``,
        mapped back to the original image."""
        border = int(round(border_fraction * max(small.shape[:2])))
        view = small if border == 0 else cv2.copyMakeBorder(
            small, border, border, border, border, cv2.BORDER_REPLICATE
        )
        view_h, view_w = view.shape[:2]
        turn = geometry.rotation_matrix(view_w, view_h, frame_deg)
        if frame_deg:
            view = cv2.warpAffine(view, turn, (view_w, view_h), flags=cv2.INTER_LINEAR)
        # Original pixel-centre coordinates → view: resize, shift by the border, turn.
        to_view = _compose(turn, np.array([[scale, 0.0, 0.5 * scale - 0.5 + border],
                                           [0.0, scale, 0.5 * scale - 0.5 + border]]))
        from_view = cv2.invertAffineTransform(to_view)
        hits = []
        for rect, score in self._run_detector(view, upsample):
            x1, y1, x2, y2 = _rect_box(rect)
            centre = ((x1 + x2) / 2.0 - 0.5, (y1 + y2) / 2.0 - 0.5)
            hits.append(_Detection(
                centre=geometry.transform_points(from_view, [centre])[0],
                width=(x2 - x1) / scale,
                height=(y2 - y1) / scale,
                frame_deg=frame_deg,
                score=float(score),
            ))
        return hits

    def _run_detector(self, image, upsample):
        if self._hog is not None:
            rects, scores, _ = self._hog.run(image, upsample)
            return list(zip(rects, scores))
        return [(hit.rect, hit.confidence) for hit in self._cnn(image, upsample)]

    # Landmarks and alignment ---------------------------------------------

    def _align(self, rgb, hit):
        height, width = rgb.shape[:2]
        deg = hit.frame_deg
        for _ in range(1 + REFINE_PASSES):
            points = self._landmarks(rgb, hit, deg)
            deg = geometry.eye_angle(
                points[list(self._eyes[0])].mean(axis=0),
                points[list(self._eyes[1])].mean(axis=0),
            )
        return Face(
            deg=deg,
            box=_box_in_frame(hit, deg, width, height),
            det_box=_clamp_box(_upright_bounds(hit), width, height),
            score=hit.score,
            landmarks=points,
        )

    def _landmarks(self, rgb, hit, deg):
        """Landmarks (original pixel-centre coordinates) located on a patch
        around the face, turned by ``deg``."""
        height, width = rgb.shape[:2]
        scale = PATCH_FACE_SIZE / max(hit.width, hit.height)
        side = int(round(PATCH_FACES * PATCH_FACE_SIZE))
        to_patch = _patch_matrix(width, height, hit.centre, deg, scale, side)
        patch = cv2.warpAffine(rgb, to_patch, (side, side), flags=cv2.INTER_LINEAR)
        middle = (side - 1) / 2.0 + 0.5  # patch centre in continuous coordinates
        half_w, half_h = hit.width * scale / 2.0, hit.height * scale / 2.0
        rect = _box_rect((middle - half_w, middle - half_h, middle + half_w, middle + half_h))
        shape = self._predictor(patch, rect)
        points = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)
        return geometry.transform_points(cv2.invertAffineTransform(to_patch), points)


def _compose(outer, inner):
    """The 2x3 affine matrix applying ``inner`` then ``outer``."""
    return outer.dot(np.vstack([inner, [0.0, 0.0, 1.0]]))


def _patch_matrix(width, height, centre, deg, scale, side):
    """Original pixel-centre coordinates → a ``side`` x ``side`` patch of the
    image rotated by ``deg``, scaled by ``scale``, centred on ``centre``."""
    rotation = geometry.rotation_matrix(width, height, deg)
    turned_centre = geometry.transform_points(rotation, [centre])[0]
    middle = (side - 1) / 2.0
    shift = np.array([[scale, 0.0, middle - scale * turned_centre[0]],
                      [0.0, scale, middle - scale * turned_centre[1]]])
    return _compose(shift, rotation)


def _box_in_frame(hit, deg, width, height):
    """The detector's box carried into the image rotated by ``deg``.

    The detector frames a face with an upright box of about the face's size;
    once the face is turned upright the box keeps its size and moves with its
    centre. Rotating its corners instead would inflate it by up to 41%. The
    box is not clamped to the rotated frame: turned about the photo's centre,
    a face near a corner may leave the frame, and a clamped box would squeeze
    it (geometry.aligned_crop reads the face from the photo wherever it lies).
    """
    rotation = geometry.rotation_matrix(width, height, deg)
    cx, cy = geometry.transform_points(rotation, [hit.centre])[0] + 0.5
    half_w, half_h = hit.width / 2.0, hit.height / 2.0
    return (cx - half_w, cy - half_h, cx + half_w, cy + half_h)


def _upright_bounds(hit):
    """Axis-aligned bounds, in the original image, of the detector's box."""
    half_w, half_h = hit.width / 2.0, hit.height / 2.0
    corners = hit.centre + np.array(
        [(-half_w, -half_h), (half_w, -half_h), (half_w, half_h), (-half_w, half_h)]
    )
    # The box is upright in the frame turned by frame_deg: turn its corners back.
    back = cv2.getRotationMatrix2D(tuple(hit.centre), -hit.frame_deg, 1.0)
    corners = geometry.transform_points(back, corners) + 0.5
    return (*corners.min(axis=0), *corners.max(axis=0))


def _rect_box(rect):
    """dlib's inclusive pixel rectangle as continuous edges (x1, y1, x2, y2)."""
    return (
        float(rect.left()), float(rect.top()),
        float(rect.right() + 1), float(rect.bottom() + 1),
    )


def _box_rect(box):
    """Continuous edges back to dlib's inclusive pixel rectangle."""
    x1, y1, x2, y2 = (int(round(edge)) for edge in box)
    return dlib.rectangle(x1, y1, x2 - 1, y2 - 1)


def _clamp_box(box, width, height):
    """A box in the original image cut to the image, for drawing."""
    x1, y1, x2, y2 = box
    return (
        float(min(max(x1, 0.0), width)),
        float(min(max(y1, 0.0), height)),
        float(min(max(x2, 0.0), width)),
        float(min(max(y2, 0.0), height)),
    )
