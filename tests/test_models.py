"""Model zoo: registry, forward/backward, KD taps, parameter counts against published figures."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rolekd.errors import UserError
from rolekd.models import FeatureTaps, create, list_models, register_model
from rolekd.models import registry

# --------------------------------------------------------------------------------------------
# Expected tap shapes (C, H, W) per small instance, from the architecture definitions:
# ResNet: widths w_i at 32/16/8/4; AlexNet: 5 conv blocks with 3 max-pools; WRN-d-k: 16k/32k/64k
# at 32/16/8; PreResNet: 16/32/64 (x4 bottleneck); PyramidNet: round(16 + alpha * s / 3) (x4).
# --------------------------------------------------------------------------------------------
SMALL = {
    "resnet_tiny": ({"stage1": (8, 32, 32), "stage2": (16, 16, 16), "stage3": (32, 8, 8),
                     "stage4": (64, 4, 4)}, 64),
    "resnet18": ({"stage1": (64, 32, 32), "stage2": (128, 16, 16), "stage3": (256, 8, 8),
                  "stage4": (512, 4, 4)}, 512),
    "alexnet": ({"conv2": (192, 8, 8), "conv3": (384, 8, 8), "conv4": (256, 8, 8),
                 "conv5": (256, 4, 4)}, 4096),
    "wrn_10_1": ({"stage1": (16, 32, 32), "stage2": (32, 16, 16), "stage3": (64, 8, 8)}, 64),
    "wrn_16_2": ({"stage1": (32, 32, 32), "stage2": (64, 16, 16), "stage3": (128, 8, 8)}, 128),
    "preresnet20": ({"stage1": (16, 32, 32), "stage2": (32, 16, 16), "stage3": (64, 8, 8)}, 64),
    "preresnet11": ({"stage1": (64, 32, 32), "stage2": (128, 16, 16), "stage3": (256, 8, 8)}, 256),
    "pyramidnet_20_16": ({"stage1": (round(16 + 16 / 3), 32, 32), "stage2": (round(16 + 32 / 3), 16, 16),
                          "stage3": (32, 8, 8)}, 32),
    "pyramidnet_11_12": ({"stage1": (4 * 20, 32, 32), "stage2": (4 * 24, 16, 16),
                          "stage3": (4 * 28, 8, 8)}, 4 * 28),
}
POST_RELU_TAPS = {"resnet_tiny", "resnet18", "alexnet"}  # the pre-activation nets tap raw sums


@pytest.fixture(scope="module")
def images(cifar_images) -> torch.Tensor:
    """Two real CIFAR-10 images, normalised, (2, 3, 32, 32)."""
    x = torch.from_numpy(cifar_images[:2]).permute(0, 3, 1, 2).float() / 255.0
    return (x - 0.45) / 0.25


@pytest.mark.parametrize("name", list(SMALL))
def test_forward_backward_and_taps(name, images):
    torch.manual_seed(0)
    model = create(name, num_classes=10)
    model.train()
    taps_expected, emb_dim = SMALL[name]
    with FeatureTaps(model) as taps:
        out = taps(images)
    assert out.logits.shape == (2, 10)
    assert list(out.features) == list(taps_expected)  # declared order, shallow to deep
    for tap, chw in taps_expected.items():
        assert tuple(out.features[tap].shape) == (2, *chw), tap
        if name in POST_RELU_TAPS:
            assert (out.features[tap] >= 0).all(), tap
    assert out.embedding.shape == (2, emb_dim)
    assert (out.embedding >= 0).all()  # every head pools a ReLU output
    # The embedding is exactly the classifier's input.
    torch.testing.assert_close(model.fc(out.embedding), out.logits)
    # Plain forward keeps its signature and returns logits only.
    model.eval()
    with torch.no_grad():
        logits = model(images)
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 10)
    # Backward reaches every parameter with a finite, non-zero gradient.
    model.train()
    F.cross_entropy(model(images), torch.tensor([3, 7])).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", ["resnet_tiny", "alexnet", "wrn_10_1", "preresnet11", "pyramidnet_20_16"])
def test_module_contract_for_quantiser_and_hooks(name, images):
    model = create(name)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert type(convs[0]) is nn.Conv2d and convs[0].in_channels == 3  # first conv = the stem
    assert linears[-1][0] == model.kd_embedding  # last linear = the classifier
    assert all(type(m) is nn.Linear for _, m in linears)
    # Every ReLU is its own module, called once per forward (so hooks on it see one output).
    calls: dict[str, int] = {}
    relus = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ReLU)]
    assert len({id(m) for _, m in relus}) == len(relus)
    handles = [m.register_forward_hook(lambda _m, _i, _o, n=n: calls.__setitem__(n, calls.get(n, 0) + 1))
               for n, m in relus]
    model.eval()
    with torch.no_grad():
        model(images)
    for h in handles:
        h.remove()
    assert calls == {n: 1 for n, _ in relus}


def test_num_classes_changes_head(images):
    for name in ("resnet_tiny", "alexnet", "wrn_10_1", "preresnet20", "pyramidnet_20_16"):
        m10, m100 = create(name), create(name, num_classes=100)
        assert m100.fc.out_features == 100 and m10.fc.out_features == 10
        emb, bias = m10.fc.in_features, int(m10.fc.bias is not None)
        diff = sum(p.numel() for p in m100.parameters()) - sum(p.numel() for p in m10.parameters())
        assert diff == 90 * (emb + bias), name
        m100.eval()
        with torch.no_grad():
            assert m100(images).shape == (2, 100)


# --------------------------------------------------------------------------------------------
# Parameter counts. Closed-form counts are written here from the papers' layer tables,
# independently of the module code; published figures are checked at their stated precision.
# --------------------------------------------------------------------------------------------
def _count(name: str, **kwargs) -> int:
    with torch.device("meta"):  # no memory or init cost for the 26M-36M nets
        model = create(name, **kwargs)
    return sum(p.numel() for p in model.parameters())


def _wrn_formula(depth: int, k: int, nc: int = 10) -> int:
    n = (depth - 4) // 6
    total, cin = 3 * 16 * 9, 16
    for w in (16 * k, 32 * k, 64 * k):
        for _ in range(n):
            total += 2 * cin + 9 * cin * w + 2 * w + 9 * w * w + (cin * w if cin != w else 0)
            cin = w
    return total + 2 * cin + cin * nc + nc


def _pyramid_basic_formula(depth: int, alpha: int, nc: int = 10) -> int:
    n = (depth - 2) // 6
    total, cin, width = 3 * 16 * 9 + 2 * 16, 16, 16.0
    for _ in range(3 * n):
        width += alpha / (3 * n)
        p = int(round(width))
        total += 2 * cin + 9 * cin * p + 2 * p + 9 * p * p + 2 * p  # BN, conv, BN, conv, BN
        cin = p
    return total + 2 * cin + cin * nc + nc


def test_param_counts_exact_published():
    assert _count("wrn_28_10") == 36_479_194  # WRN-28-10, 36.5M
    assert _count("resnet18") == 11_173_962  # CIFAR ResNet18, 11.2M
    for depth, k in ((28, 10), (40, 2), (16, 2), (10, 1)):
        assert _count(f"wrn_{depth}_{k}") == _wrn_formula(depth, k)
    assert _count("wrn_16_2", num_classes=100) == _wrn_formula(16, 2, 100)


def test_param_counts_rounded_published():
    # Published to 0.1M (WRN paper / CRD tables; He et al. 2016 identity mappings).
    assert round(_count("wrn_40_2") / 1e6, 1) == 2.2
    assert round(_count("wrn_16_2") / 1e6, 2) == 0.69  # "0.7M"
    assert round(_count("preresnet110") / 1e6, 1) == 1.7
    assert round(_count("preresnet164") / 1e6, 1) == 1.7
    assert round(_count("preresnet56") / 1e6, 2) == 0.86  # 0.85M with parameter-free shortcuts
    assert round(_count("preresnet20") / 1e6, 2) == 0.27


def test_param_counts_pyramidnet():
    # The authors' README table: parameters and output feature dimension (CIFAR).
    for name, params, dim in (("pyramidnet_200_240", 26.6e6, 1024), ("pyramidnet_272_200", 26.0e6, 864),
                              ("pyramidnet_164_48", 1.7e6, 256)):
        assert abs(_count(name) / params - 1) < 0.015, name
        with torch.device("meta"):
            assert create(name).fc.in_features == dim
    with torch.device("meta"):
        assert create("pyramidnet_110_48").fc.in_features == 64
    assert _count("pyramidnet_110_48") == _pyramid_basic_formula(110, 48)
    assert abs(_count("pyramidnet_110_48") / 1.7e6 - 1) < 0.05  # basic nets: see module docstring


def test_alexnet_width_scales_every_layer():
    net = create("alexnet", width=0.25)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    fcs = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert [m.out_channels for m in convs] == [16, 48, 96, 64, 64]
    assert [(m.in_features, m.out_features) for m in fcs] == [(64 * 16, 1024), (1024, 1024), (1024, 10)]
    assert net.num_features == 1024
    with torch.no_grad():
        assert net.eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(UserError, match="width"):
        create("alexnet", width=0)


def test_alexnet_matches_authors_layers():
    convs = [(3, 64, 11), (64, 192, 5), (192, 384, 3), (384, 256, 3), (256, 256, 3)]
    expected = sum(ci * co * k * k + 2 * co for ci, co, k in convs)
    expected += 2 * (4096 * 4096 + 2 * 4096) + 4096 * 10  # fc1, fc2 (+BN), classifier, no biases
    assert _count("alexnet") == expected == 36_082_624
    model = create("alexnet", tap_conv1=True)
    assert list(model.kd_taps) == ["conv1", "conv2", "conv3", "conv4", "conv5"]
    assert list(create("alexnet").kd_taps) == ["conv2", "conv3", "conv4", "conv5"]
    with FeatureTaps(model) as taps:
        out = taps(torch.randn(2, 3, 32, 32))
    assert out.features["conv1"].shape == (2, 64, 16, 16) and (out.features["conv1"] >= 0).all()


def test_block_choice_and_kwargs():
    assert create("preresnet164").block == "bottleneck"
    assert create("preresnet110").block == "basic"
    assert create("preresnet56", block="bottleneck").block == "bottleneck"  # 54 = 9 * 6
    assert create("pyramidnet_110_48").block == "basic"
    assert create("pyramidnet_164_48").block == "bottleneck"
    assert create("pyramidnet_20_16", block="basic").block == "basic"
    wrn = create("wrn_16_2", dropout=0.3)
    assert {m.p for m in wrn.modules() if isinstance(m, nn.Dropout)} == {0.3}
    assert len(create("wrn_16_2").layer1) == 2 and len(create("wrn_28_10").layer3) == 4


def test_resnet_act_in_feeds_both_branches():
    """The block-input quantisation point (act_in) sits before the shortcut too (authors' code)."""
    torch.manual_seed(0)
    block = create("resnet_tiny").layer1[0].eval()  # identity shortcut
    block.act_in = _Zero()
    with torch.no_grad():
        a, b = block(torch.randn(1, 8, 6, 6)), block(torch.randn(1, 8, 6, 6))
    torch.testing.assert_close(a, b)  # nothing of the raw input reaches the output


def test_quant_points_are_declared_in_data_flow_order():
    """resnet/alexnet mark the authors' activation-quantisation points with parameter-free QuantPoints."""
    from rolekd.models.common import QuantPoint
    block = create("resnet_tiny").layer2[0]
    assert [n for n, _ in block.named_children()] == ["act_in", "conv1", "bn1", "relu1", "act_mid", "conv2",
                                                      "bn2", "shortcut", "relu2"]
    assert type(block.act_in) is QuantPoint and type(block.act_mid) is QuantPoint
    alex = create("alexnet")
    assert [n for n, _ in alex.conv1.named_children()] == ["conv", "bn", "relu", "act", "pool"]
    assert [n for n, _ in alex.conv3.named_children()] == ["conv", "bn", "relu", "act"]
    assert [n for n, _ in alex.fc1.named_children()] == ["fc", "bn", "relu", "act"]
    assert [n for n, _ in alex.fc2.named_children()] == ["fc", "bn", "relu"]  # fc's input stays fp
    for model in (block, alex):
        points = [m for m in model.modules() if isinstance(m, QuantPoint)]
        assert points and not any(list(m.parameters()) or list(m.buffers()) for m in points)


class _Zero(nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


def test_registry_names_and_errors():
    names = list_models()
    for expected in ("resnet18", "resnet_tiny", "alexnet", "wrn_28_10", "wrn_16_2", "preresnet56",
                     "preresnet164", "pyramidnet_200_240", "wrn_<depth>_<width>", "preresnet<depth>",
                     "pyramidnet_<depth>_<alpha>"):
        assert expected in names
    for name in names:  # every listed concrete name builds
        if "<" not in name:
            with torch.device("meta"):
                assert isinstance(create(name), nn.Module)
    assert create("WRN-10-1").depth == 10  # case and '-' are normalised
    with pytest.raises(UserError, match=r"unknown model 'resnet19'.*resnet18.*list_models"):
        create("resnet19")
    with pytest.raises(UserError, match="6n\\+4"):
        create("wrn_27_10")
    with pytest.raises(UserError, match="depth 21"):
        create("preresnet21")
    with pytest.raises(UserError, match="no option"):
        create("resnet18", width=3)
    with pytest.raises(UserError, match="block"):
        create("preresnet20", block="wide")
    with pytest.raises(UserError, match="num_classes"):
        create("resnet18", num_classes=0)
    for bad in ("", None):
        with pytest.raises(UserError):
            create(bad)


def test_register_model_decorator():
    name = "unit_test_tiny_mlp"
    try:
        @register_model(name)
        def _build(num_classes=10, hidden=4):
            return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, hidden), nn.ReLU(),
                                 nn.Linear(hidden, num_classes))

        model = create(name, num_classes=3, hidden=5)
        assert model[-1].out_features == 3 and model[1].out_features == 5
        assert name in list_models()
        with pytest.raises(ValueError):
            register_model(name)(_build)
    finally:
        registry._MODELS.remove(name)
    assert re.fullmatch(r"[a-z0-9_<>]+", "".join(list_models()))


