"""Where dlib's model files are: the face_recognition_models package, for the aligner and for MODEL.ARCH dlib_resnet.

The package is located, not imported: its ``__init__`` needs ``pkg_resources``, which recent setuptools no longer
ship.
"""
import importlib.util
from pathlib import Path

MODELS_PACKAGE = "face_recognition_models"


def models_dir():
    """The folder that holds dlib's model files; ModuleNotFoundError when the package is not installed."""
    spec = importlib.util.find_spec(MODELS_PACKAGE)
    if spec is None:
        raise ModuleNotFoundError(
            f"the Python package '{MODELS_PACKAGE}' that holds dlib's face models is "
            "not installed: pip install -r requirements.txt"
        )
    if spec.submodule_search_locations:
        package_dir = Path(next(iter(spec.submodule_search_locations)))
    else:
        package_dir = Path(spec.origin).parent
    return package_dir / "models"


def model_file(name):
    """The path of dlib's model file ``name``; FileNotFoundError (or ModuleNotFoundError) says how to install it."""
    path = models_dir() / name
    if not path.is_file():
        raise FileNotFoundError(
            f"dlib model file {path} is missing: pip install --force-reinstall {MODELS_PACKAGE}"
        )
    return path
