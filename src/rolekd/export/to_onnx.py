"""``rolekd export``: a finished run's model as an ONNX file with its real bit widths, checked by onnxruntime.

The file takes images ``(N, 3, H, W)``, float32 in [0, 255] (input ``images``), and returns the logits
(output ``logits``). Its nodes, in order:

* the input normalisation of the run's dataset, ``x * (1 / (255 std)) + (-mean / std)`` (a ``Mul`` and an
  ``Add`` with the float32 constants the training loader uses, so the normalised input is bit-identical);
* the network as PyTorch runs it in eval mode: BatchNorm stays a ``BatchNormalization`` node (nothing is
  folded, so no rounding changes), the first conv and the last linear layer keep their float weights;
* every DoReFa **weight** as its integer levels and a ``DequantizeLinear``, never as floats:

  - ``k >= 2`` bits: the uint8 initializer ``<layer>.weight_code`` holds DoReFa's own k-bit integer
    ``m = round((2^k - 1) (tanh w / (2 max|tanh w|) + 1/2))`` in 0..2^k - 1, decoded by
    ``DequantizeLinear(m, scale 2, zero point 0) -> Sub(n) -> Div(n)``, ``n = 2^k - 1``: the weight
    ``(2m - n) / n``, an odd integer over n, computed with the float32 operations PyTorch uses, so the
    decoded weights equal the student's quantized weights bit for bit;
  - 1 bit: the int8 initializer ``<layer>.weight_code`` holds ``sign(w)`` and ``DequantizeLinear`` scales
    it by the float32 ``mean|w|`` (BWN), also bit for bit;

* every **activation** quantizer where the PyTorch student has one (its ``QuantPoint`` modules, or each
  quantized layer's input for models that declare none): ``Clip(0, 1) -> Mul(n) -> QuantizeLinear(scale 1,
  zero point 0, uint8) -> DequantizeLinear -> Div(n)``: the uint8 level ``round(n clip(x, 0, 1))`` at scale
  1/n, rounded half to even as ``torch.round`` does.

Why the scale 1/n is not written into QuantizeLinear/DequantizeLinear: 1/n is not a float32 number for
n = 2^k - 1 >= 3, so ``q * fl(1/n)`` differs from PyTorch's ``q / n`` by one ulp for some levels, and no
float32 scale decodes all of them exactly (the level q = 1 forces the scale to be fl(1/n), which misses
others for k >= 3); likewise ``round(x / fl(1/n))`` and PyTorch's ``round(x * n)`` pick different levels for
some inputs next to the half-way points (measured for 4 bits: 9 of the 6,015 float32 values within 200 ulps
of a half-way point). Multiplying by n before QuantizeLinear and dividing by n after DequantizeLinear makes
ONNX compute exactly PyTorch's operations, so onnxruntime and PyTorch differ only where their convolutions
sum in a different order.

``metadata_props`` of the file: class names (JSON), w/a bits, dataset, model, mean/std, the input format,
the run's name, KD method and test accuracy, and the rolekd version and source commit.

onnx and onnxruntime are an optional extra (``pip install "rolekd[export]"``); they are imported only here,
inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from .. import __version__
from ..config import Config, validate_config
from ..data import DataBundle, DeviceLoader, Split, load_dataset
from ..errors import UserError
from ..experiment import build_model, set_batchnorm
from ..files import dump_json, load_weights, read_summary, write_file
from ..provenance import code_version
from ..quant import FULL_PRECISION, ActQuant, QConv2d, QLinear, quantize_weight
from .size import megabytes, model_size

OPSET = 17
INPUT, OUTPUT = "images", "logits"


# ---------------------------------------------------------------------------------------- export modules
def _const(g, value, dtype=torch.float32):
    return g.op("Constant", value_t=torch.tensor(value, dtype=dtype))


class _ActLevels(torch.autograd.Function):
    """DoReFa's activation quantizer ``round(n clip(x, 0, 1)) / n`` (the same float32 operations as
    :func:`rolekd.quant.quantize_activation`), exported as Clip, Mul, QuantizeLinear, DequantizeLinear, Div."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, n: float) -> torch.Tensor:
        return torch.clamp(x, 0.0, 1.0).mul(n).round().div(n)

    @staticmethod
    def symbolic(g, x, n: float):
        y = g.op("Mul", g.op("Clip", x, _const(g, 0.0), _const(g, 1.0)), _const(g, n))
        q = g.op("QuantizeLinear", y, _const(g, 1.0), _const(g, 0, torch.uint8))
        y = g.op("DequantizeLinear", q, _const(g, 1.0), _const(g, 0, torch.uint8))
        return g.op("Div", y, _const(g, n))


