"""The project's dlib ``.dat`` reader and ONNX converters against dlib itself.

Parity: the ONNX embedder's raw descriptors match ``dlib.face_recognition_model_v1`` to
1e-5 per value on dlib's own chips (astronaut, and every face in the shared test photos);
the ONNX detector runs at any H x W with the output shape its layers imply. The reader's
primitives are checked on hand-made bytes.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import faces_dir
from facegrid.models.weights import models_dir
from facegrid_models.dlib_dat import (
    AddPrev,
    Conv,
    DatReader,
    DlibFormatError,
    Fc,
    MetricOptions,
    MmodOptions,
    Relu,
    ScaleShift,
    Skip,
    Tag,
    load_network,
    parse_network,
)
from facegrid_models.onnx_export import (
    build_detector_onnx,
    build_embedder_onnx,
    detector_output_size,
    read_detector_options,
)
from numpy.typing import NDArray

dlib = pytest.importorskip("dlib")
ort = pytest.importorskip("onnxruntime")

TOLERANCE = 1e-5
FACES_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "faces"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


# --------------------------------------------------------------------------- model files


def _model_file(name: str) -> Path:
    """A model file of the installed face-recognition-models package."""
    return models_dir() / name


EMBEDDER_DAT = "dlib_face_recognition_resnet_model_v1.dat"
DETECTOR_DAT = "mmod_human_face_detector.dat"
LANDMARKS_DAT = "shape_predictor_5_face_landmarks.dat"


@dataclass(frozen=True)
class BuiltModels:
    embedder: Path
    detector: Path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> BuiltModels:
    out = tmp_path_factory.mktemp("onnx_models")
    built = BuiltModels(out / "face_embedder.onnx", out / "face_detector.onnx")
    onnx.save(build_embedder_onnx(_model_file(EMBEDDER_DAT)), built.embedder)
    onnx.save(build_detector_onnx(_model_file(DETECTOR_DAT)), built.detector)
    return built


@pytest.fixture(scope="module")
def embedder(models: BuiltModels) -> object:
    return ort.InferenceSession(str(models.embedder), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def dlib_models() -> tuple[object, object]:
    landmarks = dlib.shape_predictor(str(_model_file(LANDMARKS_DAT)))
    recogniser = dlib.face_recognition_model_v1(str(_model_file(EMBEDDER_DAT)))
    return landmarks, recogniser


def _chip(image: NDArray[np.uint8], rect: object, landmarks: object) -> NDArray[np.uint8]:
    shape = landmarks(image, rect)  # type: ignore[operator]
    chip = dlib.get_face_chip(image, shape, size=150, padding=0.25)
    return np.ascontiguousarray(chip, dtype=np.uint8)


# --------------------------------------------------------------------------- (a) astronaut


def _astronaut() -> NDArray[np.uint8]:
    from skimage import data

    return np.ascontiguousarray(data.astronaut(), dtype=np.uint8)  # type: ignore[no-untyped-call]


def test_astronaut_descriptor_matches_dlib(
    embedder: object, dlib_models: tuple[object, object]
) -> None:
    image = _astronaut()
    detector = dlib.cnn_face_detection_model_v1(str(_model_file(DETECTOR_DAT)))
    # dlib's MMOD box at the image's own scale ...
    (found,) = detector(image, 0)
    box = (found.rect.left(), found.rect.top(), found.rect.right(), found.rect.bottom())
    assert all(abs(a - b) <= 2 for a, b in zip(box, (168, 69, 263, 164), strict=True)), box
    assert found.confidence == pytest.approx(1.0625, abs=1e-3)
    # ... but the reference descriptor comes from the box found with one upsampling, as
    # face_recognition does by default: (165, 73, 263, 171). The landmark regression trees
    # start from the box, so a 7-pixel different box gives a slightly different chip
    # (descriptor 0.0642, 0.0213, ... from the first box).
    (upsampled,) = detector(image, 1)
    rect = upsampled.rect
    box = (rect.left(), rect.top(), rect.right(), rect.bottom())
    assert all(abs(a - b) <= 8 for a, b in zip(box, (168, 69, 263, 164), strict=True)), box

    landmarks, recogniser = dlib_models
    chip = _chip(image, rect, landmarks)
    assert chip.shape == (150, 150, 3)
    expected = np.array(recogniser.compute_face_descriptor(chip))  # type: ignore[attr-defined]
    (got,) = embedder.run(None, {"chips": chip[None]})  # type: ignore[attr-defined]

    assert got.dtype == np.float32
    assert got.shape == (1, 128)
    np.testing.assert_allclose(expected[:5], [-0.0663, 0.0209, 0.0176, -0.0642, -0.1525], atol=1e-4)
    assert float(np.linalg.norm(expected)) == pytest.approx(1.4573, abs=1e-4)
    assert float(np.abs(got[0] - expected).max()) <= TOLERANCE
    # raw, not normalised
    assert float(np.linalg.norm(got[0])) == pytest.approx(1.4573, abs=1e-4)


# --------------------------------------------------------------------------- (b) photos


def _faces_dir() -> Path:
    return faces_dir() or FACES_DIR


def _photos(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            yield path


def test_photo_descriptors_match_dlib(embedder: object, dlib_models: tuple[object, object]) -> None:
    from PIL import Image

    root = _faces_dir()
    if not root.is_dir():
        pytest.skip(f"no test photos at {root} (set FACEGRID_TEST_FACES to a folder of photos)")
    photos = list(_photos(root))
    if not photos:
        pytest.skip(f"no .jpg/.jpeg/.png photos under {root}")

    hog = dlib.get_frontal_face_detector()
    landmarks, recogniser = dlib_models
    chips: list[NDArray[np.uint8]] = []
    expected: list[NDArray[np.float64]] = []
    for path in photos:
        with Image.open(path) as opened:
            image = np.ascontiguousarray(np.asarray(opened.convert("RGB")), dtype=np.uint8)
        for rect in hog(image, 0):
            chip = _chip(image, rect, landmarks)
            chips.append(chip)
            expected.append(np.array(recogniser.compute_face_descriptor(chip)))  # type: ignore[attr-defined]
    if not chips:
        pytest.skip(f"dlib found no faces in the photos under {root}")

    (got,) = embedder.run(None, {"chips": np.stack(chips)})  # type: ignore[attr-defined]
    assert got.shape == (len(chips), 128)
    diff = np.abs(got - np.stack(expected))
    worst = float(diff.max())
    assert worst <= TOLERANCE, f"max |onnx - dlib| = {worst:.3g} over {len(chips)} faces"


# --------------------------------------------------------------------------- (c) primitives


def _int(value: int) -> bytes:
    """dlib's compact integer encoding (as the reader expects it)."""
    magnitude = abs(value)
    body = magnitude.to_bytes(max(1, (magnitude.bit_length() + 7) // 8), "little")
    return bytes([len(body) | (0x80 if value < 0 else 0)]) + body


def _str(text: str) -> bytes:
    raw = text.encode()
    return _int(len(raw)) + raw


def _float(mantissa: int, exponent: int) -> bytes:
    return _int(mantissa) + _int(exponent)


def _tensor(values: NDArray[np.float32]) -> bytes:
    shape = tuple(values.shape) + (1,) * (4 - values.ndim)
    return _int(2) + b"".join(_int(d) for d in shape) + values.astype("<f4").tobytes()


def _alias(*shape: int) -> bytes:
    return _int(1) + b"".join(_int(d) for d in shape)


EMPTY_STATE = b"110" + _tensor(np.zeros((0, 0, 0, 0), np.float32)) * 3


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        (b"\x00", 0),
        (b"\x01\x00", 0),
        (b"\x01\x96", 150),
        (b"\x02\xc0\x04", 1216),
        (b"\x81\x11", -17),
        (b"\x03\x62\x90\xf5", 0xF59062),
        (b"\x88" + (2**63 - 1).to_bytes(8, "little"), -(2**63 - 1)),
    ],
)
def test_read_int(raw: bytes, value: int) -> None:
    reader = DatReader(raw)
    assert reader.read_int() == value
    assert reader.at_end


