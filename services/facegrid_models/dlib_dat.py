"""A reader of dlib's DNN ``.dat`` serialization (the project's own, written from the format).

dlib stores a network from the loss layer inwards: the loss layer's name and options, one
version number per wrapper layer (``2`` for a computational layer, ``1`` for a tag or skip
marker, ``3`` for the bottom layer that also holds the input layer), the input layer, and
then the computational layers' records from the input side outwards. This module turns a
file into a :class:`DlibNetwork`: the input layer's settings, the loss layer's options and
a list of typed layers in forward order (input to output), with batch-norm and affine
layers reduced to a per-channel :class:`ScaleShift`.

Primitive encodings (all little-endian):

* integer: a control byte whose low 4 bits give the number of value bytes that follow and
  whose bit ``0x80`` marks a negative number;
* string: integer length, then the bytes;
* float/double: integer mantissa then integer exponent, value = mantissa * 2**exponent
  (exponents 32000/32001/32002 mean +inf/-inf/nan);
* bool: one ASCII byte, ``'0'`` or ``'1'``;
* tensor (version 2): num_samples, k, nr, nc, then raw float32 values;
* alias tensor (version 1): its shape only; a layer's parameter blocks follow each other
  in its params tensor.

The file does not record tag ids (they are C++ template arguments), so the reader infers
them: a marker that directly follows another marker is a skip, every other marker is a
tag; a skip jumps back to the open tag below the newest one, and ``add_prev`` consumes the
newest open tag. That is how dlib's residual templates (``add_prev1<block<tag1<...>>>`` and
``add_prev2<avg_pool<skip1<tag2<block<tag1<...>>>>>>``) nest.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeAlias

import numpy as np
from numpy.typing import NDArray

FloatArray: TypeAlias = NDArray[np.float32]

# float_details' special exponents
_EXP_INF = 32000
_EXP_NINF = 32001
_EXP_NAN = 32002

# dlib enums
_FC_HAS_BIAS = 0
_FC_NO_BIAS = 1
_CONV_MODE = 0
_FC_MODE = 1


class DlibFormatError(ValueError):
    """The bytes are not a dlib DNN file this reader understands."""


# --------------------------------------------------------------------------- primitives


class DatReader:
    """A cursor over dlib-serialized bytes, one method per primitive."""

    def __init__(self, data: bytes, pos: int = 0) -> None:
        self.data = data
        self.pos = pos

    def _take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise DlibFormatError(
                f"unexpected end of data at byte {self.pos}: wanted {n} bytes, "
                f"{len(self.data) - self.pos} left"
            )
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    @property
    def at_end(self) -> bool:
        return self.pos >= len(self.data)

    def read_int(self) -> int:
        """A compact integer: control byte (size in the low 4 bits, 0x80 = negative)."""
        start = self.pos
        control = self._take(1)[0]
        size = control & 0x0F
        if size > 8:
            raise DlibFormatError(f"bad integer control byte 0x{control:02x} at byte {start}")
        value = int.from_bytes(self._take(size), "little")
        return -value if control & 0x80 else value

    def read_str(self) -> str:
        start = self.pos
        length = self.read_int()
        if length < 0:
            raise DlibFormatError(f"negative string length {length} at byte {start}")
        raw = self._take(length)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DlibFormatError(f"string at byte {start} is not text: {raw[:16]!r}") from exc

    def read_float(self) -> float:
        """A float/double stored as mantissa and exponent (value = m * 2**e)."""
        mantissa = self.read_int()
        exponent = self.read_int()
        if exponent == _EXP_INF:
            return math.inf
        if exponent == _EXP_NINF:
            return -math.inf
        if exponent == _EXP_NAN:
            return math.nan
        return math.ldexp(float(mantissa), exponent)

    def read_bool(self) -> bool:
        start = self.pos
        byte = self._take(1)
        if byte == b"1":
            return True
        if byte == b"0":
            return False
        raise DlibFormatError(f"bad boolean byte {byte!r} at byte {start}")

    def _read_shape(self) -> tuple[int, int, int, int]:
        n, k, nr, nc = (self.read_int() for _ in range(4))
        if min(n, k, nr, nc) < 0:
            raise DlibFormatError(
                f"negative tensor dimension {(n, k, nr, nc)} before byte {self.pos}"
            )
        return (n, k, nr, nc)

    def read_tensor(self) -> FloatArray:
        """A tensor (version 2): shape [num_samples, k, nr, nc] then raw float32 LE."""
        start = self.pos
        version = self.read_int()
        if version != 2:
            raise DlibFormatError(f"unsupported tensor version {version} at byte {start}")
        shape = self._read_shape()
        count = shape[0] * shape[1] * shape[2] * shape[3]
        raw = self._take(4 * count)
        return np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(shape)

    def read_alias(self) -> tuple[int, int, int, int]:
        """An alias tensor (version 1): only its shape is stored."""
        start = self.pos
        version = self.read_int()
        if version != 1:
            raise DlibFormatError(f"unsupported alias tensor version {version} at byte {start}")
        return self._read_shape()


# --------------------------------------------------------------------------- descriptions


@dataclass(frozen=True)
class Conv:
    """2-D convolution, NCHW; weights [out, in, kh, kw]; bias [out] or None."""

    weights: FloatArray
    bias: FloatArray | None
    stride: tuple[int, int]  # (y, x)
    padding: tuple[int, int]  # (y, x), symmetric

    @property
    def out_channels(self) -> int:
        return int(self.weights.shape[0])

    @property
    def kernel(self) -> tuple[int, int]:
        return (int(self.weights.shape[2]), int(self.weights.shape[3]))


@dataclass(frozen=True)
class ScaleShift:
    """Per-channel y = x * scale + shift (an affine layer, or a batch norm folded)."""

    scale: FloatArray  # [C]
    shift: FloatArray  # [C]
    source: str  # "affine" or "bn"


@dataclass(frozen=True)
class Relu:
    pass


@dataclass(frozen=True)
class MaxPool:
    size: tuple[int, int]  # (nr, nc)
    stride: tuple[int, int]
    padding: tuple[int, int]


@dataclass(frozen=True)
class AvgPool:
    """Average pooling; size (0, 0) is dlib's avg_pool_everything (global average)."""

    size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]

    @property
    def everything(self) -> bool:
        return self.size == (0, 0)


