"""DoReFa quantizers and quantize_model, checked against independent numpy references."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rolekd.errors import UserError
from rolekd.models.taps import FeatureTaps
from rolekd.quant import QConv2d, QLinear, quantize_activation, quantize_model, quantize_weight


# ----------------------------------------------------------------------------- numpy references
def np_weight(w: np.ndarray, k: int) -> np.ndarray:
    if k == 32:
        return w
    if k == 1:
        return np.sign(w) * np.abs(w).mean()
    n = 2 ** k - 1
    t = np.tanh(w)
    r = t / (2 * np.abs(t).max()) + 0.5
    return 2 * (np.round(n * r) / n) - 1


def np_act(x: np.ndarray, k: int) -> np.ndarray:
    if k == 32:
        return x
    n = 2 ** k - 1
    return np.round(np.clip(x, 0, 1) * n) / n


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv_a = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn_a = nn.BatchNorm2d(cout)
        self.conv_b = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn_b = nn.BatchNorm2d(cout)
        self.short = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        h = torch.relu(self.bn_a(self.conv_a(x)))
        return torch.relu(self.bn_b(self.conv_b(h)) + self.short(x))


class SmallNet(nn.Module):
    kd_taps = {"b1": "block1", "b2": "block2"}
    kd_embedding = "fc"

    def __init__(self, num_classes=7):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.block1 = Block(4, 6, 1)
        self.block2 = Block(6, 8, 2)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.block2(self.block1(x))
        return self.fc(x.mean((2, 3)))


@pytest.fixture
def net():
    torch.manual_seed(0)
    m = SmallNet()
    for mod in m.modules():  # non-trivial BN statistics
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 1.5)
    return m.eval()


# ----------------------------------------------------------------------------- quantizers
def test_two_bit_weight_levels_are_exactly_pm_one_and_third():
    torch.manual_seed(1)
    w = torch.randn(4096)
    q = quantize_weight(w, 2)
    levels = torch.tensor([-1.0, -1.0 / 3, 1.0 / 3, 1.0])  # float32 levels
    assert set(q.unique().tolist()) == set(levels.tolist())


@pytest.mark.parametrize("k", [2, 3, 4, 5, 8])
def test_weight_quantizer_matches_formula(k):
    rng = np.random.default_rng(k)
    w = rng.normal(0, 0.7, size=(5, 3, 3, 3))
    q = quantize_weight(torch.from_numpy(w), k).numpy()
    np.testing.assert_allclose(q, np_weight(w, k), rtol=0, atol=1e-12)
    n = 2 ** k - 1
    # levels are (2i - n) / n for integer i in 0..n, and the extreme levels are reached
    i = (q * n + n) / 2
    np.testing.assert_allclose(i, np.round(i), atol=1e-9)
    assert q.max() == pytest.approx(1.0) or q.min() == pytest.approx(-1.0)


def test_one_bit_weight_is_bwn():
    rng = np.random.default_rng(3)
    w = rng.normal(size=(64,))
    q = quantize_weight(torch.from_numpy(w), 1).numpy()
    np.testing.assert_allclose(q, np.sign(w) * np.abs(w).mean(), atol=1e-12)
    assert len(np.unique(q)) == 2


def test_full_precision_is_identity():
    w = torch.randn(10)
    assert quantize_weight(w, 32) is w
    assert quantize_activation(w, 32) is w


@pytest.mark.parametrize("k", [1, 2, 3, 4, 8])
def test_activation_quantizer_levels_and_formula(k):
    rng = np.random.default_rng(10 + k)
    x = rng.uniform(-0.5, 1.5, size=(2000,))
    q = quantize_activation(torch.from_numpy(x), k).numpy()
    np.testing.assert_allclose(q, np_act(x, k), atol=1e-12)
    n = 2 ** k - 1
    levels = np.arange(n + 1) / n
    assert np.all(np.min(np.abs(q[:, None] - levels[None]), axis=1) < 1e-12)
    assert q.min() == 0.0 and q.max() == 1.0


@pytest.mark.parametrize("k", [2, 4, 8])
def test_weight_ste_gradient_is_that_of_the_unrounded_expression(k):
    rng = np.random.default_rng(20 + k)
    w_np = rng.normal(0, 0.8, size=(37,))
    g_np = rng.normal(size=(37,))
    w = torch.from_numpy(w_np).requires_grad_(True)
    (quantize_weight(w, k) * torch.from_numpy(g_np)).sum().backward()
    # un-rounded: 2 (tanh(w) / (2M) + 1/2) - 1 = tanh(w) / M, M = max|tanh(w)| (at index a)
    t = np.tanh(w_np)
    sech2 = 1 - t ** 2
    a = np.argmax(np.abs(t))
    m = np.abs(t[a])
    expected = g_np * sech2 / m
    expected[a] -= np.sign(t[a]) * sech2[a] * (g_np * t).sum() / m ** 2
    np.testing.assert_allclose(w.grad.numpy(), expected, rtol=1e-10, atol=1e-12)


def test_weight_gradient_with_tied_maxima_matches_autograd_of_the_unrounded_expression():
    """Several entries share max|tanh(w)| (both signs): M's gradient is split among them as autograd's max."""
    w = torch.tensor([0.3, -1.2, 1.2, 0.0, -0.7, 1.2], dtype=torch.float64, requires_grad=True)
    g = torch.tensor([0.5, -1.0, 2.0, 0.3, 1.5, -0.25], dtype=torch.float64)
    (quantize_weight(w, 3) * g).sum().backward()
    w_ref = w.detach().clone().requires_grad_(True)
    t = torch.tanh(w_ref)
    ((t / t.abs().max()) * g).sum().backward()
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-12, atol=1e-14)
    z = torch.zeros(4, requires_grad=True)  # all-zero weights: finite (zero) gradient, levels +-1/7
    quantize_weight(z, 3).sum().backward()
    assert torch.isfinite(z.grad).all()


def test_activation_gradient_passes_at_the_clip_bounds():
    x = torch.tensor([-1e-7, 0.0, 0.5, 1.0, 1.0 + 1e-6], requires_grad=True)
    quantize_activation(x, 2).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]  # as torch.clamp's gradient


def test_one_bit_weight_gradient_is_identity():
    w = torch.randn(20, dtype=torch.float64, requires_grad=True)
    g = torch.randn(20, dtype=torch.float64)
    (quantize_weight(w, 1) * g).sum().backward()
    assert torch.equal(w.grad, g)


@pytest.mark.parametrize("k", [1, 4, 8])
def test_activation_quantizer_without_gradients_is_the_same_function(k):
    """Evaluation (no_grad) takes a graph-free path without the gradient mask: the same levels, bit for bit."""
    rng = np.random.default_rng(40 + k)
    x = torch.from_numpy(rng.uniform(-0.5, 1.5, size=(6, 5, 4, 3)).astype(np.float32))
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        fast = quantize_activation(x, k)
    slow = quantize_activation(x.clone().requires_grad_(True), k)
    assert slow.requires_grad and not fast.requires_grad
    assert torch.equal(fast, slow.detach())
    n = np.float32(2 ** k - 1)  # the formula in float32 arithmetic (numpy's, IEEE as torch's)
    np.testing.assert_array_equal(fast.numpy(), np.round(np.clip(x.numpy(), 0, 1) * n) / n)


def test_activation_gradient_of_a_channels_last_map_is_the_clip_mask():
    """The mask is made straight into the input's layout (a channels-last map, as the CPU workers train)."""
    x = torch.rand(4, 8, 5, 5) * 1.6 - 0.3
    x[0, 0, 0, :2] = torch.tensor([0.0, 1.0])  # the bounds pass the gradient
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    g = torch.randn(4, 8, 5, 5)
    (quantize_activation(x, 4) * g).sum().backward()
    assert torch.equal(x.grad, g * ((x.detach() >= 0) & (x.detach() <= 1)))


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_activation_gradient_is_the_clip_mask_to_the_bit_at_the_edges(dtype, relu):
    """The backward (one ``hardtanh_backward`` on the saved input between the neighbours of 0 and 1) passes the
    gradient exactly where ``0 <= x <= 1``: at -0, 0, 1, their neighbours in each dtype, the smallest subnormals
    and the infinities, as the mask ``(x >= 0) & (x <= 1)`` does. With ``relu=True`` (a ReLU and the quantizer
    in one node) the values and the gradient are those of ``relu`` followed by the quantizer: ``0 < x <= 1``."""
    zero, one = torch.zeros((), dtype=dtype), torch.ones((), dtype=dtype)
    tiny = torch.nextafter(zero, one)
    inf = torch.tensor(float("inf"), dtype=dtype)
    edges = [zero, -zero, one, tiny, -tiny, torch.nextafter(one, zero), torch.nextafter(one, one + one),
             torch.nextafter(zero, -one), inf, -inf, *(torch.tensor(v, dtype=dtype) for v in (0.5, -3.0, 7.0))]
    x = torch.stack(edges).requires_grad_(True)
    g = torch.arange(1, len(edges) + 1, dtype=dtype)
    out = quantize_activation(x, 4, relu=relu)
    (out * g).sum().backward()
    if not relu:
        assert torch.equal(x.grad, g * ((x.detach() >= 0) & (x.detach() <= 1)).to(dtype))
        return
    x_ref = x.detach().clone().requires_grad_(True)
    ref = quantize_activation(torch.relu(x_ref), 4)
    (ref * g).sum().backward()
    assert torch.equal(out, ref) and torch.equal(x.grad, x_ref.grad)
    assert torch.equal(x.grad, g * ((x.detach() > 0) & (x.detach() <= 1)).to(dtype))


