"""Converters of dlib's two networks to ONNX, from the project's own ``.dat`` reader.

* :func:`build_embedder_onnx` — ``dlib_face_recognition_resnet_model_v1.dat``: input
  ``chips`` uint8 [N, 150, 150, 3] (RGB, NHWC, as ``dlib.get_face_chip`` returns), output
  ``descriptors`` float32 [N, 128], raw (dlib does not normalise them).
* :func:`build_detector_onnx` — ``mmod_human_face_detector.dat``: input ``image`` float32
  [N, H, W, 3] (RGB pixel values 0-255, NHWC, H and W dynamic), output ``scores`` float32
  [N, 1, H', W'], the raw output of the final convolution (no pyramid, no thresholding,
  no NMS: those belong to the caller, see :func:`read_detector_options`).

Both graphs do dlib's input scaling in-graph: NHWC to NCHW, (pixel - mean) / 256. The
detector takes float pixels because dlib builds its image pyramid in float: the smaller
levels are not whole pixel values, and rounding them to uint8 moves scores by up to 1e-2
and can swap two near-equal windows (measured on the test photos).
Opset 17, IR version 9.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper

from facegrid_models.dlib_dat import (
    AddPrev,
    AvgPool,
    Conv,
    DlibNetwork,
    Fc,
    InputInfo,
    Layer,
    MaxPool,
    MmodOptions,
    Relu,
    ScaleShift,
    Skip,
    Tag,
    load_network,
)

OPSET = 17
IR_VERSION = 9
EMBEDDER_MODEL_VERSION = "dlib_resnet_v1"
DETECTOR_MODEL_VERSION = "dlib_mmod_v1"

EMBEDDER_INPUT = "chips"
EMBEDDER_OUTPUT = "descriptors"
DETECTOR_INPUT = "image"
DETECTOR_OUTPUT = "scores"

# Static shapes where known; None for a dynamic dimension. (channels, rows, cols)
_Shape = tuple[int, int | None, int | None]


class OnnxExportError(ValueError):
    """The network cannot be expressed by this converter."""


@dataclass(frozen=True)
class DetectorOptions:
    """What a caller of the detector graph needs besides the scores.

    An output cell (row r, column c) of ``scores`` is centred on input pixel
    (output_offset + output_stride * r, output_offset + output_stride * c).
    """

    window_width: int
    window_height: int
    nms_iou_threshold: float
    nms_percent_covered_threshold: float
    mean_rgb: tuple[float, float, float]
    pyramid_padding: int
    pyramid_outer_padding: int
    output_stride: int
    output_offset: int


# --------------------------------------------------------------------------- graph building


class _GraphBuilder:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._count = 0

    def name(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}_{self._count}"

    def const(self, prefix: str, value: NDArray[np.generic]) -> str:
        name = self.name(prefix)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def node(
        self,
        op: str,
        inputs: list[str],
        output: str | None = None,
        **attrs: Any,
    ) -> str:
        out = output or self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.name(op), **attrs))
        return out


def _out_size(size: int | None, kernel: int, stride: int, pad: int) -> int | None:
    if size is None:
        return None
    result = (size + 2 * pad - kernel) // stride + 1
    if result < 1:
        raise OnnxExportError(f"a {kernel}-wide window with stride {stride} does not fit {size}")
    return result


def _preprocess(g: _GraphBuilder, input_name: str, info: InputInfo, cast: bool) -> str:
    x = g.node("Cast", [input_name], to=TensorProto.FLOAT) if cast else input_name
    x = g.node("Transpose", [x], perm=[0, 3, 1, 2])
    mean = np.array(info.mean_rgb, dtype=np.float32).reshape(1, 3, 1, 1)
    x = g.node("Sub", [x, g.const("input_mean", mean)])
    return g.node("Mul", [x, g.const("input_scale", np.array(1.0 / 256.0, dtype=np.float32))])


def _emit_layers(
    g: _GraphBuilder, x: str, shape: _Shape, layers: list[Layer], final_output: str
) -> tuple[str, _Shape | int]:
    """Emit the layers; returns the last tensor and its shape (an int after an Fc)."""
    tags: dict[int, tuple[str, _Shape]] = {}
    flat: int | None = None  # feature count once an Fc has run
    for i, layer in enumerate(layers):
        last = i == len(layers) - 1
        out = final_output if last else None
        c, h, w = shape
        if flat is not None and not isinstance(layer, (Fc, Relu, ScaleShift)):
            raise OnnxExportError(f"layer {i} ({type(layer).__name__}) after a fully connected one")
        if isinstance(layer, Conv):
            if layer.weights.shape[1] != c:
                raise OnnxExportError(
                    f"layer {i}: conv expects {layer.weights.shape[1]} channels, gets {c}"
                )
            (kh, kw), (sy, sx), (py, px) = layer.kernel, layer.stride, layer.padding
            inputs = [x, g.const("conv_w", layer.weights)]
            if layer.bias is not None:
                inputs.append(g.const("conv_b", layer.bias))
            x = g.node(
                "Conv",
                inputs,
                out,
                kernel_shape=[kh, kw],
                strides=[sy, sx],
                pads=[py, px, py, px],
            )
            shape = (layer.out_channels, _out_size(h, kh, sy, py), _out_size(w, kw, sx, px))
        elif isinstance(layer, ScaleShift):
            if flat is None:
                if layer.scale.size != c:
                    raise OnnxExportError(f"layer {i}: {layer.scale.size} scales for {c} channels")
                bshape: tuple[int, ...] = (1, c, 1, 1)
            else:
                bshape = (1, flat)
            x = g.node("Mul", [x, g.const("scale", layer.scale.reshape(bshape))])
            x = g.node("Add", [x, g.const("shift", layer.shift.reshape(bshape))], out)
        elif isinstance(layer, Relu):
            x = g.node("Relu", [x], out)
        elif isinstance(layer, MaxPool):
            (kh, kw), (sy, sx), (py, px) = layer.size, layer.stride, layer.padding
            x = g.node(
                "MaxPool", [x], out, kernel_shape=[kh, kw], strides=[sy, sx], pads=[py, px, py, px]
            )
            shape = (c, _out_size(h, kh, sy, py), _out_size(w, kw, sx, px))
        elif isinstance(layer, AvgPool):
            if layer.everything:
                x = g.node("GlobalAveragePool", [x], out)
                shape = (c, 1, 1)
            else:
                (kh, kw), (sy, sx), (py, px) = layer.size, layer.stride, layer.padding
                x = g.node(
                    "AveragePool",
                    [x],
                    out,
                    kernel_shape=[kh, kw],
                    strides=[sy, sx],
                    pads=[py, px, py, px],
                    count_include_pad=0,
                )
                shape = (c, _out_size(h, kh, sy, py), _out_size(w, kw, sx, px))
        elif isinstance(layer, Tag):
            tags[layer.id] = (x, shape)
            if last:
                x = g.node("Identity", [x], out)
        elif isinstance(layer, Skip):
            x, shape = tags[layer.tag]
            if last:
                x = g.node("Identity", [x], out)
        elif isinstance(layer, AddPrev):
            other, other_shape = tags[layer.tag]
            x, shape = _padded_add(g, x, shape, other, other_shape, out)
        elif isinstance(layer, Fc):
            n_in, n_out = layer.weights.shape
            have = flat if flat is not None else _flat_count(shape)
            if have != n_in:
                raise OnnxExportError(f"layer {i}: fc expects {n_in} inputs, gets {have}")
            if flat is None:
                x = g.node("Flatten", [x], axis=1)
            x = g.node(
                "MatMul",
                [x, g.const("fc_w", layer.weights)],
                None if layer.bias is not None else out,
            )
            if layer.bias is not None:
                x = g.node("Add", [x, g.const("fc_b", layer.bias)], out)
            flat = int(n_out)
        else:  # pragma: no cover - the Layer union is closed
            raise OnnxExportError(f"layer {i}: unsupported {type(layer).__name__}")
    return x, (flat if flat is not None else shape)


def _flat_count(shape: _Shape) -> int:
    c, h, w = shape
    if h is None or w is None:
        raise OnnxExportError("a fully connected layer needs static spatial dimensions")
    return c * h * w


def _padded_add(
    g: _GraphBuilder, a: str, a_shape: _Shape, b: str, b_shape: _Shape, out: str | None
) -> tuple[str, _Shape]:
    """dlib's add_prev: the smaller operand is zero-padded at the end (channels and space)."""
    if a_shape == b_shape:
        return g.node("Add", [a, b], out), a_shape
    dims_a = [d for d in a_shape if d is not None]
    dims_b = [d for d in b_shape if d is not None]
    if len(dims_a) != 3 or len(dims_b) != 3:
        raise OnnxExportError(
            f"add_prev of differently shaped tensors {a_shape} and {b_shape} needs static shapes"
        )
    c, h, w = (max(p, q) for p, q in zip(dims_a, dims_b, strict=True))

    def pad(name: str, dims: list[int]) -> str:
        extra = [c - dims[0], h - dims[1], w - dims[2]]
        if not any(extra):
            return name
        pads = np.array([0, 0, 0, 0, 0, *extra], dtype=np.int64)  # all at the end
        return g.node("Pad", [name, g.const("pads", pads)], mode="constant")

    return g.node("Add", [pad(a, dims_a), pad(b, dims_b)], out), (c, h, w)


