"""``rolekd export``: the ONNX model of a finished run against its PyTorch student.

Run directories are made by short real ``rolekd train`` / ``distill`` runs (trained-ish, so that predictions
differ between images); the expectations are independent of the exporter: onnxruntime's logits against the
PyTorch student rebuilt from the run directory, the weights decoded by onnxruntime against
``rolekd.quant.quantize_weight`` of the student's own weights, and the quantized activations inside the ONNX
graph against the PyTorch student's activation quantizers (forward hooks), in order.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import helper, numpy_helper  # noqa: E402

from rolekd.cli import main  # noqa: E402
from rolekd.config import load_config  # noqa: E402
from rolekd.data import DeviceLoader, Split, load_dataset  # noqa: E402
from rolekd.experiment import build_model, set_batchnorm  # noqa: E402
from rolekd.export import build_onnx, config_size, model_size  # noqa: E402
from rolekd.files import load_weights  # noqa: E402
from rolekd.models import create, register_model  # noqa: E402
from rolekd.quant import ActQuant, QConv2d, QLinear, quantize_activation, quantize_model, quantize_weight  # noqa: E402

# one thread: the same trained students on every machine (a run's default is the affinity's CPUs)
FAST = ("train.optimizer=adam train.weight_decay=0 augment.cutout=0 data.max_test=100 train.progress=false "
        "train.threads=1")


def _cli(*args: str) -> int:
    return main([a for arg in args for a in arg.split()])


# ---------------------------------------------------------------------------------------- run directories
class Runs:
    """Run directories made on first use (a slow case builds only when it runs)."""

    def __init__(self, root: Path):
        self.root = root
        self.dirs: dict[str, Path] = {}

    def get(self, name: str) -> Path:
        if name not in self.dirs:
            d = self.root / name
            teacher = (lambda: self.get("teacher")) if name.startswith("resnet_tiny") else \
                (lambda: self.get("resnet18")) if name.startswith("resnet18-") else (lambda: None)
            recipe = {
                # a resnet_tiny teacher, then students from it (a distilled one, and a plain train run)
                "teacher": f"train model=resnet_tiny epochs=2 data.max_train=1000 train.lr=0.002 {FAST}",
                "resnet_tiny-4-4": f"distill model=resnet_tiny teacher={teacher()} method=soft w_bits=4 "
                                   f"a_bits=4 epochs=1 data.max_train=500 train.lr=0.001 {FAST}",
                "resnet_tiny-2-2": f"train model=resnet_tiny teacher={teacher()} w_bits=2 a_bits=2 "
                                   f"epochs=1 data.max_train=500 train.lr=0.001 {FAST}",
                # AlexNet's layers at a quarter of its width (16x fewer weights: the same export path, 1/10 the time)
                "alexnet-4-4": f"train model=alexnet model.kwargs.width=0.25 w_bits=4 a_bits=4 epochs=1 "
                               f"data.max_train=512 train.lr=0.001 "
                               f"train.batch_size=64 {FAST}",
                # ResNet18 (slow): students from a short-trained full-precision ResNet18, so that their logits
                # separate the classes (a 4-bit ResNet18 from scratch is near chance after one short epoch)
                "resnet18": f"train model=resnet18 epochs=2 data.max_train=2000 train.lr=0.002 train.batch_size=64 "
                            f"{FAST}",
                "resnet18-4-4": f"train model=resnet18 teacher={teacher()} w_bits=4 a_bits=4 epochs=1 "
                                f"data.max_train=500 train.lr=0.0005 train.batch_size=64 {FAST}",
                "resnet18-2-2": f"train model=resnet18 teacher={teacher()} w_bits=2 a_bits=2 epochs=1 "
                                f"data.max_train=1000 train.lr=0.002 train.batch_size=64 {FAST}",
            }[name]
            assert _cli(recipe, f"out={d}") == 0
            self.dirs[name] = d
        return self.dirs[name]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("export_runs"))


@pytest.fixture(scope="module")
def test_set():
    return load_dataset("cifar10-sample").test  # the bundled sample's 1,000 real test images


class Exported:
    def __init__(self, run: Path, out: Path):
        self.run, self.out = run, out
        self.proto = onnx.load(str(out))
        self.cfg = load_config(run / "config.yaml")
        student = build_model(self.cfg, 10)
        set_batchnorm(student, eps=self.cfg.train.bn_eps)
        load_weights(student, run / "model.safetensors")
        self.student = student.eval()


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory):
    cache: dict[str, Exported] = {}

    def get(case: str) -> Exported:
        if case not in cache:
            run = runs.get(case)
            out = tmp_path_factory.mktemp("onnx") / f"{case}.onnx"
            assert _cli(f"export {run} -o {out} --check 0") == 0
            cache[case] = Exported(run, out)
        return cache[case]

    return get


def _session(proto):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _torch_logits(e: Exported, images: torch.Tensor, mean, std) -> np.ndarray:
    """The PyTorch student on the training loader's normalisation of the images."""
    loader = DeviceLoader(Split(images, torch.zeros(len(images), dtype=torch.long)), 200, mean, std, shuffle=False)
    with torch.no_grad():
        return np.concatenate([e.student(x).numpy() for x, _ in loader])