def test_a_quantized_blocks_relu_and_quantizer_run_as_one_node_with_the_same_numbers():
    """A quantized ResNet block's ``relu1`` -> ``act_mid`` while training: one node (no ReLU forward or backward),
    the outputs and every gradient equal to the two modules run apart (bit for bit, channels-last, exact zeros in
    the ReLU's input); a hook on the ReLU, evaluation and full precision keep the modules as they are."""
    from rolekd.models.resnet import BasicBlock
    torch.manual_seed(3)
    block = quantize_model(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), BasicBlock(8, 8), nn.Flatten(),
                                         nn.Linear(8 * 36, 2)), 4, 4)[1]
    x = torch.rand(4, 8, 6, 6).contiguous(memory_format=torch.channels_last)

    def run(fused: bool):
        b = copy.deepcopy(block).train()
        calls = []
        if fused:  # the ReLU module's own forward never runs
            b.relu1.forward = lambda t: (calls.append(1), torch.relu(t))[1]
        else:  # a hook on the ReLU: the modules run as they are (and the hook sees the call)
            b.relu1.register_forward_hook(lambda m, i, o: calls.append(1))
        xi = x.clone().requires_grad_(True)
        with torch.no_grad():
            b.bn1.bias[:2] = -50.0  # whole channels at exactly 0 after the ReLU
        out = b(xi)
        out.square().sum().backward()
        return out, [xi.grad] + [p.grad for p in b.parameters()], calls

    fused, g_fused, c_fused = run(True)
    apart, g_apart, c_apart = run(False)
    assert c_apart == [1] and c_fused == []
    assert torch.equal(fused, apart)
    assert all(torch.equal(a, b) for a, b in zip(g_fused, g_apart))
    counter = []
    block.relu1.register_forward_pre_hook(lambda m, i: counter.append(1))
    block.eval()
    with torch.no_grad():
        block(x)
    assert counter == [1]  # evaluation: the ReLU module runs


