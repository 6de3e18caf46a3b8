"""The fused search executor (issue 14): members trained as one stacked model must train as the local
executor trains them one after another -- the same losses, the same schedule -- with no coupling between
members (quantizer maxima, BatchNorm, policies, failures), exact slice copies on exploit, and Ray groups
of fused members giving the same search."""

import csv
import json

import pytest
import torch
from torch.func import vmap

from rolekd.augment.schedule import Schedule
from rolekd.config import load_config
from rolekd.errors import UserError
from rolekd.experiment import MemberFactory, Session, search_from_config, train_from_config
from rolekd.quant import quantize_activation, quantize_weight
from rolekd.search import FusedExecutor, member_config, search_config
from rolekd.search.pbt import ZERO_POLICY
from rolekd.search.run import executor_kind, make_executor

# lr 0.003: small enough that float32 rounding differences between a grouped (vmapped) convolution and
# one convolution per member stay far below 1e-4 over two rounds (measured: < 5e-6 for this config);
# at lr 0.1 this tiny net amplifies a 1e-6 relative weight perturbation to 1% within two steps, in the
# local executor alone
BASE = ["model.name=resnet_tiny", "data.name=cifar10-sample", "data.train_size=128", "data.val_size=256",
        "train.batch_size=64", "train.eval_batch_size=256", "search.population=4", "search.epochs=4",
        "search.perturb_interval=2", "train.lr=0.003", "train.progress=false", "train.device=cpu"]
STRONG = [10, 9] * 30  # every op at probability 1, magnitude 9


def config(out, *extra):
    return load_config(None, BASE + [f"out={out}"] + list(extra))


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread per module, as Ray workers


def rows(run_dir):
    with open(run_dir / "rewards.csv") as f:
        return {(r["epoch"], r["member"]): r for r in csv.DictReader(f)}


def assert_same_search(a_dir, b_dir, rel=1e-4):
    """Per member and epoch: training losses within ``rel``, the same validation accuracy and policy; the
    same PBT logs and schedule."""
    a, b = rows(a_dir), rows(b_dir)
    assert sorted(a) == sorted(b)
    for key, ra in a.items():
        rb = b[key]
        assert (ra["val_acc"], ra["policy"]) == (rb["val_acc"], rb["policy"]), key
        for col in ("train_loss", "train_kd_loss"):
            if ra[col] or rb[col]:
                assert float(rb[col]) == pytest.approx(float(ra[col]), rel=rel), (key, col)
    for name in ["pbt_global.txt"] + [f"pbt_policy_{i}.txt" for i in range(4)]:
        assert (a_dir / name).read_text() == (b_dir / name).read_text(), name
    assert Schedule.load(a_dir / "schedule.json").policies == Schedule.load(b_dir / "schedule.json").policies


def executor(cfg, n, session=None, cls=FusedExecutor, **kw):
    ex = cls(MemberFactory(session or Session()), **kw)
    cfg = search_config(cfg)
    ex.start({i: member_config(cfg, i) for i in range(n)})
    return ex


def model_state(ex, i):
    return {k: v.clone() for k, v in ex.members[i].trainer.model.state_dict().items()}


def assert_states_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------ fused = local
@pytest.fixture(scope="module")
def local_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "run"
    return out, search_from_config(config(out), verbose=False)


@pytest.fixture(scope="module")
def fused_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("fused") / "run"
    return out, search_from_config(config(out, "search.executor=fused"), verbose=False)


def test_fused_search_equals_the_local_search(local_reference, fused_reference):
    (ref, s), (out, f) = local_reference, fused_reference
    assert f["executor"] == "fused" and s["executor"] == "local"
    assert s["exploits"] == 1  # two rounds with an exploit between them
    assert_same_search(ref, out)
    assert f["best_member"] == s["best_member"] and f["final_val_acc"] == s["final_val_acc"]