def _ort_logits(proto, images: torch.Tensor, outputs=None) -> list[np.ndarray]:
    s = _session(proto)
    names = outputs or [s.get_outputs()[0].name]
    parts = [s.run(names, {s.get_inputs()[0].name: images[i:i + 200].float().numpy()}) for i in range(0, len(images), 200)]
    return [np.concatenate([p[k] for p in parts]) for k in range(len(names))]


CASES = ["resnet_tiny-4-4", "resnet_tiny-2-2", "alexnet-4-4",
         pytest.param("resnet18-4-4", marks=pytest.mark.slow), pytest.param("resnet18-2-2", marks=pytest.mark.slow)]


# ---------------------------------------------------------------------------------------- agreement
@pytest.mark.parametrize("case", CASES)
def test_onnxruntime_agrees_with_the_pytorch_student(case, exported, test_set):
    e = exported(case)
    onnx.checker.check_model(e.proto, full_check=True)
    data = load_dataset("cifar10-sample")
    images, labels = test_set.images, test_set.labels.numpy()
    assert len(images) == 1000
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pt = _torch_logits(e, images, data.mean, data.std)
    finally:
        torch.set_num_threads(old)
    ox, = _ort_logits(e.proto, images)
    check_agreement(pt, ox, labels, max_flipped=0.5 if case.startswith("resnet18") else 0.25)