class _WeightLevels(torch.autograd.Function):
    """A DoReFa weight from its integer code: ``(2m - n) / n`` for k >= 2 bits (``code`` uint8 m), or
    ``sign * scale`` for 1 bit (``code`` int8 sign); exported as DequantizeLinear (then Sub, Div)."""

    @staticmethod
    def forward(ctx, code: torch.Tensor, bits: int, scale: float) -> torch.Tensor:
        if bits == 1:
            return code.float() * torch.tensor(scale, dtype=torch.float32)
        n = float(2 ** bits - 1)
        return (code.float() * 2.0 - n) / n

    @staticmethod
    def symbolic(g, code, bits: int, scale: float):
        if bits == 1:
            return g.op("DequantizeLinear", code, _const(g, scale), _const(g, 0, torch.int8))
        n = float(2 ** bits - 1)
        y = g.op("DequantizeLinear", code, _const(g, 2.0), _const(g, 0, torch.uint8))
        return g.op("Div", g.op("Sub", y, _const(g, n)), _const(g, n))


def weight_code(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, float]:
    """The integer code of DoReFa's ``bits``-bit quantization of ``w`` and its scale (1-bit only; 0.0
    otherwise): uint8 ``m`` in 0..2^k - 1 for k >= 2 bits, int8 ``sign(w)`` for 1 bit. Derived from
    :func:`rolekd.quant.quantize_weight` itself and checked to decode back to it bit for bit."""
    w = w.detach().float().cpu()
    wq = quantize_weight(w, bits)
    if bits == 1:
        code, scale = torch.sign(w).to(torch.int8), float(w.abs().mean())
    else:
        n = 2 ** bits - 1
        code, scale = torch.round((wq.double() * n + n) / 2).to(torch.uint8), 0.0
    if not torch.equal(_WeightLevels.forward(None, code, bits, scale), wq):  # pragma: no cover - a bug
        raise AssertionError(f"{bits}-bit weight code does not decode to DoReFa's weights")
    return code, scale


class _ExportAct(nn.Module):
    def __init__(self, bits: int):
        super().__init__()
        self.bits = bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ActLevels.apply(x, float(2 ** self.bits - 1))

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


class _ExportQMixin:
    """A QConv2d/QLinear turned export-ready in place: its float weight replaced by the integer buffer
    ``weight_code`` (when ``w_bits`` < 32), its input quantized by :class:`_ActLevels` (when it quantizes
    its input)."""

    def _to_export(self) -> None:
        self.weight_scale = 0.0
        if self.w_bits != FULL_PRECISION:
            code, self.weight_scale = weight_code(self.weight, self.w_bits)
            del self.weight
            self.register_buffer("weight_code", code)
        self.act = _ExportAct(self.a_bits) if self.quantize_input and self.a_bits != FULL_PRECISION else None

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x) if self.act is not None else x

    def _weight(self) -> torch.Tensor:
        if self.w_bits == FULL_PRECISION:
            return self.weight
        return _WeightLevels.apply(self.weight_code, self.w_bits, self.weight_scale)

    def extra_repr(self) -> str:
        return f"w_bits={self.w_bits}, a_bits={self.a_bits}, quantize_input={self.quantize_input}"


class _ExportConv2d(_ExportQMixin, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self._input(x), self._weight(), self.bias)


class _ExportLinear(_ExportQMixin, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._input(x), self._weight(), self.bias)