@pytest.mark.parametrize("k", [1, 2, 4])
def test_activation_gradient_passes_inside_clip_only(k):
    rng = np.random.default_rng(30 + k)
    x_np = rng.uniform(-1, 2, size=(500,))
    x_np = x_np[(np.abs(x_np) > 1e-3) & (np.abs(x_np - 1) > 1e-3)]  # away from the clip's kinks
    g_np = rng.normal(size=x_np.shape)
    x = torch.from_numpy(x_np).requires_grad_(True)
    (quantize_activation(x, k) * torch.from_numpy(g_np)).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), g_np * ((x_np > 0) & (x_np < 1)), atol=0)


@pytest.mark.parametrize("bad", [0, 9, 16, 31, 33, -1, 2.5, "4", True, None])
def test_bits_validation(bad, net):
    with pytest.raises(UserError):
        quantize_weight(torch.ones(3), bad)
    with pytest.raises(UserError):
        quantize_activation(torch.ones(3), bad)
    with pytest.raises(UserError):
        quantize_model(net, bad, 4)
    with pytest.raises(UserError):
        quantize_model(net, 4, bad)


# ----------------------------------------------------------------------------- quantize_model
def test_quantize_model_replaces_inner_layers_only_and_copies(net):
    before = {k: v.clone() for k, v in net.state_dict().items()}
    q = quantize_model(net, 4, 3)
    assert (q.w_bits, q.a_bits) == (4, 3)
    assert type(q.conv1) is nn.Conv2d and type(q.fc) is nn.Linear
    inner = ["block1.conv_a", "block1.conv_b", "block1.short", "block2.conv_a", "block2.conv_b", "block2.short"]
    mods = dict(q.named_modules())
    for name in inner:
        assert isinstance(mods[name], QConv2d)
        assert (mods[name].w_bits, mods[name].a_bits) == (4, 3)
    # the input model is untouched: same classes, same values, no shared storage
    assert all(type(m) in (nn.Conv2d, nn.Linear) for n, m in net.named_modules() if n in inner + ["conv1", "fc"])
    assert not hasattr(net, "w_bits")
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])
        assert v.data_ptr() != q.state_dict()[k].data_ptr()