def test_read_int_rejects_bad_control_and_truncation() -> None:
    with pytest.raises(DlibFormatError, match="control byte"):
        DatReader(b"\x09" + bytes(9)).read_int()
    with pytest.raises(DlibFormatError, match="unexpected end"):
        DatReader(b"\x04\x01\x02").read_int()


def test_read_str_float_bool() -> None:
    reader = DatReader(
        _str("relu_")
        + _float(0xF59062, -17)  # dlib's mean red, 122.782
        + _float(0xA3D70A, -28)  # 0.04
        + _float(0, 0)
        + _float(-3, 2)
        + _float(0, 32000)
        + _float(0, 32001)
        + _float(0, 32002)
        + b"10"
    )
    assert reader.read_str() == "relu_"
    assert reader.read_float() == pytest.approx(122.782, abs=1e-5)
    assert reader.read_float() == pytest.approx(0.04, abs=1e-8)
    assert reader.read_float() == 0.0
    assert reader.read_float() == -12.0
    assert reader.read_float() == math.inf
    assert reader.read_float() == -math.inf
    assert math.isnan(reader.read_float())
    assert reader.read_bool() is True
    assert reader.read_bool() is False
    assert reader.at_end
    with pytest.raises(DlibFormatError, match="boolean"):
        DatReader(b"\x01").read_bool()