def _model(
    g: _GraphBuilder,
    name: str,
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    metadata: dict[str, str],
) -> onnx.ModelProto:
    graph = helper.make_graph(g.nodes, name, inputs, outputs, initializer=g.initializers)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="facegrid",
        ir_version=IR_VERSION,
    )
    helper.set_model_props(model, metadata)
    onnx.checker.check_model(model)
    return model


def _source_metadata(dat_path: Path, net: DlibNetwork, version: str) -> dict[str, str]:
    return {
        "source_file": dat_path.name,
        "source_sha256": net.sha256,
        "facegrid_model_version": version,
        "input_mean_rgb": ",".join(repr(v) for v in net.input.mean_rgb),
        "input_scale": repr(1.0 / 256.0),
    }


# --------------------------------------------------------------------------- embedder


def build_embedder_onnx(dat_path: Path) -> onnx.ModelProto:
    """dlib's ResNet face descriptor as ONNX: ``chips`` uint8 [N,150,150,3] → ``descriptors``."""
    dat_path = Path(dat_path)
    net = load_network(dat_path)
    if net.input.kind != "input_rgb_image_sized" or net.input.size is None:
        raise OnnxExportError(f"{dat_path.name}: expected a fixed-size RGB input, got {net.input}")
    rows, cols = net.input.size
    g = _GraphBuilder()
    x = _preprocess(g, EMBEDDER_INPUT, net.input, cast=True)
    _, out_shape = _emit_layers(g, x, (3, rows, cols), net.layers, EMBEDDER_OUTPUT)
    if not isinstance(out_shape, int):
        raise OnnxExportError(f"{dat_path.name}: the network does not end in a vector")
    inputs = [
        helper.make_tensor_value_info(EMBEDDER_INPUT, TensorProto.UINT8, ["N", rows, cols, 3])
    ]
    outputs = [helper.make_tensor_value_info(EMBEDDER_OUTPUT, TensorProto.FLOAT, ["N", out_shape])]
    metadata = _source_metadata(dat_path, net, EMBEDDER_MODEL_VERSION)
    metadata["descriptor_size"] = str(out_shape)
    metadata["normalised"] = "false"
    return _model(g, "dlib_face_embedder", inputs, outputs, metadata)