@dataclass(frozen=True)
class Tag:
    """Marks the current output so later layers can refer to it by ``id``."""

    id: int


@dataclass(frozen=True)
class Skip:
    """Replaces the current output with that of tag ``tag``."""

    tag: int


@dataclass(frozen=True)
class AddPrev:
    """Adds the output of tag ``tag``; the smaller operand is zero-padded at the end."""

    tag: int


@dataclass(frozen=True)
class Fc:
    """Fully connected on the flattened input; weights [in, out] (y = x @ W + b)."""

    weights: FloatArray
    bias: FloatArray | None


Layer: TypeAlias = Conv | ScaleShift | Relu | MaxPool | AvgPool | Tag | Skip | AddPrev | Fc


@dataclass(frozen=True)
class InputInfo:
    kind: str  # "input_rgb_image", "input_rgb_image_sized" or "input_rgb_image_pyramid"
    mean_rgb: tuple[float, float, float]
    size: tuple[int, int] | None = None  # (rows, cols) for input_rgb_image_sized
    pyramid_padding: int | None = None  # for input_rgb_image_pyramid
    pyramid_outer_padding: int | None = None


@dataclass(frozen=True)
class MmodOptions:
    """loss_mmod_'s options (mmod_options version 1: a single detector window)."""

    detector_width: int
    detector_height: int
    loss_per_false_alarm: float
    loss_per_missed_target: float
    truth_match_iou_threshold: float
    nms_iou_threshold: float
    nms_percent_covered_threshold: float
    ignore_iou_threshold: float
    ignore_percent_covered_threshold: float