def test_read_tensor_and_alias() -> None:
    values = np.arange(6, dtype=np.float32).reshape(1, 2, 3, 1) - 2.5
    reader = DatReader(
        _tensor(values) + _alias(16, 3, 5, 5) + _tensor(np.zeros((0, 0, 0, 0), np.float32))
    )
    got = reader.read_tensor()
    assert got.dtype == np.float32
    assert got.shape == (1, 2, 3, 1)
    np.testing.assert_array_equal(got, values)
    assert reader.read_alias() == (16, 3, 5, 5)
    assert reader.read_tensor().shape == (0, 0, 0, 0)
    assert reader.at_end
    # raw little-endian float32 right after the shape
    assert _tensor(np.array([1.0], np.float32)).endswith(struct.pack("<f", 1.0))
    with pytest.raises(DlibFormatError, match="tensor version"):
        DatReader(_int(3) + _int(0) * 4).read_tensor()
    with pytest.raises(DlibFormatError, match="alias tensor version"):
        DatReader(_int(2) + _int(0) * 4).read_alias()


def _tiny_network(first_layer: bytes, wrappers: list[int]) -> bytes:
    """loss_metric_2 over input_rgb_image_sized(4x4) and its bottom layer.

    ``wrappers`` are the versions of the layers above the bottom one, outermost first; the
    caller appends their records (innermost first).
    """
    head = _int(1) + _str("loss_metric_2") + _float(1, -1) + _float(3, -2)
    head += b"".join(_int(v) for v in wrappers) + _int(3)
    head += _str("input_rgb_image_sized") + _float(1, 0) * 3 + _int(4) + _int(4)
    return head + first_layer + EMPTY_STATE + _int(1)  # sample_expansion_factor


def _con4(weights: NDArray[np.float32], bias: NDArray[np.float32], stride: int, pad: int) -> bytes:
    out_c, in_c, kh, kw = weights.shape
    params = np.concatenate([weights.reshape(-1), bias]).astype(np.float32)
    return (
        _str("con_4")
        + _tensor(params.reshape(-1, 1, 1, 1))
        + _int(out_c)
        + _int(kh)
        + _int(kw)
        + _int(stride) * 2
        + _int(pad) * 2
        + _alias(out_c, in_c, kh, kw)
        + _alias(1, out_c, 1, 1)
        + _float(1, 0) * 3
        + _float(0, 0)
    )