def check_agreement(pt: np.ndarray, ox: np.ndarray, labels: np.ndarray, max_flipped: float = 0.25) -> None:
    """onnxruntime's logits ``ox`` against PyTorch's ``pt``, in a form that holds on any correct machine.

    The quantizers compute PyTorch's float32 operations, so an image's logits differ only by float32 rounding
    (measured: 6e-7 at the median), unless a convolution's other summation order moved an activation across
    a quantisation level (a *level flip*: measured about 1 image in 8 at 4 bits), which changes the logits by
    up to a level's effect. So: (1) at most ``max_flipped`` of the images have a level flip (a quarter; flips
    add up over a deep network's quantizers: half for ResNet18's 16, where 38% were seen) and the median image's
    logits agree to rounding; (2) an image without a level flip has PyTorch's top-1 wherever its top-2 margin
    exceeds twice the rounding (there, no summation order can swap the top two); (3) top-1 flips happen only
    at level-flipped images or near-ties, at most 1% of all images (seen: 0 to 2 of 1,000 on a barely trained
    AlexNet whose logits are near ties, depending on the thread count), and accuracy moves by no more."""
    n = len(pt)
    scale = 1 + np.abs(pt).max(1)
    diff = np.abs(pt - ox).max(1)
    rounding = 1e-4 * scale  # far above float32 rounding (1e-6 relative), far below a level's effect
    flipped = diff > rounding
    assert flipped.mean() <= max_flipped, (flipped.sum(), n)
    assert np.median(diff) <= 1e-5 * (1 + np.abs(pt).max()), np.median(diff)
    pt_top, ox_top = pt.argmax(1), ox.argmax(1)
    assert len(np.unique(pt_top)) >= 3, "the student predicts (almost) one class: the comparison would be empty"
    top2 = np.sort(pt, 1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    clean = ~flipped & (margin > 2 * rounding)
    assert clean.sum() >= n // 2 and (pt_top[clean] == ox_top[clean]).all(), \
        np.flatnonzero(clean & (pt_top != ox_top))
    disagree = int((pt_top != ox_top).sum())
    assert disagree <= n // 100, (disagree, n)
    acc_pt, acc_ox = (pt_top == labels).mean(), (ox_top == labels).mean()
    assert abs(acc_pt - acc_ox) <= disagree / n + 1e-12, (acc_pt, acc_ox)


# ---------------------------------------------------------------------------------------- weights
def _constant_tensors(graph) -> set[str]:
    const = {i.name for i in graph.initializer}
    for node in graph.node:
        if all(x in const for x in node.input if x):
            const.update(node.output)
    return const


def _decoded_weight(graph, code: str, const: set[str]) -> str:
    """The tensor computed from the initializer ``code`` by constant-only nodes, where it meets the data."""
    t = code
    while True:
        users = [n for n in graph.node if t in n.input]
        if len(users) != 1 or not all(x in const for x in users[0].input if x) or users[0].op_type == "Transpose":
            return t
        t = users[0].output[0]


def _quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {p: m for p, m in model.named_modules() if isinstance(m, (QConv2d, QLinear)) and m.w_bits != 32}


def _check_weights(proto, student: nn.Module, prefix: str = "net.") -> None:
    graph = proto.graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    layers = _quantized_layers(student)
    assert layers
    codes = {}
    for path, layer in layers.items():
        bits = layer.w_bits
        code = inits[f"{prefix}{path}.weight_code"]  # stored as integers...
        assert f"{prefix}{path}.weight" not in inits  # ...and not as floats
        if bits == 1:
            assert code.dtype == np.int8 and set(np.unique(code)) <= {-1, 0, 1}
        else:
            assert code.dtype == np.uint8 and code.max() <= 2 ** bits - 1  # k-bit integers
        codes[path] = code
    # no float initializer holds a quantized layer's weights (in any layout)
    float_layers = {f"{prefix}{p}.weight" for p, m in student.named_modules()
                    if isinstance(m, (nn.Conv2d, nn.Linear)) and p not in layers}
    shapes = {s for layer in layers.values() for s in (tuple(layer.weight.shape), tuple(layer.weight.shape)[::-1])}
    assert not [n for n, a in inits.items() if a.dtype == np.float32 and tuple(a.shape) in shapes
                and n not in float_layers]
    # what onnxruntime decodes them to is DoReFa's quantized weight, bit for bit
    const = _constant_tensors(graph)
    decoded = {p: _decoded_weight(graph, f"{prefix}{p}.weight_code", const) for p in layers}
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    probe.graph.output.extend(helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in decoded.values())
    shape = [d.dim_value or 1 for d in proto.graph.input[0].type.tensor_type.shape.dim]
    s = _session(probe)
    values = s.run(list(decoded.values()), {s.get_inputs()[0].name: np.zeros(shape, np.float32)})
    for (path, layer), got in zip(layers.items(), values):
        want = quantize_weight(layer.weight.detach(), layer.w_bits).numpy()
        got = got if got.shape == want.shape else got.T
        assert got.dtype == np.float32 and np.array_equal(got, want), path
    # the full-precision first conv and last linear layer keep their float weights
    for p, m in student.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and p not in layers:
            assert np.array_equal(inits[f"{prefix}{p}.weight"], m.weight.detach().numpy()), p


@pytest.mark.parametrize("case", CASES)
def test_weight_integers_decode_to_the_students_quantized_weights(case, exported):
    e = exported(case)
    _check_weights(e.proto, e.student)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_weight_codes_of_every_bit_width_and_a_model_without_quant_points(bits):
    torch.manual_seed(bits)
    # no QuantPoint: every quantized layer quantizes its own input
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, bias=True),
                        nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 6), nn.Linear(6, 3))
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    student = quantize_model(net, bits, bits).eval()
    proto = build_onnx(student, torch.zeros(1, 3, 8, 8), what="test net")
    onnx.checker.check_model(proto, full_check=True)
    _check_weights(proto, student, prefix="net.")
    assert sum(n.op_type == "QuantizeLinear" for n in proto.graph.node) == 2  # the inputs of conv 2 and linear 1
    x = torch.rand(64, 3, 8, 8) * 3 - 1
    with torch.no_grad():
        want = student(x).numpy()
    got, = _ort_logits(proto, x)
    assert np.allclose(got, want, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------- activations
def test_activation_rounding_equals_torch_at_every_half_way_point():
    """onnxruntime's activation quantizer and DoReFa's give the same float32 value for every float32 input
    within 300 ulps of a level's half-way point (where rounding decides), at every bit width."""
    for bits in range(1, 9):
        n = 2 ** bits - 1
        mids = np.array([(j + 0.5) / n for j in range(n)], dtype=np.float32).view(np.int32)
        x = (mids[:, None] + np.arange(-300, 301, dtype=np.int32)[None, :]).view(np.float32).ravel()
        x = np.concatenate([x, np.float32([0.5, 0.0, 1.0, -0.0, -1e-8, 1.0000001, -3.0, 7.0, 1e-30])])
        proto = build_onnx(ActQuant(bits), torch.zeros(1, len(x)), what=f"{bits}-bit activations")
        ops = [node.op_type for node in proto.graph.node if node.op_type != "Constant"]
        assert ops == ["Clip", "Mul", "QuantizeLinear", "DequantizeLinear", "Div"], ops
        got, = _ort_logits(proto, torch.from_numpy(x)[None])
        want = quantize_activation(torch.from_numpy(x)[None], bits).numpy()
        assert np.array_equal(got, want), (bits, x[(got != want)[0]][:5])
    assert torch.round(torch.tensor(2.5)) == 2  # both round half to even (ONNX QuantizeLinear by its spec)


def _activation_outputs(proto) -> list[str]:
    """The dequantized activation of every QuantizeLinear on data, in graph order: the tensor that leaves the
    Q/DQ chain (and its constant-only rescaling) where the next data op takes it."""
    graph = proto.graph
    const = _constant_tensors(graph)
    out = []
    for node in graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] not in const:
            t = node.output[0]
            while True:
                users = [n for n in graph.node if t in n.input]
                if len(users) == 1 and users[0].op_type in ("DequantizeLinear", "Div", "Mul") and \
                        all(x in const for x in users[0].input[1:] if x):
                    t = users[0].output[0]
                else:
                    break
            out.append(t)
    return out