def test_grouped_kernel_search_equals_the_local_search(local_reference, tmp_path):
    """search.fused_kernel=grouped: members side by side along the channels of grouped convolutions."""
    (ref, s), out = local_reference, tmp_path / "run"
    g = search_from_config(config(out, "search.executor=fused", "search.fused_kernel=grouped"), verbose=False)
    assert g["executor"] == "fused"
    assert_same_search(ref, out)
    assert g["best_member"] == s["best_member"] and g["final_val_acc"] == s["final_val_acc"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "run"
    train_from_config(load_config(None, ["model.name=resnet_tiny", "data.name=cifar10-sample", "data.split=reduced",
                                         "data.train_size=256", "data.val_size=64", "train.batch_size=64",
                                         "train.epochs=2", "train.progress=false", "train.device=cpu", f"out={out}"]))
    return out


# soft: one backward; iikd: features through the vmapped forward, SVDs per member, KD gradient clipped per
# member and per parameter (two backward passes), at a lower lr (its SVDs amplify rounding differences)
# grouped: the grouped-convolution kernel (full-precision students: with 4-bit students float rounding moves
# activations across DoReFa levels in the vmap kernel as well, measured 2-15% loss differences from local by
# the second round; tests/test_grouped.py checks 4-bit grouped layers in float64)
@pytest.mark.parametrize("method,lr,kernel", [("soft", 0.003, "vmap"), ("iikd", 0.001, "vmap"),
                                              ("iikd", 0.001, "grouped")])
def test_fused_student_search_equals_the_local_one(teacher, tmp_path, method, lr, kernel):
    extra = ["data.train_size=64", "data.val_size=128", "train.batch_size=32", "train.eval_batch_size=128",
             "search.role=student", f"kd.teacher={teacher}", f"kd.method={method}", "kd.prepare_epochs=1",
             f"train.lr={lr}", f"search.fused_kernel={kernel}"]
    runs = {ex: search_from_config(config(tmp_path / ex, f"search.executor={ex}", *extra), verbose=False)
            for ex in ("local", "fused")}
    assert runs["local"]["exploits"] == 1
    assert_same_search(tmp_path / "local", tmp_path / "fused")
    assert all(r["train_kd_loss"] for r in rows(tmp_path / "fused").values())


@pytest.mark.slow
def test_fused_students_train_their_own_channel_adapters(tmp_path):
    """KD-SVD from a WRN-10-2 to WRN-10-1 students: each member's 1x1 adapter (the distiller's own
    parameters, outside the stacked model) gets its member's unclipped KD gradient, as in the local run."""
    teacher = tmp_path / "teacher"
    train_from_config(load_config(None, ["model.name=wrn_10_2", "data.name=cifar10-sample", "data.split=reduced",
                                         "data.train_size=128", "data.val_size=64", "train.batch_size=64",
                                         "train.epochs=1", "train.progress=false", "train.device=cpu",
                                         f"out={teacher}"]))
    extra = ["model.name=wrn_10_1", "data.train_size=64", "data.val_size=128", "train.batch_size=32",
             "train.eval_batch_size=128", "search.role=student", f"kd.teacher={teacher}", "kd.teacher_model=wrn_10_2",
             "kd.method=kdsvd"]
    for ex in ("local", "fused"):
        search_from_config(config(tmp_path / ex, f"search.executor={ex}", *extra), verbose=False)
    assert_same_search(tmp_path / "local", tmp_path / "fused")


def test_a_resumed_fused_search_equals_an_uninterrupted_one(fused_reference, tmp_path):
    class Stop(Exception):
        pass

    def stop(info):
        raise Stop

    whole, s = fused_reference
    with pytest.raises(Stop):
        search_from_config(config(tmp_path / "r", "search.executor=fused"), on_round=stop, verbose=False)
    again = search_from_config(config(tmp_path / "r", "search.executor=fused"), verbose=False)
    assert (tmp_path / "r" / "rewards.csv").read_text() == (whole / "rewards.csv").read_text()
    assert again["final_val_acc"] == s["final_val_acc"]


# ------------------------------------------------------------------------------------ no coupling
def test_quantizers_under_vmap_take_each_members_own_maximum():
    torch.manual_seed(0)
    scales = torch.tensor([0.05, 1.0, 3.0])  # very different maxima per member
    w = (torch.randn(3, 6, 4, 3, 3) * scales.view(3, 1, 1, 1, 1)).requires_grad_()
    x = (torch.rand(3, 5, 4) * 1.4 - 0.2).requires_grad_()
    for bits in (2, 4):
        fused_w = vmap(lambda t: quantize_weight(t, bits))(w)
        fused_a = vmap(lambda t: quantize_activation(t, bits))(x)
        gw, gx = torch.autograd.grad((fused_w * fused_w).sum() + (fused_a * fused_a).sum(), (w, x))
        for j in range(3):
            wj, xj = w[j].detach().requires_grad_(), x[j].detach().requires_grad_()
            qw, qa = quantize_weight(wj, bits), quantize_activation(xj, bits)
            assert torch.equal(fused_w[j], qw) and torch.equal(fused_a[j], qa)
            lw, lx = torch.autograd.grad((qw * qw).sum() + (qa * qa).sum(), (wj, xj))
            torch.testing.assert_close(gw[j], lw, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(gx[j], lx, rtol=0, atol=0)


@pytest.mark.parametrize("change", ["policy", "weights"])
def test_changing_member_3s_policy_or_weights_leaves_member_5_bit_identical(change):
    """Six 4-bit members (DoReFa weights and activations, BatchNorm) trained one epoch twice from the same
    seeds; only member 3 differs: its policy, or its weights (doubled: then it holds every layer's largest
    weight, so a quantizer maximum shared across members would move every other member's levels). Member
    5's weights, BatchNorm statistics, optimizer state and losses are bit-identical; member 3's are not."""
    cfg = config("/tmp/unused", "search.population=6", "quant.w_bits=4", "quant.a_bits=4")
    session = Session()
    states, outs, opts = [], [], []
    for changed in (False, True):
        ex = executor(cfg, 6, session)
        policies = {i: list(ZERO_POLICY) for i in range(6)}
        if changed and change == "policy":
            policies[3] = STRONG
        if changed and change == "weights":
            with torch.no_grad():
                for p in ex.members[3].trainer.model.parameters():
                    p.mul_(2.0)
        out = ex.train(policies, 1)
        assert all(o.ok for o in out.values())
        states.append({i: model_state(ex, i) for i in (3, 5)})
        outs.append(out)
        opts.append(ex.members[5].trainer.optimizer.state_dict()["state"])
        ex.close()
    assert_states_equal(states[0][5], states[1][5])
    for k, buf in opts[0].items():
        assert torch.equal(buf["momentum_buffer"], opts[1][k]["momentum_buffer"]), k
    assert {k: v for k, v in outs[0][5].rows[0].items() if "time" not in k and "_s" not in k} == \
           {k: v for k, v in outs[1][5].rows[0].items() if "time" not in k and "_s" not in k}
    assert not torch.equal(states[0][3]["layer1.0.conv1.weight"], states[1][3]["layer1.0.conv1.weight"])
    assert outs[0][3].rows[0]["train_loss"] != outs[1][3].rows[0]["train_loss"]


def test_an_exploit_is_an_exact_slice_copy():
    ex = executor(config("/tmp/unused"), 4)
    ex.train({i: list(ZERO_POLICY) for i in range(4)}, 1)  # optimizer state (momentum) exists
    stack = ex.stack
    before = {k: v.clone() for k, v in {**stack.params, **stack.buffers}.items()}
    assert not torch.equal(before["net.conv1.weight"][3], before["net.conv1.weight"][1])
    gen3 = ex.members[3].trainer.train_loader.generator.get_state()
    ex.exploit([(1, 3)])
    for name, t in {**stack.params, **stack.buffers}.items():
        assert torch.equal(t[3], t[1]), name  # the target's row is the source's
        for r in (0, 1, 2):
            assert torch.equal(t[r], before[name][r]), (name, r)  # no other row moved
    # the member's own tensors are still views of its row: what its optimizer steps is what the stack holds
    for name, p in ex.members[3].trainer.model.named_parameters():
        assert p.data_ptr() == stack.params["net." + name][3].data_ptr(), name
    src, dst = (ex.members[i].trainer.optimizer.state_dict()["state"] for i in (1, 3))
    assert src.keys() == dst.keys() and src
    for k in src:
        assert torch.equal(src[k]["momentum_buffer"], dst[k]["momentum_buffer"])
        assert src[k]["momentum_buffer"].data_ptr() != dst[k]["momentum_buffer"].data_ptr()
    assert ex.members[3].trainer.epoch == ex.members[1].trainer.epoch
    assert torch.equal(ex.members[3].trainer.train_loader.generator.get_state(), gen3)  # its own data order
    # training on: the target trains its row, from the copied state, on its own data
    ex.train({1: list(ZERO_POLICY), 3: list(ZERO_POLICY)}, 1)
    assert not torch.equal(stack.params["net.conv1.weight"][3], stack.params["net.conv1.weight"][1])
    assert torch.equal(stack.params["net.conv1.weight"][0], before["net.conv1.weight"][0])
    ex.close()


# ------------------------------------------------------------------------------------ failures
def poison(ex, i):
    """Make member ``i`` diverge: NaN in its classifier (its row of the stack)."""
    with torch.no_grad():
        ex.members[i].trainer.model.fc.weight.fill_(float("nan"))


def test_a_diverging_member_fails_alone():
    cfg = config("/tmp/unused")
    session = Session()
    runs = []
    for bad in (None, 2):
        ex = executor(cfg, 4, session)
        if bad is not None:
            poison(ex, bad)
        out = ex.train({i: list(ZERO_POLICY) for i in range(4)}, 2)
        runs.append((out, {i: model_state(ex, i) for i in range(4)}))
        ex.close()
    (clean, clean_state), (bad, bad_state) = runs
    assert all(o.ok for o in clean.values())
    assert not bad[2].ok and bad[2].error == "NonFiniteLoss: member2: training diverged in epoch 1/4 " \
                                            "(non-finite training loss)"
    for i in (0, 1, 3):  # the others: the same rows and weights, bit for bit
        assert bad[i].ok
        strip = [{k: v for k, v in r.items() if "time" not in k and "_s" not in k} for r in bad[i].rows]
        assert strip == [{k: v for k, v in r.items() if "time" not in k and "_s" not in k} for r in clean[i].rows]
        assert_states_equal(bad_state[i], clean_state[i])


def test_a_search_restores_and_retries_a_diverging_member_of_the_fused_group(fused_reference, tmp_path):
    clean_dir, clean = fused_reference
    session = Session()

    class Poisoning(FusedExecutor):
        calls = 0

        def train(self, policies, epochs):
            Poisoning.calls += 1
            if Poisoning.calls == 1:
                poison(self, 2)
            return super().train(policies, epochs)

    cfg = config(tmp_path / "p", "search.executor=fused")
    ex = Poisoning(MemberFactory(session))
    try:
        r = search_from_config(cfg, executor=ex, verbose=False, session=session)
    finally:
        ex.close()
    events = [json.loads(l) for l in (tmp_path / "p" / "events.jsonl").read_text().splitlines()]
    assert [(e["event"], e.get("member")) for e in events] == [("member_error", 2), ("member_retry_ok", 2)]
    assert "NonFiniteLoss" in events[0]["error"]
    # the others trained untouched; the retried member (alone, from its saved state) as in the clean run
    assert_same_search(clean_dir, tmp_path / "p")
    a, b = rows(clean_dir), rows(tmp_path / "p")
    assert all(a[k] == b[k] for k in a if k[1] != "2" and k[0] in ("1", "2"))
    assert r["final_val_acc"] == clean["final_val_acc"]


# ------------------------------------------------------------------------------------ choosing the executor
def test_auto_is_local_on_cpu_and_fused_on_cuda(monkeypatch):
    from rolekd.search import run as run_mod

    assert executor_kind(config("/tmp/unused", "search.executor=auto")) == "local"
    assert type(make_executor(config("/tmp/unused", "search.executor=auto"), None)).__name__ == "LocalExecutor"
    monkeypatch.setattr(run_mod, "resolve_device", lambda name: torch.device("cuda"))
    assert executor_kind(config("/tmp/unused", "search.executor=auto")) == "fused"
    ex = make_executor(config("/tmp/unused", "search.executor=auto"), None)
    assert isinstance(ex, FusedExecutor) and ex.fallback
    assert not make_executor(config("/tmp/unused", "search.executor=fused"), None).fallback


def test_dml_is_refused_by_fused_before_the_run_dir_and_falls_back_under_auto(teacher, tmp_path, capsys):
    dml = ["search.role=student", f"kd.teacher={teacher}", "kd.method=dml", "data.train_size=32",
           "data.val_size=32", "train.batch_size=32", "search.population=2", "search.epochs=1"]
    with pytest.raises(UserError, match="trains a teacher per member.*search.executor=local"):
        search_from_config(config(tmp_path / "d", "search.executor=fused", *dml), verbose=False)
    assert not (tmp_path / "d").exists()
    with pytest.raises(UserError, match="search.ray_group_size=1"):
        search_from_config(config(tmp_path / "d", "search.executor=ray", "search.ray_group_size=2", *dml),
                           verbose=False)
    ex = executor(config(tmp_path / "d", *dml), 2, fallback=True)  # what auto builds on a GPU
    assert ex.name == "local" and ex.stack is None
    assert "local executor" in capsys.readouterr().out
    assert all(o.ok for o in ex.train({0: list(ZERO_POLICY), 1: list(ZERO_POLICY)}, 1).values())
    ex.close()


# ------------------------------------------------------------------------------------ Ray
def test_ray_with_two_fused_groups_gives_the_local_search(local_reference, tmp_path, local_ray):
    from rolekd.search import RayExecutor

    ref, s = local_reference
    cfg = config(tmp_path / "ray", "search.executor=ray", "search.ray_group_size=2", "search.ray_num_cpus=0.5")
    ex = RayExecutor.from_config(search_config(cfg), MemberFactory())
    try:
        r = search_from_config(cfg, executor=ex, verbose=False)
        assert ex.groups == [[0, 1], [2, 3]] and len(ex.actors) == 2
    finally:
        ex.close()
    assert r["executor"] == "ray"
    assert_same_search(ref, tmp_path / "ray")
    assert r["final_val_acc"] == s["final_val_acc"] and r["best_test_acc"] == s["best_test_acc"]