@dataclass(frozen=True)
class MetricOptions:
    """loss_metric_'s options."""

    margin: float
    distance_threshold: float


@dataclass(frozen=True)
class LossInfo:
    kind: str  # the record's name, e.g. "loss_mmod_" or "loss_metric_2"
    options: MmodOptions | MetricOptions | None = None


@dataclass(frozen=True)
class DlibNetwork:
    loss: LossInfo
    input: InputInfo
    layers: list[Layer] = field(default_factory=list)  # forward order, input to output
    sha256: str = ""


# --------------------------------------------------------------------------- loss & input


def _read_loss(r: DatReader) -> LossInfo:
    start = r.pos
    version = r.read_int()
    if version != 1:
        raise DlibFormatError(f"unsupported loss wrapper version {version} at byte {start}")
    name = r.read_str()
    if name == "loss_mmod_":
        return LossInfo(name, _read_mmod_options(r))
    if name == "loss_metric_2":
        return LossInfo(
            name, MetricOptions(margin=r.read_float(), distance_threshold=r.read_float())
        )
    raise DlibFormatError(f"unknown loss layer type {name!r} at byte {start}")


def _read_mmod_options(r: DatReader) -> MmodOptions:
    start = r.pos
    version = r.read_int()
    if version != 1:
        raise DlibFormatError(
            f"unsupported mmod_options version {version} at byte {start} (only 1 is read)"
        )
    width = r.read_int()
    height = r.read_int()
    loss_fa = r.read_float()
    loss_miss = r.read_float()
    truth_iou = r.read_float()
    nms_iou, nms_cover = r.read_float(), r.read_float()
    ign_iou, ign_cover = r.read_float(), r.read_float()
    return MmodOptions(
        detector_width=width,
        detector_height=height,
        loss_per_false_alarm=loss_fa,
        loss_per_missed_target=loss_miss,
        truth_match_iou_threshold=truth_iou,
        nms_iou_threshold=nms_iou,
        nms_percent_covered_threshold=nms_cover,
        ignore_iou_threshold=ign_iou,
        ignore_percent_covered_threshold=ign_cover,
    )


def _read_input(r: DatReader) -> InputInfo:
    start = r.pos
    name = r.read_str()
    if name in ("input_rgb_image", "input_rgb_image_sized"):
        mean = (r.read_float(), r.read_float(), r.read_float())
        if name == "input_rgb_image":
            return InputInfo(name, mean)
        rows, cols = r.read_int(), r.read_int()
        return InputInfo(name, mean, size=(rows, cols))
    if name in ("input_rgb_image_pyramid", "input_rgb_image_pyramid2"):
        mean = (r.read_float(), r.read_float(), r.read_float())
        if name == "input_rgb_image_pyramid2":
            padding, outer = r.read_int(), r.read_int()
        else:  # dlib's defaults for files written before the paddings were stored
            padding, outer = 10, 11
        return InputInfo(
            "input_rgb_image_pyramid", mean, pyramid_padding=padding, pyramid_outer_padding=outer
        )
    raise DlibFormatError(f"unknown input layer type {name!r} at byte {start}")


# --------------------------------------------------------------------------- layers


def _split(params: FloatArray, *shapes: tuple[int, int, int, int]) -> list[FloatArray]:
    """Cut consecutive blocks of the given shapes out of a params tensor."""
    flat = params.reshape(-1)
    out: list[FloatArray] = []
    offset = 0
    for shape in shapes:
        count = shape[0] * shape[1] * shape[2] * shape[3]
        if offset + count > flat.size:
            raise DlibFormatError(
                f"parameter blocks {shapes} need more than the {flat.size} stored values"
            )
        out.append(flat[offset : offset + count].reshape(shape).copy())
        offset += count
    if offset != flat.size:
        raise DlibFormatError(f"parameter blocks {shapes} leave {flat.size - offset} values unused")
    return out


