"""Grouped-convolution kernels of the fused executor (``search.fused_kernel=grouped``, issue 14): n networks
as one network of grouped convolutions must compute what each network computes alone -- outputs, feature
taps, embeddings, BatchNorm running statistics and gradients, DoReFa maxima per member -- and a network
whose forward mixes channels by position must be refused."""

import copy

import pytest
import torch
from torch import nn

from rolekd.errors import UserError
from rolekd.models import FeatureTaps, create
from rolekd.quant import quantize_model
from rolekd.search import FusedExecutor
from rolekd.search.fused import StackedWeights
from rolekd.search.grouped import GroupedNet

pytestmark = pytest.mark.usefixtures("one_thread")


def members(name, n, bits):
    torch.manual_seed(0)
    kw = {"width": 0.25} if name == "alexnet" else {}  # the same layers, 16x fewer weights (float64 is slow)
    nets = [create(name, num_classes=10, **kw) for _ in range(n)]
    for j, m in enumerate(nets):  # members with different BatchNorm statistics and weight scales
        with torch.no_grad():
            for mod in m.modules():
                if isinstance(mod, nn.BatchNorm2d):
                    mod.running_mean.normal_(0, 0.1)
                    mod.running_var.uniform_(0.5, 2.0)
                    mod.weight.uniform_(0.5, 1.5)
            for p in m.parameters():
                p.mul_(1.0 + 0.5 * j)
    return [quantize_model(m, bits, bits) for m in nets] if bits != 32 else nets


def own_outputs(net, x):
    """One network alone: its logits, feature taps and embedding (flattened to one dict)."""
    with FeatureTaps(net) as taps:
        out = taps(x)
    return {"logits": out.logits, **{"feature:" + k: v for k, v in out.features.items()}, "embedding": out.embedding}


def rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)) if a.numel() else 0.0


# float64: no activation lands on the other side of a ReLU kink or a DoReFa level by float rounding (in float32
# one of 100,000 activations does now and then, measured: one flipped ReLU in WRN-10-1 moves a conv gradient by
# 1.6% of its largest entry), so each member is checked against its own network to 1e-9
CASES = [(name, bits, n, training, False) for name, bits, n in [("resnet_tiny", 32, 3), ("resnet_tiny", 4, 3),
                                                                ("wrn_10_1", 32, 3), ("wrn_10_1", 2, 3),
                                                                ("preresnet20", 32, 2)] for training in (True, False)]
CASES += [("resnet_tiny", 4, 3, True, True), ("wrn_10_1", 2, 3, True, True),  # channels-last (the CUDA layout)
          ("alexnet", 4, 2, True, False),  # 4-bit linear layers, BatchNorm1d (width 0.25)
          pytest.param("alexnet", 4, 2, False, False, marks=pytest.mark.slow)]


@pytest.mark.parametrize("name,bits,n,training,channels_last", CASES)
def test_grouped_network_computes_each_members_own_network(name, bits, n, training, channels_last):
    nets = [m.double() for m in members(name, n, bits)]
    # each member run alone, the reference, in the same memory layout (2-bit WRN-10-1 has a channel that is
    # constant before the head's BatchNorm, whose output is then +-1e-15 either side of the ReLU by the
    # layout's summation order: the layouts differ from each other there, not the kernel from the member)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    copies = [m.to(memory_format=fmt) for m in copy.deepcopy(nets)]
    stack = StackedWeights(nets, prefix="net.")
    params, buffers, leaves = stack.rows(0, n)
    g = GroupedNet(nets[0], n, features=True, embedding=True, channels_last=channels_last).train(training)
    torch.manual_seed(1)
    x = torch.randn(n, 6, 3, 32, 32, dtype=torch.float64)
    out = g.run(params, buffers, x)
    # each member's loss: the mean square of its own outputs; summed over the members
    grads = torch.autograd.grad(sum((v * v).flatten(1).mean(1).sum() for v in out.values()), leaves)
    for j, net in enumerate(copies):
        net.train(training)
        ref = own_outputs(net, x[j].contiguous(memory_format=fmt))
        assert out.keys() == ref.keys()
        for k in ref:
            assert out[k][j].shape == ref[k].shape, k
            assert rel(out[k][j], ref[k]) < 1e-9, (j, k)
        ref_grads = torch.autograd.grad(sum((v * v).mean() for v in ref.values()), list(net.parameters()))
        for (pname, _), gg, rg in zip(net.named_parameters(), grads, ref_grads):
            assert rel(gg[j], rg) < 1e-9, (j, pname)
        # BatchNorm running statistics: updated (training) or left (eval) exactly as the member's own
        for bname, b in net.named_buffers():
            torch.testing.assert_close(stack.buffers["net." + bname][j], b, rtol=1e-9, atol=1e-12, msg=bname)


def test_grouped_evaluation_on_shared_images_equals_each_member():
    nets = members("resnet_tiny", 3, 4)
    own = copy.deepcopy(nets)
    stack = StackedWeights(nets, prefix="net.")
    params, buffers, _ = stack.rows(0, 3)
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        logits = GroupedNet(nets[0], 3).eval().run_shared(params, buffers, x)
        for j, net in enumerate(own):
            assert rel(logits[j], net.eval()(x)) < 1e-5


def test_a_layer_the_grouped_kernel_cannot_split_is_refused():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.Flatten(), nn.LazyLinear(10))
    with pytest.raises(UserError, match=r"1 \(GroupNorm\).*search.fused_kernel=vmap"):
        GroupedNet(net, 2)


BASE = ["data.name=cifar10-sample", "data.train_size=64", "data.val_size=64", "train.batch_size=32",
        "train.eval_batch_size=64", "search.population=2", "search.epochs=2", "search.perturb_interval=1",
        "train.progress=false", "train.device=cpu", "search.fused_kernel=grouped"]


def test_pyramidnet_shortcut_padding_is_refused_by_the_grouped_kernel_before_the_run_dir(tmp_path):
    from rolekd.config import load_config
    from rolekd.experiment import MemberFactory, Session, check_config, search_from_config
    from rolekd.search import member_config, search_config

    cfg = load_config(None, BASE + ["model.name=pyramidnet_11_12", f"out={tmp_path / 'run'}", "search.executor=fused"])
    msg = "PyramidNet's forward mixes the members' channels.*fused_kernel=vmap"
    with pytest.raises(UserError, match=msg):
        search_from_config(cfg, verbose=False)
    assert not (tmp_path / "run").exists()  # so that the suggested rerun with the vmap kernel is a fresh run
    ex = FusedExecutor(MemberFactory(Session()))  # the executor refuses it too (members built by other means)
    with pytest.raises(UserError, match=msg):
        ex.start({i: member_config(search_config(cfg), i) for i in range(2)})
    check_config(cfg, search=False)  # a plain training run of the same config does not use the kernel
    ok = FusedExecutor(MemberFactory(Session()))  # the same network with the vmap kernel
    cfg = search_config(load_config(None, BASE + ["model.name=pyramidnet_11_12", f"out={tmp_path}",
                                                  "search.fused_kernel=vmap"]))
    ok.start({i: member_config(cfg, i) for i in range(2)})
    ok.close()