def test_quantize_model_linear_in_the_middle_becomes_qlinear():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 8), nn.ReLU(), nn.Linear(8, 2))
    q = quantize_model(m, 2, 2)
    assert type(q[0]) is nn.Conv2d and isinstance(q[2], QLinear) and type(q[4]) is nn.Linear
    assert q(torch.randn(2, 3, 6, 6)).shape == (2, 2)


def test_first_and_last_layers_stay_full_precision(net):
    q = quantize_model(net, 2, 2)
    torch.manual_seed(5)
    x = torch.randn(3, 3, 8, 8)
    assert torch.equal(q.conv1(x), net.conv1(x))
    e = torch.randn(3, 8) * 3
    assert torch.equal(q.fc(e), net.fc(e))
    # an inner conv computes conv(Q_a(input), Q_w(weight)), from the numpy references
    h = torch.randn(3, 4, 8, 8)
    w = net.block1.conv_a.weight.detach()
    qa, qw = torch.from_numpy(np_act(h.double().numpy(), 2)), torch.from_numpy(np_weight(w.double().numpy(), 2))
    ref = F.conv2d(qa, qw, stride=1, padding=1)
    out = q.block1.conv_a(h)
    # float32 rounding of a sum of n = 36 products is at most (n + 2) u times the sum of their absolute
    # values (u = 2**-24; +2 for the float32 levels 1/3, 2/3), element by element
    terms = F.conv2d(qa.abs(), qw.abs(), stride=1, padding=1)
    assert ((out.double() - ref).abs() <= (36 + 2) * 2.0 ** -24 * terms).all()
    assert not torch.allclose(out, net.block1.conv_a(h), atol=1e-3)


def test_teacher_weights_load_strictly_into_low_bit_student(net):
    student = quantize_model(SmallNet(), 2, 2)
    assert list(student.state_dict()) == list(net.state_dict())
    student.load_state_dict(net.state_dict(), strict=True)
    for k, v in net.state_dict().items():
        assert torch.equal(student.state_dict()[k], v)
    # and back: the quantized weights never replace the stored full-precision ones
    assert torch.equal(student.block1.conv_a.weight, net.block1.conv_a.weight)


def test_kd_taps_work_on_the_quantized_copy(net):
    q = quantize_model(net, 4, 4).eval()
    x = torch.randn(2, 3, 8, 8)
    with FeatureTaps(q) as taps:
        out = taps(x)
    assert list(out.features) == ["b1", "b2"]
    assert out.features["b2"].shape == (2, 8, 4, 4) and out.embedding.shape == (2, 8)
    assert torch.equal(out.logits, q(x))


def test_full_precision_bits_give_the_same_function(net):
    q = quantize_model(net, 32, 32)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(q(x), net(x))


def test_model_zoo_resnet_tiny_quantizes_and_loads_teacher():
    from rolekd.models import create

    teacher = create("resnet_tiny", num_classes=10)
    student = quantize_model(teacher, 2, 2)
    convs = [(n, type(m)) for n, m in student.named_modules() if isinstance(m, nn.Conv2d)]
    linears = [(n, type(m)) for n, m in student.named_modules() if isinstance(m, nn.Linear)]
    assert convs[0][1] is nn.Conv2d and linears[-1][1] is nn.Linear
    assert all(t is QConv2d for _, t in convs[1:])
    student.load_state_dict(copy.deepcopy(teacher.state_dict()), strict=True)
    student.eval()
    with FeatureTaps(student) as taps:
        out = taps(torch.randn(2, 3, 32, 32))
    assert list(out.features) == list(teacher.kd_taps) and out.logits.shape == (2, 10)