@pytest.mark.parametrize("case", ["resnet_tiny-4-4", "resnet_tiny-2-2", "alexnet-4-4"])
def test_activations_are_quantized_exactly_where_the_student_quantizes_them(case, exported, test_set):
    e = exported(case)
    data = load_dataset("cifar10-sample")
    images = test_set.images[:20]
    points = [m for m in e.student.modules() if isinstance(m, ActQuant) and m.a_bits != 32]
    assert points
    captured = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: captured.append(out.detach().numpy())) for m in points]
    try:
        _torch_logits(e, images, data.mean, data.std)
    finally:
        for h in hooks:
            h.remove()
    names = _activation_outputs(e.proto)
    assert len(names) == len(points)  # one activation quantizer per point, no more, no fewer
    probe = onnx.ModelProto()
    probe.CopyFrom(e.proto)
    probe.graph.output.extend(helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in names)
    got = _ort_logits(probe, images, names)
    n = 2 ** e.cfg.quant.a_bits - 1
    for k, (g, want) in enumerate(zip(got, captured)):
        assert g.shape == want.shape, k
        levels = g * n
        assert np.array_equal(levels, np.round(levels)) and levels.min() >= 0 and levels.max() <= n, k
        # equal but where a convolution's other summation order flipped a level, and where such flips changed
        # what follows (measured: 98.8-100% of the values equal at each point)
        assert (g == want).mean() >= 0.95, (k, (g == want).mean())


