"""What the detection service says about each face: landmarks, quality, aligned chip.

Landmarks come from dlib's 5-point shape predictor (regression trees, not a network:
it stays in-process). The aligned 150x150 chip is made by ``dlib.get_face_chip`` from
those landmarks, exactly as dlib prepares the ResNet's input; DESIGN.md records that a
plain affine warp aliases on large faces and moves descriptors by up to 0.17.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from enum import IntEnum

import dlib
import numpy as np
from facegrid.models.weights import landmarks_weights
from numpy.typing import NDArray

CHIP_SIZE = 150
CHIP_PADDING = 0.25


class Landmark(IntEnum):
    """The 5 points, named as seen in the image (left = smaller x on an upright face)."""

    LEFT_EYE_OUTER = 0
    LEFT_EYE_INNER = 1
    RIGHT_EYE_INNER = 2
    RIGHT_EYE_OUTER = 3
    NOSE_BASE = 4


# dlib's 5-point model order: 0/1 outer/inner corner of the eye on the image's right,
# 2/3 outer/inner corner of the eye on the image's left, 4 the base of the nose.
_DLIB_INDEX = {
    Landmark.LEFT_EYE_OUTER: 2,
    Landmark.LEFT_EYE_INNER: 3,
    Landmark.RIGHT_EYE_INNER: 1,
    Landmark.RIGHT_EYE_OUTER: 0,
    Landmark.NOSE_BASE: 4,
}


@dataclass(frozen=True)
class Quality:
    sharpness: float  # 0-100, from the variance of the Laplacian of the grey chip
    brightness: float  # 0-100, mean luma of the chip
    face_size: float  # shorter side of the face box, in original-image pixels
    inter_eye_distance: float  # pixels between the two eye centres
    roll: float  # degrees, in-plane rotation of the eye line (exact from the landmarks)
    yaw: float  # degrees, estimated from the nose offset between the eyes (approximate)


@dataclass(frozen=True)
class FaceAnalysis:
    landmarks: NDArray[np.float64]  # 5 x 2 (x, y) in image pixels, ordered as Landmark
    quality: Quality
    chip: NDArray[np.uint8]  # 150 x 150 x 3 RGB, dlib's aligned chip

    def eye_centres(self) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """(left, right) eye centres: the midpoints of each eye's two corners."""
        return eye_centres(self.landmarks)


def eye_centres(landmarks: NDArray[np.float64]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    left = (landmarks[Landmark.LEFT_EYE_OUTER] + landmarks[Landmark.LEFT_EYE_INNER]) / 2
    right = (landmarks[Landmark.RIGHT_EYE_OUTER] + landmarks[Landmark.RIGHT_EYE_INNER]) / 2
    return left, right


class FaceAnalyzer:
    """Landmarks, quality and chip for a face box. Safe to call from several threads."""

    def __init__(self) -> None:
        self._model_path = str(landmarks_weights())
        self._local = threading.local()

    def _predictor(self) -> dlib.shape_predictor:
        predictor = getattr(self._local, "predictor", None)
        if predictor is None:
            predictor = dlib.shape_predictor(self._model_path)
            self._local.predictor = predictor
        return predictor

    def analyze(
        self, image: NDArray[np.uint8], box: tuple[float, float, float, float]
    ) -> FaceAnalysis:
        """``box`` is (left, top, right, bottom) in image pixels, dlib-inclusive."""
        left, top, right, bottom = (round(v) for v in box)
        shape = self._predictor()(image, dlib.rectangle(left, top, right, bottom))
        points = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)
        landmarks = points[[_DLIB_INDEX[mark] for mark in Landmark]]
        chip = np.asarray(
            dlib.get_face_chip(image, shape, size=CHIP_SIZE, padding=CHIP_PADDING), np.uint8
        )
        face_size = float(min(box[2] - box[0], box[3] - box[1]) + 1)
        return FaceAnalysis(landmarks, measure_quality(chip, landmarks, face_size), chip)


def measure_quality(
    chip: NDArray[np.uint8], landmarks: NDArray[np.float64], face_size: float
) -> Quality:
    grey = chip.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    laplacian = (
        grey[:-2, 1:-1] + grey[2:, 1:-1] + grey[1:-1, :-2] + grey[1:-1, 2:] - 4 * grey[1:-1, 1:-1]
    )
    variance = float(laplacian.var())
    # Maps the variance to 0-100: half-way at 100 (a soft but usable chip), ~91 at 1000.
    sharpness = 100.0 * variance / (variance + 100.0)
    brightness = float(grey.mean()) / 255.0 * 100.0
    roll, yaw = estimate_pose(landmarks)
    left_eye, right_eye = eye_centres(landmarks)
    inter_eye = float(np.hypot(*(right_eye - left_eye)))
    return Quality(sharpness, brightness, face_size, inter_eye, roll, yaw)


def estimate_pose(landmarks: NDArray[np.float64]) -> tuple[float, float]:
    """(roll, yaw) in degrees from the 5 points; yaw is a coarse estimate."""
    left_eye, right_eye = eye_centres(landmarks)
    eye_line = right_eye - left_eye
    roll = math.degrees(math.atan2(eye_line[1], eye_line[0]))
    eye_distance = float(np.hypot(*eye_line))
    if eye_distance < 1e-6:
        return roll, 0.0
    # Project the nose onto the eye line: centred on a frontal face, towards one eye when
    # the head turns. The ratio is roughly sin(yaw) for a face of average proportions.
    unit = eye_line / eye_distance
    centre = (left_eye + right_eye) / 2
    offset = float(np.dot(landmarks[Landmark.NOSE_BASE] - centre, unit)) / (eye_distance / 2)
    yaw = math.degrees(math.asin(max(-1.0, min(1.0, offset))))
    return roll, yaw