# ----------------------------------------------------------------------------- declared quantisation points
# Manual references of the paper authors' DoReFa students (pba/kd/nets/ResNet.py), written from the
# architecture with functional ops and parameterised by the quantizers: ``qa`` for activations, ``qw``
# for weights (identity for the full-precision model, the numpy references for the student).
def _np_qa(bits):
    return lambda t: torch.from_numpy(np_act(t.detach().numpy(), bits))


def _np_qw(bits):
    return lambda w: torch.from_numpy(np_weight(w.detach().numpy(), bits))


def _ident(t):
    return t


def _bn(t, m):
    return F.batch_norm(t, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)


def _randomize_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) * 0.6 + 0.7)
                m.bias.copy_(torch.rand(n, generator=g) * 0.4 - 0.1)
    return model


def _resnet_block_ref(block, x, qa, qw, raw_shortcut=False):
    """relu(bn2(conv2(Qa(relu(bn1(conv1(q)))))) + shortcut(q)) with q = Qa(x) (raw x if raw_shortcut)."""
    q = qa(x)
    h = F.relu(_bn(F.conv2d(q, qw(block.conv1.weight), stride=block.conv1.stride, padding=1), block.bn1))
    h = _bn(F.conv2d(qa(h), qw(block.conv2.weight), padding=1), block.bn2)
    s_in = x if raw_shortcut else q
    if isinstance(block.shortcut, nn.Sequential):  # projection: 1x1 conv (quantized weight) + BN
        conv, bn = block.shortcut
        s = _bn(F.conv2d(qa(s_in), qw(conv.weight), stride=conv.stride), bn)
    else:
        s = s_in
    return F.relu(h + s)


def _resnet_ref(m, x, qa, qw):
    h = F.relu(_bn(F.conv2d(x, m.conv1.weight, padding=1), m.bn1))  # full-precision stem
    for layer in (m.layer1, m.layer2, m.layer3, m.layer4):
        for block in layer:
            h = _resnet_block_ref(block, h, qa, qw)
    return F.linear(F.adaptive_avg_pool2d(h, 1).flatten(1), m.fc.weight, m.fc.bias)  # fp classifier input