# ---------------------------------------------------------------------------------------- file contents
def test_normalisation_is_the_first_node_and_metadata_describes_the_model(exported):
    e = exported("resnet_tiny-4-4")
    data = load_dataset("cifar10-sample")
    graph = e.proto.graph
    inp = graph.input[0]
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 32, 32]
    first = next(n for n in graph.node if n.op_type != "Constant")
    assert inp.name in first.input
    # the first nodes map the pixels to the training loader's normalised input, bit for bit
    x = data.test.images[:8]
    norm = next(n for n in graph.node if n.op_type == "Conv").input[0]
    probe = onnx.ModelProto()
    probe.CopyFrom(e.proto)
    probe.graph.output.extend([helper.make_tensor_value_info(norm, onnx.TensorProto.FLOAT, None)])
    got, = _ort_logits(probe, x, [norm])
    loader = DeviceLoader(Split(x, torch.zeros(8, dtype=torch.long)), 8, data.mean, data.std, shuffle=False)
    assert np.array_equal(got, loader.normalize(x).numpy())
    meta = {p.key: p.value for p in e.proto.metadata_props}
    assert json.loads(meta["class_names"]) == list(data.classes)
    assert (meta["w_bits"], meta["a_bits"], meta["dataset"], meta["model"]) == ("4", "4", "cifar10-sample",
                                                                              "resnet_tiny")
    assert "[0, 255]" in meta["input"] and meta["rolekd_version"] and meta["rolekd_commit"]
    assert np.allclose(json.loads(meta["mean"]), data.mean) and np.allclose(json.loads(meta["std"]), data.std)
    # BatchNorm stays a node: one per BatchNorm module of the student
    bns = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in e.student.modules())
    assert sum(n.op_type == "BatchNormalization" for n in graph.node) == bns