# --------------------------------------------------------------------------- detector


def _output_mapping(layers: list[Layer]) -> tuple[int, int]:
    """(stride, offset) so that output cell c is centred on input pixel stride*c + offset.

    Follows dlib's map_output_to_input per layer: p_in = p_out*stride - padding + size/2.
    Uses the row direction (the detector's layers are square).
    """
    stride, offset = 1, 0
    for layer in reversed(layers):
        if isinstance(layer, Conv):
            s, p, k = layer.stride[0], layer.padding[0], layer.kernel[0]
        elif isinstance(layer, (MaxPool, AvgPool)) and not (
            isinstance(layer, AvgPool) and layer.everything
        ):
            s, p, k = layer.stride[0], layer.padding[0], layer.size[0]
        elif isinstance(layer, (ScaleShift, Relu)):
            continue
        else:
            raise OnnxExportError(f"cannot map output to input through {type(layer).__name__}")
        stride, offset = s * stride, s * offset - p + k // 2
    return stride, offset


def _detector_options(net: DlibNetwork) -> DetectorOptions:
    options = net.loss.options
    if not isinstance(options, MmodOptions):
        raise OnnxExportError(f"expected a loss_mmod_ network, got {net.loss.kind}")
    if net.input.kind != "input_rgb_image_pyramid":
        raise OnnxExportError(f"expected an image-pyramid input, got {net.input.kind}")
    stride, offset = _output_mapping(net.layers)
    return DetectorOptions(
        window_width=options.detector_width,
        window_height=options.detector_height,
        nms_iou_threshold=options.nms_iou_threshold,
        nms_percent_covered_threshold=options.nms_percent_covered_threshold,
        mean_rgb=net.input.mean_rgb,
        pyramid_padding=int(net.input.pyramid_padding or 0),
        pyramid_outer_padding=int(net.input.pyramid_outer_padding or 0),
        output_stride=stride,
        output_offset=offset,
    )