def _alexnet_ref(m, x, qa, qw):
    """Returns (logits, {conv2..conv5 block outputs}); Qa after each conv block's ReLU and fc1's ReLU."""
    feats, h = {}, x
    for i, pool in ((1, True), (2, True), (3, False), (4, False), (5, True)):
        blk = getattr(m, f"conv{i}")
        w = blk.conv.weight if i == 1 else qw(blk.conv.weight)  # conv1 stays full precision
        h = qa(F.relu(_bn(F.conv2d(h, w, padding=blk.conv.kernel_size[0] // 2), blk.bn)))
        if pool:
            h = F.max_pool2d(h, 2, 2)
        feats[f"conv{i}"] = h
    h = h.flatten(1)
    h = qa(F.relu(_bn(F.linear(h, qw(m.fc1.fc.weight)), m.fc1.bn)))
    h = F.relu(_bn(F.linear(h, qw(m.fc2.fc.weight)), m.fc2.bn))  # not quantized after fc2
    return F.linear(h, m.fc.weight), feats


def _on_grid(t, bits):
    n = 2 ** bits - 1
    return bool(((t >= 0) & (t <= 1)).all() and ((t * n - torch.round(t * n)).abs() < 1e-6).all())


@pytest.fixture(scope="module")
def resnet_tiny64():
    from rolekd.models import create
    torch.manual_seed(0)
    return _randomize_bn(create("resnet_tiny").double()).eval()


@pytest.fixture(scope="module")
def alexnet64():
    from rolekd.models import create
    torch.manual_seed(0)
    return _randomize_bn(create("alexnet").double()).eval()


@pytest.mark.parametrize("path", ["layer1.0", "layer2.0"])  # identity / projection shortcut
def test_resnet_block_quantizes_its_input_before_both_branches(resnet_tiny64, path):
    teacher = resnet_tiny64
    student = quantize_model(teacher, 4, 2).eval()
    t_block, s_block = teacher.get_submodule(path), student.get_submodule(path)
    assert isinstance(t_block.shortcut, nn.Identity) == (path == "layer1.0")
    torch.manual_seed(1)
    x = torch.rand(2, t_block.conv1.in_channels, 8, 8, dtype=torch.float64) * 1.6 - 0.3
    with torch.no_grad():
        out = s_block(x)
        ref = _resnet_block_ref(t_block, x, _np_qa(2), _np_qw(4))
        old = _resnet_block_ref(t_block, x, _np_qa(2), _np_qw(4), raw_shortcut=True)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    if path == "layer1.0":  # an identity shortcut adds Q(x), not the raw x
        assert not torch.allclose(out, old, atol=1e-3)


def test_quantized_resnet_tiny_matches_manual_forward(resnet_tiny64):
    student = quantize_model(resnet_tiny64, 4, 2).eval()
    torch.manual_seed(2)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(student(x), _resnet_ref(resnet_tiny64, x, _np_qa(2), _np_qw(4)),
                                   rtol=1e-9, atol=1e-9)


def test_quantized_alexnet_matches_manual_forward_and_taps_are_on_the_grid(alexnet64):
    student = quantize_model(alexnet64, 4, 2).eval()
    torch.manual_seed(3)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad(), FeatureTaps(student) as taps:
        out = taps(x)
        ref_logits, ref_feats = _alexnet_ref(alexnet64, x, _np_qa(2), _np_qw(4))
    torch.testing.assert_close(out.logits, ref_logits, rtol=1e-9, atol=1e-9)
    assert list(out.features) == ["conv2", "conv3", "conv4", "conv5"]
    for name, f in out.features.items():
        torch.testing.assert_close(f, ref_feats[name], rtol=1e-9, atol=1e-9)
        assert _on_grid(f, 2), name  # the KD-tapped student features are the quantized ones
        assert len(f.unique()) > 1, name
    assert not _on_grid(out.embedding, 2)  # fc2's output (fc's input) is left in full precision
    with torch.no_grad(), FeatureTaps(alexnet64) as taps:
        fp = taps(x)
    assert not any(_on_grid(f, 2) for f in fp.features.values())


def test_full_precision_models_are_unchanged_by_the_quant_points(resnet_tiny64, alexnet64):
    from rolekd.models.common import QuantPoint
    qp = QuantPoint()
    x = torch.randn(3, 4)
    assert qp(x) is x and not list(qp.parameters()) and not list(qp.buffers())
    torch.manual_seed(4)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(resnet_tiny64(x), _resnet_ref(resnet_tiny64, x, _ident, _ident),
                                   rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(alexnet64(x), _alexnet_ref(alexnet64, x, _ident, _ident)[0],
                                   rtol=1e-12, atol=1e-12)
        # 32 bits: the quantized copy computes the full-precision function
        assert torch.equal(quantize_model(resnet_tiny64, 32, 32)(x), resnet_tiny64(x))


def test_declared_points_replace_layer_input_quantisation(resnet_tiny64, alexnet64, monkeypatch):
    from rolekd.models import create
    from rolekd.models.common import QuantPoint
    from rolekd.quant import ActQuant
    from rolekd.quant import dorefa

    r = quantize_model(resnet_tiny64, 4, 3)
    acts = {n: m for n, m in r.named_modules() if isinstance(m, ActQuant)}
    assert list(acts) == [f"layer{i}.0.{p}" for i in range(1, 5) for p in ("act_in", "act_mid")]
    assert all(type(m) is ActQuant and m.a_bits == 3 for m in acts.values())
    assert not any(isinstance(m, QuantPoint) for m in r.modules())
    qconvs = [m for m in r.modules() if isinstance(m, QConv2d)]
    assert len(qconvs) == 4 * 2 + 3 and all(not m.quantize_input for m in qconvs)
    assert "quantize_input=False" in repr(qconvs[0]) and "a_bits=3" in repr(next(iter(acts.values())))
    a = quantize_model(alexnet64, 4, 2)
    assert [n for n, m in a.named_modules() if isinstance(m, ActQuant)] == \
        ["conv1.act", "conv2.act", "conv3.act", "conv4.act", "conv5.act", "fc1.act"]
    assert all(not m.quantize_input for m in a.modules() if isinstance(m, (QConv2d, QLinear)))
    # the teacher is untouched: its points are still identities
    assert sum(type(m) is QuantPoint for m in resnet_tiny64.modules()) == 8

    # Activations are quantized exactly once per declared point in a forward, nowhere else.
    calls = []
    real = dorefa.quantize_activation
    monkeypatch.setattr(dorefa, "quantize_activation", lambda x, bits: calls.append(bits) or real(x, bits))
    with torch.no_grad():
        r(torch.randn(1, 3, 32, 32, dtype=torch.float64))
    assert calls == [3] * 8

    # Models without QuantPoints keep quantizing the input of every quantized layer.
    for model in (create("wrn_10_1"), SmallNet()):
        q = quantize_model(model, 4, 3)
        layers = [m for m in q.modules() if isinstance(m, (QConv2d, QLinear))]
        assert layers and all(m.quantize_input and m.a_bits == 3 for m in layers)
        assert not any(isinstance(m, ActQuant) for m in q.modules())
    calls.clear()
    with torch.no_grad():
        q(torch.randn(1, 3, 8, 8))
    assert calls == [3] * 6  # SmallNet: one per inner conv


def test_requantizing_a_quantized_copy_takes_the_new_bits(resnet_tiny64):
    from rolekd.quant import ActQuant
    q1 = quantize_model(resnet_tiny64, 4, 2)
    q2 = quantize_model(q1, 3, 4)
    assert all(m.a_bits == 2 for m in q1.modules() if isinstance(m, ActQuant))  # q1 untouched
    acts = [m for m in q2.modules() if isinstance(m, ActQuant)]
    assert len(acts) == 8 and all(type(m) is ActQuant and m.a_bits == 4 for m in acts)
    assert all(type(m) is QConv2d and (m.w_bits, m.a_bits, m.quantize_input) == (3, 4, False)
               for m in q2.modules() if isinstance(m, QConv2d))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(q2.eval()(x), quantize_model(resnet_tiny64, 3, 4).eval()(x), rtol=0, atol=0)
        assert torch.equal(quantize_model(q1, 32, 32).eval()(x), resnet_tiny64(x))


@pytest.mark.parametrize("name", ["resnet18", "alexnet"])
def test_zoo_state_dict_keys_unchanged_and_load_strictly(name):
    from rolekd.models import create
    teacher = create(name)
    student = quantize_model(teacher, 2, 2)
    assert list(student.state_dict()) == list(teacher.state_dict())
    student.load_state_dict(teacher.state_dict(), strict=True)
    teacher.load_state_dict(student.state_dict(), strict=True)


# ------------------------------------------------------------------------------------ weights quantized as a group


def _group_weights(dtype):
    """Conv/linear-shaped weights, one with maxima tied in both signs, one all zero."""
    g = torch.Generator().manual_seed(7)
    tied = torch.randn(3, 4, generator=g, dtype=dtype) * 0.3
    tied[0, 1], tied[2, 3], tied[1, 0] = 1.3, -1.3, 1.3
    return [torch.randn(8, 4, 3, 3, generator=g, dtype=dtype) * 0.5, tied, torch.zeros(5, 2, dtype=dtype),
            torch.randn(10, 16, generator=g, dtype=dtype)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [2, 4, 8])
def test_weights_quantized_as_a_group_are_each_weight_quantized_alone_bit_for_bit(k, dtype):
    from rolekd.quant.dorefa import quantize_weights
    ws = [w.requires_grad_(True) for w in _group_weights(dtype)]
    alone = [w.detach().clone().requires_grad_(True) for w in ws]
    gen = torch.Generator().manual_seed(k)
    cots = [torch.randn(w.shape, generator=gen, dtype=dtype) for w in ws]
    qs = quantize_weights(ws, k)
    ref = [quantize_weight(w, k) for w in alone]
    for q, r in zip(qs, ref):
        assert torch.equal(q, r)
    sum((q * c).sum() for q, c in zip(qs, cots)).backward()
    sum((r * c).sum() for r, c in zip(ref, cots)).backward()
    for w, a in zip(ws, alone):
        assert torch.equal(w.grad, a.grad)
    # and the gradient is the un-rounded expression's, tied maxima split as autograd's max (float64 formula)
    if dtype == torch.float64:
        for w, c in zip(ws[:2], cots):
            w_ref = w.detach().clone().requires_grad_(True)
            t = torch.tanh(w_ref)
            ((t / t.abs().max()) * c).sum().backward()
            torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-12, atol=1e-14)
    with torch.no_grad():  # without gradients: the same values, no graph
        assert all(torch.equal(q, r) and q.grad_fn is None for q, r in zip(quantize_weights(ws, k), ref))


def test_a_grouped_weight_whose_output_gets_no_gradient_gets_none():
    from rolekd.quant.dorefa import quantize_weights
    ws = [w.requires_grad_(True) for w in _group_weights(torch.float64)]
    qs = quantize_weights(ws, 4)
    grads = torch.autograd.grad((qs[0] * 2).sum() + qs[3].sum(), ws, allow_unused=True)
    assert grads[1] is None and grads[2] is None
    alone = [w.detach().clone().requires_grad_(True) for w in (ws[0], ws[3])]
    want = torch.autograd.grad((quantize_weight(alone[0], 4) * 2).sum() + quantize_weight(alone[1], 4).sum(), alone)
    assert torch.equal(grads[0], want[0]) and torch.equal(grads[3], want[1])


def _without_group_hook(model):
    from rolekd.quant.dorefa import quantize_weights_first
    for key, h in list(model._forward_pre_hooks.items()):
        if h is quantize_weights_first:
            del model._forward_pre_hooks[key]
    return model


def test_a_quantized_model_quantizes_its_weights_as_one_group_and_trains_the_same(resnet_tiny64, monkeypatch):
    """The model's pre-hook quantizes all its layers' weights at once; no layer quantizes its own; outputs and both
    gradients of a clipped KD step (task and KD apart, the graph kept between them) are the per-layer ones."""
    from rolekd.quant import dorefa
    q = quantize_model(copy.deepcopy(resnet_tiny64).float(), 4, 4)
    ref = _without_group_hook(copy.deepcopy(q))
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    y = torch.arange(6) % 10
    calls = []
    real = dorefa.quantize_weight
    monkeypatch.setattr(dorefa, "quantize_weight", lambda w, bits: calls.append(bits) or real(w, bits))
    results = []
    for net in (q, ref):
        calls.clear()
        taps = FeatureTaps(net, features=True)
        out = taps(x)
        task = F.cross_entropy(out.logits, y)
        kd = sum(f.square().mean() for f in out.features.values())
        params = list(net.parameters())
        g_kd = torch.autograd.grad(kd, params, retain_graph=True, allow_unused=True)
        g_task = torch.autograd.grad(task, params)
        taps.remove()
        results.append((out.logits, g_kd, g_task, len(calls)))
    (lq, kq, tq, nq), (lr, kr, tr, nr) = results
    assert nq == 0 and nr == 11  # every quantized weight in the group; without the hook each layer its own
    assert torch.equal(lq, lr)
    assert [g is None for g in kq] == [g is None for g in kr] and any(g is None for g in kq)
    assert all(a is None or torch.equal(a, b) for a, b in zip(kq, kr))
    assert all(torch.equal(a, b) for a, b in zip(tq, tr))


def test_a_layer_takes_the_groups_weight_only_while_it_is_the_same_weight(resnet_tiny64):
    from rolekd.quant.dorefa import quantize_weights_first
    q = quantize_model(copy.deepcopy(resnet_tiny64).float(), 4, 4)
    conv = q.layer2[0].conv1
    x = torch.rand(2, conv.in_channels, 8, 8)
    quantize_weights_first(q, ())  # the group made, then the weight changes (an optimizer step) before its use
    with torch.no_grad():
        conv.weight.mul_(-0.5)
    want = F.conv2d(x, quantize_weight(conv.weight, 4), conv.bias, conv.stride, conv.padding)
    assert torch.equal(conv(x), want)
    with torch.no_grad():  # made without gradients, used with: the layer quantizes its own, with a graph
        quantize_weights_first(q, ())
    conv(x).sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    # the hook is on the model once, also after quantizing a quantized copy again
    hooks = lambda m: sum(h is quantize_weights_first for h in m._forward_pre_hooks.values())  # noqa: E731
    assert hooks(q) == 1 and hooks(quantize_model(q, 3, 3)) == 1 and hooks(copy.deepcopy(q)) == 1