def _read_conv(r: DatReader, name: str) -> list[Layer]:
    params = r.read_tensor()
    num_filters = r.read_int()
    nr, nc = r.read_int(), r.read_int()
    stride = (r.read_int(), r.read_int())
    padding = (r.read_int(), r.read_int())
    filters_shape = r.read_alias()
    biases_shape = r.read_alias()
    for _ in range(4):  # learning-rate and weight-decay multipliers
        r.read_float()
    use_bias = r.read_bool() if name in ("con_5", "con_6") else True
    use_relu = r.read_bool() if name == "con_6" else False
    if filters_shape[0] != num_filters or filters_shape[2:] != (nr, nc):
        raise DlibFormatError(
            f"{name}: filter alias {filters_shape} does not match {num_filters}x{nr}x{nc}"
        )
    if params.size == 0:
        raise DlibFormatError(f"{name}: the layer was never set up (empty params)")
    has_bias = use_bias and biases_shape[1] > 0
    if has_bias:
        weights, bias = _split(params, filters_shape, biases_shape)
        bias_vec: FloatArray | None = bias.reshape(-1)
    else:
        (weights,) = _split(params, filters_shape)
        bias_vec = None
    layers: list[Layer] = [Conv(weights, bias_vec, stride, padding)]
    if use_relu:
        layers.append(Relu())
    return layers


def _read_affine(r: DatReader) -> ScaleShift:
    params = r.read_tensor()
    gamma_shape = r.read_alias()
    beta_shape = r.read_alias()
    mode = r.read_int()
    if mode not in (_CONV_MODE, _FC_MODE):
        raise DlibFormatError(f"affine_: unknown mode {mode}")
    if gamma_shape[2] * gamma_shape[3] != 1:
        raise DlibFormatError(
            f"affine_: per-element (FC mode, {gamma_shape}) parameters are not supported"
        )
    gamma, beta = _split(params, gamma_shape, beta_shape)
    return ScaleShift(gamma.reshape(-1), beta.reshape(-1), "affine")


def _read_bn(r: DatReader, name: str) -> ScaleShift:
    params = r.read_tensor()
    gamma_shape = r.read_alias()
    beta_shape = r.read_alias()
    r.read_tensor()  # means of the last training batch
    r.read_tensor()  # invstds of the last training batch
    running_means = r.read_tensor().reshape(-1).astype(np.float64)
    running_variances = r.read_tensor().reshape(-1).astype(np.float64)
    r.read_int()  # num_updates
    r.read_int()  # running_stats_window_size
    for _ in range(4):
        r.read_float()
    eps = r.read_float()
    if name != "bn_con2":
        raise DlibFormatError(f"{name}: only convolutional batch norm (bn_con2) is supported")
    gamma, beta = _split(params, gamma_shape, beta_shape)
    g = gamma.reshape(-1).astype(np.float64)
    b = beta.reshape(-1).astype(np.float64)
    if not (g.size == b.size == running_means.size == running_variances.size):
        raise DlibFormatError(f"{name}: parameter sizes differ")
    scale = g / np.sqrt(running_variances + eps)
    shift = b - running_means * scale
    return ScaleShift(scale.astype(np.float32), shift.astype(np.float32), "bn")


def _read_pool(r: DatReader, name: str) -> MaxPool | AvgPool:
    nr, nc = r.read_int(), r.read_int()
    stride = (r.read_int(), r.read_int())
    padding = (r.read_int(), r.read_int())
    if name == "max_pool_2":
        return MaxPool((nr, nc), stride, padding)
    return AvgPool((nr, nc), stride, padding)