def read_detector_options(dat_path: Path) -> DetectorOptions:
    """The MMOD detector's window size, NMS thresholds, pyramid and coordinate mapping."""
    return _detector_options(load_network(Path(dat_path)))


def build_detector_onnx(dat_path: Path) -> onnx.ModelProto:
    """dlib's MMOD CNN face detector trunk as ONNX: ``image`` float32 [N,H,W,3] → ``scores``."""
    dat_path = Path(dat_path)
    net = load_network(dat_path)
    opts = _detector_options(net)
    g = _GraphBuilder()
    x = _preprocess(g, DETECTOR_INPUT, net.input, cast=False)
    _, out_shape = _emit_layers(g, x, (3, None, None), net.layers, DETECTOR_OUTPUT)
    if isinstance(out_shape, int):
        raise OnnxExportError(f"{dat_path.name}: the detector does not end in a score map")
    inputs = [helper.make_tensor_value_info(DETECTOR_INPUT, TensorProto.FLOAT, ["N", "H", "W", 3])]
    outputs = [
        helper.make_tensor_value_info(
            DETECTOR_OUTPUT, TensorProto.FLOAT, ["N", out_shape[0], "H_out", "W_out"]
        )
    ]
    metadata = _source_metadata(dat_path, net, DETECTOR_MODEL_VERSION)
    metadata.update(
        {
            "detector_window_width": str(opts.window_width),
            "detector_window_height": str(opts.window_height),
            "nms_iou_threshold": repr(opts.nms_iou_threshold),
            "nms_percent_covered_threshold": repr(opts.nms_percent_covered_threshold),
            "pyramid_padding": str(opts.pyramid_padding),
            "pyramid_outer_padding": str(opts.pyramid_outer_padding),
            "output_stride": str(opts.output_stride),
            "output_offset": str(opts.output_offset),
        }
    )
    return _model(g, "dlib_face_detector", inputs, outputs, metadata)


def detector_output_size(height: int, width: int, dat_path: Path) -> tuple[int, int]:
    """The (H', W') of ``scores`` for an H x W input, from the layers in the file."""
    net = load_network(Path(dat_path))
    h: int | None = height
    w: int | None = width
    for layer in net.layers:
        if isinstance(layer, Conv):
            h = _out_size(h, layer.kernel[0], layer.stride[0], layer.padding[0])
            w = _out_size(w, layer.kernel[1], layer.stride[1], layer.padding[1])
        elif isinstance(layer, (MaxPool, AvgPool)) and not (
            isinstance(layer, AvgPool) and layer.everything
        ):
            h = _out_size(h, layer.size[0], layer.stride[0], layer.padding[0])
            w = _out_size(w, layer.size[1], layer.stride[1], layer.padding[1])
    if h is None or w is None:  # pragma: no cover - static input sizes stay static
        raise OnnxExportError("output size unknown")
    return h, w