def test_size_file_counts_bits_and_parameters(exported):
    e = exported("resnet_tiny-2-2")
    size = json.loads(e.out.with_name(e.out.stem + ".size.json").read_text())
    state = {k: v for k, v in e.student.state_dict().items() if v.is_floating_point()}
    layers = _quantized_layers(e.student)
    qnumel = sum(m.weight.numel() for m in layers.values())
    assert size["fp32_bytes"] == 4 * sum(v.numel() for v in state.values())
    assert size["quantized_weights"] == qnumel
    assert size["packed_bytes"] == size["fp32_bytes"] - 4 * qnumel + sum(-(-m.weight.numel() * 2 // 8)
                                                                         for m in layers.values())
    assert size["onnx_file_bytes"] == e.out.stat().st_size
    assert size["onnx_file_bytes"] < size["fp32_bytes"] / 2  # one byte per 2-bit weight, not four


def test_sizes_follow_the_published_parameter_counts():
    """fp32 = 4 bytes x (parameters + BatchNorm running statistics); packed: every weight but the first conv
    and the last linear layer at k bits."""
    for name, params, first, last in [("resnet18", 11_173_962, 3 * 64 * 9, 512 * 10 + 10),
                                      ("alexnet", 36_082_624, 3 * 64 * 121, 4096 * 10)]:
        with torch.device("meta"):
            fp = create(name)
        bn = [m for m in fp.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        bn_params = sum(2 * m.num_features for m in bn)
        for bits in (4, 2):
            cfg = load_config(None, [f"model={name}", f"w_bits={bits}", f"a_bits={bits}"])
            size = config_size(cfg, 10)
            assert size["fp32_bytes"] == 4 * (params + bn_params)
            quantized = params - first - last - bn_params
            assert size["quantized_weights"] == quantized
            assert abs(size["packed_bytes"] - (4 * (first + last + 2 * bn_params) + quantized * bits / 8)) < 64
    with torch.device("meta"):
        assert model_size(create("resnet_tiny"))["packed_bytes"] == model_size(create("resnet_tiny"))["fp32_bytes"]


@pytest.mark.parametrize("bits", [1, 3])
def test_packed_size_is_exact_bytes_with_each_1bit_layers_scale(bits):
    """Every byte counted: per quantized tensor ceil(numel * k / 8) bytes, plus its float32 scale mean|w| at
    1 bit (4 bytes a tensor; k >= 2 bits need none), and 4 bytes for every other float value, from the
    architecture's tensors listed here."""
    cfg = load_config(None, ["model=resnet_tiny", f"w_bits={bits}", f"a_bits={bits}"])
    size = config_size(cfg, 10)
    with torch.device("meta"):
        net = quantize_model(create("resnet_tiny"), w_bits=bits, a_bits=bits)
    layers = _quantized_layers(net)
    assert len(layers) >= 8
    q = {f"{p}.weight": m.weight.numel() for p, m in layers.items()}
    floats = [t.numel() for n, t in list(net.named_parameters()) + list(net.named_buffers())
              if t.is_floating_point() and n not in q]
    want = sum(-(-n * bits // 8) for n in q.values()) + (4 * len(q) if bits == 1 else 0) + 4 * sum(floats)
    assert size["packed_bytes"] == want
    assert size["packed_weight_bytes"] == want - 4 * sum(floats)


def test_report_student_table_has_a_size_column(runs, tmp_path):
    from rolekd.report import build_report

    root = tmp_path / "pipe"
    root.mkdir()
    cfg = load_config(None, ["pipeline.student={model: resnet_tiny, w_bits: 4, a_bits: 4}", f"out={root}"])
    (root / "config.yaml").write_text(__import__("rolekd.config", fromlist=["dump_config"]).dump_config(cfg))
    shutil.copytree(runs.get("resnet_tiny-4-4"), root / "student")
    text = build_report(root).read_text()
    header = next(line for line in text.splitlines() if line.startswith("| stage |") and "size" in line)
    row = next(line for line in text.splitlines()[text.splitlines().index(header):] if line.startswith("| stage β"))
    assert len(header.split("|")) == len(row.split("|"))
    size = config_size(load_config(root / "student" / "config.yaml"), 10)
    assert f"{size['packed_bytes'] / 1e6:.3f} MB" in row and f"fp32 {size['fp32_bytes'] / 1e6:.3f} MB" in row


# ---------------------------------------------------------------------------------------- errors
def _one_line_error(capsys, rc: int, *words: str) -> None:
    out, err = capsys.readouterr()
    assert rc == 2
    assert err.startswith("rolekd: error: ") and err.count("\n") == 1, err
    assert not out.strip(), out
    for w in words:
        assert w in err, err


def _snapshot(d: Path) -> dict:
    return {p.relative_to(d): p.stat().st_mtime_ns for p in sorted(d.rglob("*"))}


@register_model("exporttest_besselnet")
class _BesselNet(nn.Module):
    """A user's model with an op ONNX (opset 17) lacks: the modified Bessel function i0."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.fc(torch.special.i0(self.pool(self.conv(x)).flatten(1) * 0.1))


def test_what_cannot_be_exported_is_one_line_and_writes_nothing(runs, tmp_path, capsys, monkeypatch):
    run = runs.get("resnet_tiny-2-2")
    before = _snapshot(run)
    out = tmp_path / "out" / "m.onnx"
    # not a run directory; a directory that does not exist
    (tmp_path / "empty").mkdir()
    _one_line_error(capsys, _cli(f"export {tmp_path / 'empty'} -o {out}"), "not a rolekd run directory")
    _one_line_error(capsys, _cli(f"export {tmp_path / 'nowhere'} -o {out}"), "not a directory")
    # a run that has not finished (no result.json, no model.safetensors yet)
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run, unfinished, ignore=shutil.ignore_patterns("result.json", "model.safetensors", "*.onnx",
                                                                  "*.size.json"))
    _one_line_error(capsys, _cli(f"export {unfinished} -o {out}"), "not a finished run")
    # a user's model with an op ONNX lacks
    bessel = tmp_path / "bessel"
    assert _cli(f"train model=exporttest_besselnet epochs=1 data.max_train=64 data.max_test=64 {FAST} out={bessel}") == 0
    capsys.readouterr()
    _one_line_error(capsys, _cli(f"export {bessel} -o {out}"), "cannot export", "i0")
    assert not (bessel / "model.onnx").exists()
    # onnx not installed
    monkeypatch.setitem(sys.modules, "onnx", None)
    _one_line_error(capsys, _cli(f"export {run} -o {out}"), "pip install", "rolekd[export]")
    monkeypatch.undo()
    assert not out.parent.exists() or not any(out.parent.iterdir())
    assert _snapshot(run) == before


def test_export_command_prints_sizes_and_its_check(runs, tmp_path, capsys):
    run = runs.get("resnet_tiny-4-4")
    out = tmp_path / "student.onnx"
    assert _cli(f"export {run} -o {out} --check 100") == 0
    printed = capsys.readouterr().out
    size = json.loads((tmp_path / "student.size.json").read_text())
    assert f"{size['packed_bytes'] / 1e6:.3f} MB" in printed and f"{size['fp32_bytes'] / 1e6:.3f} MB" in printed
    c = size["check"]
    assert c["test_images"] == 100 and c["top1_agree"] >= 99 and f"top-1 agrees on {c['top1_agree']}" in printed
