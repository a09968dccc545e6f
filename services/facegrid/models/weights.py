"""Where the installed dlib model files are (package face-recognition-models, CC0).

The package's own ``__init__`` imports ``pkg_resources``, which current setuptools no
longer ships, so the files are located from the package's import spec without
executing it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

PACKAGE = "face_recognition_models"


def models_dir() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{PACKAGE} is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def detector_weights() -> Path:
    """dlib's MMOD CNN face detector."""
    return models_dir() / "mmod_human_face_detector.dat"


def embedder_weights() -> Path:
    """dlib's ResNet face descriptor network (150x150 RGB -> 128-d)."""
    return models_dir() / "dlib_face_recognition_resnet_model_v1.dat"


def landmarks_weights() -> Path:
    """dlib's 5-point landmark regression trees (not a neural network; served by dlib)."""
    return models_dir() / "shape_predictor_5_face_landmarks.dat"