def test_parse_hand_made_network() -> None:
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((2, 3, 3, 3)).astype(np.float32)
    bias = np.array([0.5, -0.5], np.float32)
    gamma_beta = np.array([2.0, 3.0, 0.25, -1.0], np.float32)
    affine = _str("affine_") + _tensor(gamma_beta.reshape(-1, 1, 1, 1))
    affine += _alias(1, 2, 1, 1) * 2 + _int(0)
    fc_w = rng.standard_normal((2, 5)).astype(np.float32)
    fc = _str("fc_2") + _int(5) + _int(2) + _tensor(fc_w.reshape(2, 5, 1, 1))
    fc += _alias(2, 5, 1, 1) + _alias(0, 0, 0, 0) + _int(1) + _float(1, 0) * 3 + _float(0, 0)
    pool_all = _str("avg_pool_2") + _int(0) * 2 + _int(1) * 2 + _int(0) * 2

    # forward: con, [tag], affine, relu, add_prev, avg_pool_everything, fc
    wrappers_outer_first = [2, 2, 2, 2, 2, 1]  # fc, pool, add_prev, relu, affine, tag
    data = (
        _tiny_network(_con4(weights, bias, 1, 1), wrappers_outer_first)
        + affine
        + EMPTY_STATE
        + _str("relu_")
        + EMPTY_STATE
        + _str("add_prev_")
        + EMPTY_STATE
        + pool_all
        + EMPTY_STATE
        + fc
        + EMPTY_STATE
    )
    net = parse_network(data)
    assert net.input.kind == "input_rgb_image_sized"
    assert net.input.size == (4, 4)
    assert net.input.mean_rgb == (1.0, 1.0, 1.0)
    assert net.loss.options == MetricOptions(margin=0.5, distance_threshold=0.75)
    kinds = [type(layer).__name__ for layer in net.layers]
    assert kinds == ["Conv", "Tag", "ScaleShift", "Relu", "AddPrev", "AvgPool", "Fc"]
    conv = net.layers[0]
    assert isinstance(conv, Conv)
    np.testing.assert_array_equal(conv.weights, weights)
    assert conv.bias is not None
    np.testing.assert_array_equal(conv.bias, bias)
    assert (conv.stride, conv.padding) == ((1, 1), (1, 1))
    tag, scale_shift, add_prev = net.layers[1], net.layers[2], net.layers[4]
    assert isinstance(tag, Tag)
    assert isinstance(add_prev, AddPrev)
    assert add_prev.tag == tag.id
    assert isinstance(scale_shift, ScaleShift)
    np.testing.assert_array_equal(scale_shift.scale, [2.0, 3.0])
    np.testing.assert_array_equal(scale_shift.shift, [0.25, -1.0])
    fc_layer = net.layers[6]
    assert isinstance(fc_layer, Fc)
    assert fc_layer.bias is None
    np.testing.assert_array_equal(fc_layer.weights, fc_w)


def test_unknown_layer_type_is_a_clear_error() -> None:
    data = _tiny_network(_str("mystery_layer_") + b"\x00" * 8, [])
    with pytest.raises(DlibFormatError, match="unknown or unsupported layer type 'mystery_layer_'"):
        parse_network(data)


def test_unknown_loss_and_trailing_bytes_are_errors() -> None:
    with pytest.raises(DlibFormatError, match="unknown loss layer type"):
        parse_network(_int(1) + _str("loss_whatever_"))
    data = _tiny_network(
        _con4(np.zeros((1, 3, 1, 1), np.float32), np.zeros(1, np.float32), 1, 0), []
    )
    assert len(parse_network(data).layers) == 1
    with pytest.raises(DlibFormatError, match="unread bytes"):
        parse_network(data + b"\x00")