_META_PROBE = r"""
import json, sys
import torch
from rolekd.models import create, on_meta
shapes = {}
for name in ("resnet_tiny", "resnet18", "alexnet", "wrn_16_2", "preresnet20", "pyramidnet_20_48"):
    with on_meta():
        m = create(name)
    shapes[name] = {k: [list(v.shape), v.device.type] for k, v in m.state_dict().items()}
print(json.dumps({"dynamo": "torch._dynamo" in sys.modules, "shapes": shapes}))
"""


def test_on_meta_builds_every_family_shapes_only_without_importing_the_compiler():
    """Configs are checked by building their model on the meta device; the random initialisers are skipped
    there (their meta kernels import torch._dynamo, ~1.7 s at every command's start)."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _META_PROBE], capture_output=True, text=True, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["dynamo"] is False
    for name, shapes in got["shapes"].items():
        ref = create(name).state_dict()
        assert set(shapes) == set(ref), name
        for k, (shape, device) in shapes.items():
            assert device == "meta" and shape == list(ref[k].shape), (name, k)


@pytest.mark.parametrize("name", ["resnet_tiny", "preresnet20", "wrn_10_1"])
def test_global_pool_is_adaptive_avg_pool_bit_for_bit_and_vmaps_channels_last_without_a_fallback(name):
    """The models' global pool (a mean over H, W) gives nn.AdaptiveAvgPool2d(1)'s numbers bit for bit, NCHW and
    channels-last, and a vmap over stacked channels-last members (the fused search executor) runs it without
    functorch's per-member fallback (AdaptiveAvgPool2d's in-place as_strided_ has no batching rule)."""
    import copy
    import warnings

    from torch.func import functional_call, stack_module_state, vmap

    from rolekd.models.common import GlobalAvgPool
    torch.manual_seed(0)
    model = create(name).eval()
    pools = [n for n, m in model.named_modules() if isinstance(m, GlobalAvgPool)]
    assert len(pools) == 1 and not any(isinstance(m, nn.AdaptiveAvgPool2d) for m in model.modules())
    ref = copy.deepcopy(model)
    ref.avgpool = nn.AdaptiveAvgPool2d(1)
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        for fmt in (torch.contiguous_format, torch.channels_last):
            m, r = copy.deepcopy(model).to(memory_format=fmt), copy.deepcopy(ref).to(memory_format=fmt)
            xi = x.contiguous(memory_format=fmt)
            assert torch.equal(m(xi), r(xi))
    params, buffers = stack_module_state([copy.deepcopy(model).to(memory_format=torch.channels_last) for _ in range(3)])
    xs = torch.randn(3 * 4, 3, 32, 32).contiguous(memory_format=torch.channels_last).view(3, 4, 3, 32, 32)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        out = vmap(lambda p, b, xb: functional_call(model, (p, b), (xb,)))(params, buffers, xs)
    assert out.shape == (3, 4, 10)
    assert not [w for w in caught if "batching rule" in str(w.message)], [str(w.message) for w in caught]
