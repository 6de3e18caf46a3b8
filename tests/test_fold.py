"""Folding a frozen teacher's BatchNorm into its convolutions (rolekd.models.fold): the folded copy computes
what the network computes (its own eval forward is the reference), feature taps read the same points, and
nothing is folded where a hook or a second reader would see the difference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rolekd.distill import build_kd_objective
from rolekd.models import FeatureTaps, create
from rolekd.models.fold import conv_bn_pairs, fold_batchnorm
from rolekd.quant import quantize_model


@pytest.fixture(scope="module")
def images(cifar_images) -> torch.Tensor:
    x = torch.from_numpy(cifar_images[:16]).permute(0, 3, 1, 2).float() / 255.0
    return (x - 0.45) / 0.25


def _trained_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BatchNorm statistics and affine parameters (fresh ones are 0/1: folding them is nearly a
    no-op), eval mode."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.1)
            m.weight.data.copy_(torch.randn(c, generator=g) * 0.5 + 1)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.3)
    return model.eval()


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


@pytest.mark.parametrize("name", ["resnet_tiny", "alexnet", "wrn_10_1", "preresnet11", "pyramidnet_20_16"])
def test_folded_copy_computes_the_network(name, images):
    torch.manual_seed(0)
    model = _trained_like(create(name, num_classes=10))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pairs = conv_bn_pairs(model)
    # every pair found is a plain convolution that feeds that BatchNorm
    for conv, bn in pairs:
        assert type(model.get_submodule(conv)) is nn.Conv2d and type(model.get_submodule(bn)) is nn.BatchNorm2d
    folded = fold_batchnorm(model)
    with torch.no_grad(), FeatureTaps(model) as t0, FeatureTaps(folded) as t1:
        ref, out = t0(images), t1(images)
    _close(out.logits, ref.logits)
    _close(out.embedding, ref.embedding)
    assert list(out.features) == list(ref.features)
    for k in ref.features:
        _close(out.features[k], ref.features[k])
    # the network itself is untouched; the copy has one BatchNorm fewer per pair, no gradients
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules()) == n_bn - len(pairs)
    assert not any(p.requires_grad for p in folded.parameters())
    assert not folded.training


def test_resnet_folds_every_batchnorm(images):
    # CifarResNet: every BatchNorm follows a convolution (stem, two per block, the projection shortcuts)
    model = _trained_like(create("resnet_tiny"))
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert len(conv_bn_pairs(model)) == n_bn == 1 + 2 * 4 + 3
    assert ("conv1", "bn1") in conv_bn_pairs(model) and ("layer2.0.shortcut.0", "layer2.0.shortcut.1") in \
        conv_bn_pairs(model)


def test_one_pair_against_the_formula():
    torch.manual_seed(1)
    net = _trained_like(nn.Sequential(nn.Conv2d(3, 5, 3, padding=1, bias=True), nn.BatchNorm2d(5, eps=1e-3)))
    x = torch.randn(4, 3, 8, 8)
    conv, bn = net[0], net[1]
    y = conv(x)
    shape = (1, -1, 1, 1)
    expect = ((y - bn.running_mean.view(shape)) / torch.sqrt(bn.running_var.view(shape) + 1e-3)
              * bn.weight.view(shape) + bn.bias.view(shape))
    with torch.no_grad():
        _close(fold_batchnorm(net)(x), expect)


class _TwoReaders(nn.Module):
    """The convolution's output feeds its BatchNorm and the sum after it: folding would change the sum."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class _Tapped(nn.Module):
    """The convolution itself is a declared feature tap: its hook must read the raw output."""

    kd_taps = {"raw": "conv"}

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).mean((2, 3)))


class _SharedConv(nn.Module):
    """One convolution called twice, once before the BatchNorm and once not: its weights must stay."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x.flip(-1))


class _SharedNorm(nn.Module):
    """One BatchNorm called twice, once after the convolution and once on the input: it must stay."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.bn(x)


@pytest.mark.parametrize("net", [_TwoReaders, _Tapped, _SharedConv, _SharedNorm])
def test_nothing_folded_where_a_reader_would_see_it(net):
    torch.manual_seed(2)
    model = _trained_like(net())
    x = torch.randn(2, 3, 6, 6)
    assert conv_bn_pairs(model) == []
    folded = fold_batchnorm(model)
    with torch.no_grad(), FeatureTaps(model, embedding=False) as t0, FeatureTaps(folded, embedding=False) as t1:
        ref, out = t0(x), t1(x)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=0)
    for k in ref.features:
        torch.testing.assert_close(out.features[k], ref.features[k], rtol=0, atol=0)


def test_quantized_convolutions_are_not_folded():
    # a quantized conv quantizes its weights: scaling them by BatchNorm first would change what it rounds
    model = quantize_model(_trained_like(create("resnet_tiny")), 4, 4)
    pairs = conv_bn_pairs(model)
    assert ("conv1", "bn1") in pairs  # the full-precision stem stays foldable
    assert all(type(model.get_submodule(c)) is nn.Conv2d for c, _ in pairs)
    assert len(pairs) < sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_kd_objective_runs_the_teacher_folded_and_keeps_it(images):
    torch.manual_seed(3)
    teacher = _trained_like(create("resnet_tiny"))
    student = create("resnet_tiny")
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    outs, calls = {}, []
    hook = teacher.layer1.register_forward_hook(lambda m, *_: calls.append(m))
    for fold in (False, True):
        obj = build_kd_objective("iikd", teacher, fold_teacher_bn=fold, probe=images[:2])
        obj.setup(student, torch.device("cpu"))
        calls.clear()
        with torch.no_grad():
            outs[fold] = obj.forward_teacher(images)
        # folded, the teacher's own modules do not run (its copy does, taps included)
        assert (teacher.layer1 in calls) is (not fold)
        obj.close()
    hook.remove()
    _close(outs[True].logits, outs[False].logits)
    assert list(outs[True].features) == list(outs[False].features) and outs[True].features
    for k in outs[False].features:
        _close(outs[True].features[k], outs[False].features[k])
    assert outs[True].embedding is None and outs[False].embedding is None  # II-KD's RKD reads the logits
    # the teacher keeps its BatchNorm layers and weights; no hooks are left on it
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in teacher.modules()) == 12
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in teacher.modules())


def test_dml_trains_its_teacher_so_never_folds(images):
    teacher = create("resnet_tiny")
    obj = build_kd_objective("dml", teacher, fold_teacher_bn=True)
    assert obj.fold_teacher_bn is False
    obj.setup(create("resnet_tiny"), torch.device("cpu"))
    assert obj._teacher_net() is teacher