def test_real_files_structure() -> None:
    resnet = load_network(_model_file(EMBEDDER_DAT))
    assert resnet.input.size == (150, 150)
    assert resnet.input.mean_rgb == pytest.approx((122.782, 117.001, 104.298), abs=1e-3)
    assert isinstance(resnet.layers[-1], Fc)
    assert resnet.layers[-1].weights.shape == (256, 128)
    tags = [layer.id for layer in resnet.layers if isinstance(layer, Tag)]
    used = [layer.tag for layer in resnet.layers if isinstance(layer, (AddPrev, Skip))]
    assert sorted(used) == sorted(tags)  # every tag is used exactly once
    assert sum(isinstance(layer, Skip) for layer in resnet.layers) == 4  # the four downsamplings

    mmod = load_network(_model_file(DETECTOR_DAT))
    assert isinstance(mmod.loss.options, MmodOptions)
    assert (mmod.loss.options.detector_width, mmod.loss.options.detector_height) == (80, 80)
    assert mmod.loss.options.nms_iou_threshold == pytest.approx(0.338, abs=1e-3)
    convs = [layer for layer in mmod.layers if isinstance(layer, Conv)]
    assert [c.padding for c in convs if c.stride == (2, 2)] == [(0, 0)] * 3
    assert sum(isinstance(layer, Relu) for layer in mmod.layers) == 6


# --------------------------------------------------------------------------- (d) detector


def test_detector_runs_at_any_size(models: BuiltModels) -> None:
    session = ort.InferenceSession(str(models.detector), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    (out,) = session.get_outputs()
    assert (inp.name, inp.type) == ("image", "tensor(float)")
    assert (out.name, out.type) == ("scores", "tensor(float)")
    rng = np.random.default_rng(1)

    def down(size: int) -> int:
        return (size - 5) // 2 + 1

    for height, width in [(120, 160), (203, 97)]:
        image = rng.uniform(0, 255, (2, height, width, 3)).astype(np.float32)
        (scores,) = session.run(None, {"image": image})
        expected = detector_output_size(height, width, _model_file(DETECTOR_DAT))
        # three 5x5 stride-2 unpadded convolutions; the rest keep the size
        assert expected == (down(down(down(height))), down(down(down(width))))
        assert scores.dtype == np.float32
        assert scores.shape == (2, 1, *expected)
        assert np.isfinite(scores).all()

    meta = {p.key: p.value for p in onnx.load(str(models.detector)).metadata_props}
    assert meta["facegrid_model_version"] == "dlib_mmod_v1"
    assert meta["source_file"] == "mmod_human_face_detector.dat"
    assert len(meta["source_sha256"]) == 64
    assert meta["detector_window_width"] == meta["detector_window_height"] == "80"
    assert float(meta["nms_iou_threshold"]) == pytest.approx(0.338, abs=1e-3)
    options = read_detector_options(_model_file(DETECTOR_DAT))
    assert (options.output_stride, options.output_offset) == (8, 14)


def test_detector_scores_the_astronaut(models: BuiltModels) -> None:
    """At pyramid level 1 (5/6) the best window sits on dlib's box with dlib's score."""
    from skimage import transform

    session = ort.InferenceSession(str(models.detector), providers=["CPUExecutionProvider"])
    image = _astronaut()
    scaled = transform.rescale(image, 5 / 6, channel_axis=2, anti_aliasing=True, order=1)
    level = np.ascontiguousarray((scaled * 255 + 0.5).astype(np.uint8))
    (scores,) = session.run(None, {"image": level[None].astype(np.float32)})
    row, col = np.unravel_index(int(scores[0, 0].argmax()), scores.shape[2:])
    centre = ((8 * col + 14) * 6 / 5, (8 * row + 14) * 6 / 5)
    assert centre == pytest.approx((215.5, 116.5), abs=8)
    assert float(scores.max()) == pytest.approx(1.0625, abs=0.05)
