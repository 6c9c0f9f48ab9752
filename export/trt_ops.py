"""The ONNX operators TensorRT's ONNX parser imports, and a checker for exported graphs.

Source: the operator matrix of onnx/onnx-tensorrt ``docs/operators.md`` (10.x line, opsets 9–20, every
row marked supported) plus the operators added since, from TensorRT's changelog: ``Attention`` (10.14),
``RMSNormalization``, ``RotaryEmbedding``, ``TensorScatter`` (10.15), ``Swish`` (11.0). The value is the
first TensorRT version whose parser takes the op; opsets 9–24 are parsed by TensorRT 11.1.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

_BASE = """Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast CastLike
Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace
DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND
Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization GRU
HardSigmoid HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization
LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean
MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow
PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1
ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu
Reshape Resize ReverseSequence RNN RoiAlign Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape
Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan
Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor"""

SUPPORTED: dict[str, str] = {op: "10.0" for op in _BASE.split()}
SUPPORTED.update({"Attention": "10.14", "RMSNormalization": "10.15", "RotaryEmbedding": "10.15",
                  "TensorScatter": "10.15", "Swish": "11.0"})
MAX_OPSET = 24
# Ops we never want in an engine graph even though the parser takes them: they mean data-dependent control
# flow or shapes (no CUDA graphs, poor fusion), or float64 math that TensorRT silently truncates.
DISCOURAGED = {"If", "Loop", "Scan", "NonZero", "RandomNormal", "RandomNormalLike", "RandomUniform",
               "RandomUniformLike", "Unique"}


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("."))


@dataclass(frozen=True)
class OpReport:
    ops: Counter
    unsupported: tuple[str, ...]
    discouraged: tuple[str, ...]
    double_tensors: tuple[str, ...]
    opset: int
    min_trt: str

    @property
    def ok(self) -> bool:
        return not (self.unsupported or self.discouraged or self.double_tensors) and self.opset <= MAX_OPSET

    def describe(self) -> str:
        problems = []
        if self.unsupported:
            problems.append(f"ops TensorRT's parser does not take: {', '.join(self.unsupported)}")
        if self.discouraged:
            problems.append(f"data-dependent/control-flow ops: {', '.join(self.discouraged)}")
        if self.double_tensors:
            problems.append(f"float64 tensors (TensorRT truncates them): {', '.join(self.double_tensors[:5])}")
        if self.opset > MAX_OPSET:
            problems.append(f"opset {self.opset} > {MAX_OPSET}")
        return "; ".join(problems) or f"ok: {len(self.ops)} op types, needs TensorRT >= {self.min_trt}"


def check_graph(model) -> OpReport:
    """Op coverage of an ``onnx.ModelProto`` (functions of the default domain are inlined first)."""
    import onnx

    if model.functions:
        model = onnx.inline_local_functions(model)
    ops: Counter = Counter()
    double: list[str] = []

    def walk(graph):
        for node in graph.node:
            ops[(node.domain or "ai.onnx", node.op_type)] += 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
                if node.op_type == "Cast" and attr.name == "to" and attr.i == onnx.TensorProto.DOUBLE:
                    double.append(node.name or node.output[0])
        for init in graph.initializer:
            if init.data_type == onnx.TensorProto.DOUBLE:
                double.append(init.name)
        for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
            if vi.type.tensor_type.elem_type == onnx.TensorProto.DOUBLE:
                double.append(vi.name)

    walk(model.graph)
    names = Counter({op: n for (domain, op), n in ops.items()})
    unsupported = sorted(f"{d}::{op}" if d != "ai.onnx" else op for (d, op) in ops
                         if d not in ("ai.onnx", "") or op not in SUPPORTED)
    discouraged = sorted(op for op in names if op in DISCOURAGED)
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    min_trt = max((SUPPORTED.get(op, "10.0") for op in names), key=_version, default="10.0")
    return OpReport(names, tuple(unsupported), tuple(discouraged), tuple(sorted(set(double))), opset, min_trt)