def export_ready(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` in which every DoReFa quantizer is replaced by a module that
    computes the same float32 values and exports as QuantizeLinear/DequantizeLinear (module paths kept)."""
    m = copy.deepcopy(model).cpu().float().eval()
    if type(m) is ActQuant:  # a quantizer on its own
        return _ExportAct(m.a_bits).eval() if m.a_bits != FULL_PRECISION else nn.Identity()
    for path, mod in list(m.named_modules()):
        if type(mod) in (QConv2d, QLinear):
            mod.__class__ = _ExportConv2d if isinstance(mod, nn.Conv2d) else _ExportLinear
            mod._to_export()
        elif type(mod) is ActQuant and mod.a_bits != FULL_PRECISION:
            parent, _, name = path.rpartition(".")
            setattr(m.get_submodule(parent) if parent else m, name, _ExportAct(mod.a_bits))
    # a DoReFa quantizer left over would be traced as float operations (the weights as floats): refuse
    left = [p for p, x in m.named_modules() if isinstance(x, (QConv2d, QLinear, ActQuant))
            and (getattr(x, "w_bits", FULL_PRECISION) != FULL_PRECISION or x.a_bits != FULL_PRECISION)]
    if left:
        raise UserError(f"cannot export {left[0]!r}: {type(m.get_submodule(left[0])).__name__} is a subclass of a "
                        f"DoReFa layer that rolekd export does not know; use QConv2d/QLinear/ActQuant themselves")
    return m


class _Normalize(nn.Module):
    """The training loader's normalisation of uint8-valued images: ``x * (1 / (255 std)) + (-mean / std)``
    with the same float32 constants (:class:`rolekd.data.DeviceLoader`)."""

    def __init__(self, mean, std):
        super().__init__()
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std_t))
        self.register_buffer("shift", -mean_t / std_t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


class _Deployed(nn.Module):
    def __init__(self, net: nn.Module, normalize: nn.Module | None):
        super().__init__()
        self.normalize = normalize
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(images) if self.normalize is not None else images)


# ---------------------------------------------------------------------------------------- onnx
def _need(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise UserError(f"rolekd export needs {module}, which is not installed: pip install \"rolekd[export]\" "
                        f"(onnx and onnxruntime)") from None


@contextlib.contextmanager
def _quiet_stdout():
    """The legacy exporter logs the graph to the process's stdout (from C++) when it fails: keep the CLI's
    output to one line."""
    try:
        fd = os.dup(1)
    except OSError:  # no stdout at all
        yield
        return
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        pass
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        try:
            yield
        finally:
            os.dup2(fd, 1)
            os.close(fd)


def build_onnx(model: nn.Module, example: torch.Tensor, mean=None, std=None,
               metadata: dict[str, str] | None = None, what: str = "the model"):
    """The ONNX ``ModelProto`` of ``model`` (full precision or DoReFa) for inputs shaped like ``example``
    (any batch size), with the input normalisation of ``mean``/``std`` first when given; checked by
    ``onnx.checker``. A model ONNX cannot express is one UserError naming the reason."""
    onnx = _need("onnx")
    net = export_ready(model)
    wrapper = _Deployed(net, _Normalize(mean, std) if mean is not None else None).eval()
    buf = io.BytesIO()
    axes = {INPUT: {0: "N"}, OUTPUT: {0: "N"}}
    try:
        with warnings.catch_warnings(), _quiet_stdout(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, (example.float().cpu(),), buf, dynamo=False, opset_version=OPSET,
                              input_names=[INPUT], output_names=[OUTPUT], dynamic_axes=axes,
                              do_constant_folding=False, export_params=True)
    except UserError:
        raise
    except Exception as e:  # the exporter's own error types, RuntimeErrors from tracing
        msg = " ".join(str(e).split()) or type(e).__name__
        raise UserError(f"cannot export {what} to ONNX (opset {OPSET}): {msg[:300]}; use layers ONNX can "
                        f"express") from None
    proto = _own_initializers(onnx.load_from_string(buf.getvalue()))
    proto.doc_string = "rolekd student: images (N, 3, H, W) float32 in [0, 255] -> logits"
    for k, v in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, str(v)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:  # pragma: no cover - an exporter bug
        raise UserError(f"the exported ONNX model of {what} fails onnx.checker: {' '.join(str(e).split())[:300]}")
    return proto


def _own_initializers(proto):
    """The exporter stores parameters that happen to be equal (e.g. the biases of a residual block's two
    BatchNorms, which get the same gradient) once, with ``Identity`` nodes for the others: give each its own
    initializer again, so that every PyTorch parameter has its name in the file and the normalisation is the
    first node."""
    numpy_helper = __import__("onnx.numpy_helper", fromlist=["to_array"])
    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    aliases = [n for n in graph.node if n.op_type == "Identity" and n.input[0] in inits]
    for node in aliases:
        graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(inits[node.input[0]]), node.output[0]))
        graph.node.remove(node)
    return proto


def ort_session(proto, threads: int = 1):
    """An onnxruntime CPU session of ``proto`` with ``threads`` intra-op threads."""
    ort = _need("onnxruntime")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------------------------------- runs
@dataclass
class Run:
    """A finished run rebuilt: its config, result, dataset and PyTorch model (eval mode, CPU)."""

    dir: Path
    config: Config
    result: dict
    data: DataBundle
    model: nn.Module


def load_run(run_dir: str | Path) -> Run:
    """The finished ``train``/``distill`` run in ``run_dir`` (a pipeline's stage directories are such runs):
    its model rebuilt from ``config.yaml`` (bits, BatchNorm epsilon) with the weights of ``model.safetensors``.
    One UserError line for anything else."""
    d = Path(run_dir)
    if not d.is_dir():
        raise UserError(f"{d} is not a directory: give a finished rolekd train/distill run directory")
    cfg_file = d / "config.yaml"
    if not cfg_file.is_file():
        raise UserError(f"{d} is not a rolekd run directory (no config.yaml): give a finished train/distill run")
    if (d / "search.json").is_file() or (d / "search_state").is_dir():
        raise UserError(f"{d} is a schedule search, not a trained model: export a train/distill run")
    result = read_summary(d / "result.json", "rerun the run's command to finish it again")
    if result is None:
        stages = [p.name for p in sorted(d.iterdir()) if (p / "result.json").is_file()]
        hint = (f"; it holds finished runs, e.g. {d / stages[0]}" if stages else
                "; rerun its command to finish it")
        raise UserError(f"{d} is not a finished run (no result.json){hint}")
    if result.get("status") != "finished":
        raise UserError(f"run {d} did not finish (status {result.get('status')!r}): nothing to export")
    weights = d / "model.safetensors"
    if not weights.is_file():
        raise UserError(f"run {d} has no model.safetensors: rerun its command to finish it")
    try:
        raw = yaml.safe_load(cfg_file.read_text())
    except (yaml.YAMLError, UnicodeDecodeError):
        raise UserError(f"{cfg_file} is not valid YAML: restore the run's config.yaml") from None
    cfg = validate_config(raw if isinstance(raw, dict) else {}, str(cfg_file))
    # the whole dataset (not data.max_train / max_test): the check compares on its full test set
    bundle = load_dataset(cfg.data.name, cfg.data.path, cfg.data.data_dir, cfg.data.download)
    model = build_model(cfg, bundle.num_classes)
    set_batchnorm(model, eps=cfg.train.bn_eps)
    load_weights(model, weights, what="run checkpoint")
    return Run(d, cfg, result, bundle, model.eval())


def _source_commit() -> str:
    """The git commit of the rolekd checkout this runs from (with "+uncommitted changes" when its tracked files
    differ from it; "unknown" outside a checkout), as :func:`rolekd.provenance.code_version` finds it."""
    v = code_version()
    if not v["commit"]:
        return "unknown"
    return v["commit"] + (" +uncommitted changes" if v["dirty"] else "")


def run_metadata(run: Run) -> dict[str, str]:
    cfg, r, b = run.config, run.result, run.data
    shape = tuple(int(s) for s in b.test.images.shape[1:])
    acc = r.get("test_acc")
    return {"input": f"{INPUT}: float32 (N, {shape[0]}, {shape[1]}, {shape[2]}), RGB pixel values in [0, 255]; "
                     f"normalised inside the model",
            "output": f"{OUTPUT}: float32 (N, {b.num_classes})",
            "class_names": json.dumps(list(b.classes)), "dataset": cfg.data.name, "model": cfg.model.name,
            "w_bits": str(cfg.quant.w_bits), "a_bits": str(cfg.quant.a_bits),
            "mean": json.dumps(list(b.mean)), "std": json.dumps(list(b.std)),
            "run": cfg.name, "kd_method": str(cfg.kd.method), "epochs": str(cfg.train.epochs),
            "test_acc": "" if acc is None else f"{acc:.4f}",
            "rolekd_version": __version__, "rolekd_commit": _source_commit()}


def torch_logits(model: nn.Module, run: Run, images: torch.Tensor, batch: int = 250) -> np.ndarray:
    """The PyTorch model's logits for uint8 images, normalised by the training loader."""
    loader = DeviceLoader(Split(images, torch.zeros(len(images), dtype=torch.long)), batch, run.data.mean,
                          run.data.std, shuffle=False)
    with torch.no_grad():
        return np.concatenate([model(x).numpy() for x, _ in loader])


def ort_logits(session, images: torch.Tensor, batch: int = 250) -> np.ndarray:
    return np.concatenate([session.run([OUTPUT], {INPUT: images[i:i + batch].float().numpy()})[0]
                           for i in range(0, len(images), batch)])


def size_path(out: str | Path) -> Path:
    """``OUT.size.json`` beside ``OUT.onnx``."""
    out = Path(out)
    return out.with_name((out.stem if out.suffix == ".onnx" else out.name) + ".size.json")


def export_run(run_dir: str | Path, out: str | Path | None = None, check: int = 200) -> dict:
    """Export the finished run in ``run_dir`` to ``out`` (default ``RUN_DIR/model.onnx``) and write its sizes
    to ``OUT.size.json``; with ``check`` > 0, first run the first ``check`` test images through onnxruntime
    and the PyTorch model and record how often their top-1 agree. Returns what the size file holds. Nothing
    is written when anything fails."""
    _need("onnx")
    _need("onnxruntime")
    run = load_run(run_dir)
    out = Path(out) if out is not None else run.dir / "model.onnx"
    if out.is_dir():
        raise UserError(f"{out} is a directory: give the output file, e.g. -o {out / 'model.onnx'}")
    example = run.data.test.images[:1]
    proto = build_onnx(run.model, example, run.data.mean, run.data.std, run_metadata(run),
                       what=f"run {run.dir} ({run.config.model.name})")
    data = proto.SerializeToString()
    size = {"model": run.config.model.name, "dataset": run.config.data.name, "w_bits": run.config.quant.w_bits,
            "a_bits": run.config.quant.a_bits, **model_size(run.model), "onnx_file_bytes": len(data)}
    if check > 0:
        images = run.data.test.images[:check]
        labels = run.data.test.labels[:check].numpy()
        pt = torch_logits(run.model, run, images)
        ox = ort_logits(ort_session(proto), images)
        size["check"] = {"test_images": len(labels), "top1_agree": int((pt.argmax(1) == ox.argmax(1)).sum()),
                         "torch_acc": float((pt.argmax(1) == labels).mean()),
                         "onnxruntime_acc": float((ox.argmax(1) == labels).mean()),
                         "max_abs_logit_diff": float(np.abs(pt - ox).max())}
    write_file(out, data)
    write_file(size_path(out), dump_json(size, indent=2) + "\n")
    return {"onnx": str(out), "size_file": str(size_path(out)), **size}


def describe(info: dict) -> str:
    """The lines ``rolekd export`` prints."""
    bits = ("32-bit (full precision)" if info["w_bits"] == FULL_PRECISION and info["a_bits"] == FULL_PRECISION
            else f"{info['w_bits']}-bit weights / {info['a_bits']}-bit activations")
    lines = [f"{info['onnx']}: {info['model']} on {info['dataset']}, {bits}",
             f"size at the true bit widths: {megabytes(info['packed_bytes'])} "
             f"({megabytes(info['packed_weight_bytes'])} packed low-bit weights + {megabytes(info['float_bytes'])} "
             f"float32); fp32: {megabytes(info['fp32_bytes'])} ({info['ratio']:.2f}x smaller); ONNX file "
             f"{megabytes(info['onnx_file_bytes'])} (one byte per low-bit weight)"]
    c = info.get("check")
    if c:
        lines.append(f"onnxruntime vs PyTorch on {c['test_images']} test images: top-1 agrees on {c['top1_agree']}, "
                     f"accuracy {100 * c['onnxruntime_acc']:.2f}% vs {100 * c['torch_acc']:.2f}%, "
                     f"max |logit difference| {c['max_abs_logit_diff']:.2e}")
    lines.append(f"sizes: {info['size_file']}")
    return "\n".join(lines)