def _read_fc(r: DatReader) -> Fc:
    num_outputs = r.read_int()
    num_inputs = r.read_int()
    params = r.read_tensor()
    weights_shape = r.read_alias()
    biases_shape = r.read_alias()
    bias_mode = r.read_int()
    for _ in range(4):
        r.read_float()
    if weights_shape[:2] != (num_inputs, num_outputs):
        raise DlibFormatError(
            f"fc_2: weights alias {weights_shape} is not [{num_inputs}, {num_outputs}]"
        )
    if bias_mode == _FC_HAS_BIAS:
        weights, bias = _split(params, weights_shape, biases_shape)
        return Fc(weights.reshape(num_inputs, num_outputs), bias.reshape(-1))
    if bias_mode == _FC_NO_BIAS:
        (weights,) = _split(params, weights_shape)
        return Fc(weights.reshape(num_inputs, num_outputs), None)
    raise DlibFormatError(f"fc_2: unknown bias mode {bias_mode}")


def _read_layer_details(r: DatReader) -> list[Layer]:
    start = r.pos
    name = r.read_str()
    if name in ("con_4", "con_5", "con_6"):
        return _read_conv(r, name)
    if name == "affine_":
        return [_read_affine(r)]
    if name in ("bn_con2", "bn_fc2"):
        return [_read_bn(r, name)]
    if name == "relu_":
        return [Relu()]
    if name in ("max_pool_2", "avg_pool_2"):
        return [_read_pool(r, name)]
    if name == "fc_2":
        return [_read_fc(r)]
    if name == "add_prev_":
        return [AddPrev(tag=-1)]  # resolved by _resolve_tags
    raise DlibFormatError(f"unknown or unsupported layer type {name!r} at byte {start}")


def _read_layer_state(r: DatReader) -> None:
    """The three flags and three (empty) tensors every add_layer stores after its details."""
    for _ in range(3):
        r.read_bool()
    for _ in range(3):
        r.read_tensor()


# --------------------------------------------------------------------------- network


class _Marker:
    """A tag or skip wrapper, before its kind and id are known."""


def _resolve_tags(raw: list[Layer | _Marker]) -> list[Layer]:
    out: list[Layer] = []
    open_tags: list[int] = []
    next_id = 1
    previous_was_tag = False
    for item in raw:
        if isinstance(item, _Marker):
            if previous_was_tag:
                if len(open_tags) < 2:
                    raise DlibFormatError("a skip layer has no earlier tag to jump to")
                target = open_tags.pop(-2)
                out.append(Skip(tag=target))
                previous_was_tag = False
            else:
                open_tags.append(next_id)
                out.append(Tag(id=next_id))
                next_id += 1
                previous_was_tag = True
            continue
        previous_was_tag = False
        if isinstance(item, AddPrev):
            if not open_tags:
                raise DlibFormatError("an add_prev layer has no tag to add")
            out.append(AddPrev(tag=open_tags.pop()))
        else:
            out.append(item)
    return out


def parse_network(data: bytes) -> DlibNetwork:
    """Parse the bytes of a dlib DNN ``.dat`` file."""
    r = DatReader(data)
    loss = _read_loss(r)
    wrappers: list[int] = []
    while True:
        start = r.pos
        version = r.read_int()
        if version == 3:
            break
        if version not in (1, 2):
            raise DlibFormatError(f"unexpected layer wrapper version {version} at byte {start}")
        wrappers.append(version)
    net_input = _read_input(r)

    raw: list[Layer | _Marker] = list(_read_layer_details(r))
    _read_layer_state(r)
    r.read_int()  # sample_expansion_factor, stored by the bottom layer only
    for version in reversed(wrappers):
        if version == 1:
            raw.append(_Marker())
        else:
            raw.extend(_read_layer_details(r))
            _read_layer_state(r)
    if not r.at_end:
        raise DlibFormatError(f"{len(data) - r.pos} unread bytes after the last layer")
    return DlibNetwork(
        loss=loss,
        input=net_input,
        layers=_resolve_tags(raw),
        sha256=hashlib.sha256(data).hexdigest(),
    )


def load_network(path: Path) -> DlibNetwork:
    """Read and parse a dlib DNN ``.dat`` file."""
    return parse_network(Path(path).read_bytes())
