"""The flags that reproduce the authors' code (docs/RECIPE.md, "Differences from the authors' code"), each from
a config's ``key=value`` to the object it sets, against an expectation written out independently: the LR and
λ at every epoch (milestones at ``int(fraction * epochs)``, as ``kd_model.py``'s scheduler), Adam's epsilon and
the weight-decay groups in the value after one step, the optimizer's weight decay equal to an L2 term
``wd / 2 * ||w||^2`` in the loss (the authors' ``tf.nn.l2_loss(w) * wd``), the BatchNorm momentum / epsilon of
the trained model and of a teacher, and a search member's Cutout."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import register_noise_dataset
from rolekd.config import derive, load_config
from rolekd.errors import UserError
from rolekd.experiment import MemberFactory, Session, build_trainer, search_from_config, train_from_config
from rolekd.pipeline.run import stage_configs
from rolekd.search import LocalExecutor
from rolekd.train import build_optimizer, lr_at

DATA = register_noise_dataset("recipeflags-noise", 64, 32, seed=5)  # unique to this module
BASE = [f"data.name={DATA}", "model.name=resnet_tiny", "train.batch_size=32", "train.eval_batch_size=64",
        "train.progress=false", "train.device=cpu", "train.threads=2"]
AUTHORS_MILESTONES = "[0.3,0.6,0.8]"


def cfg_of(*overrides, base=BASE):
    return load_config(None, list(base) + list(overrides))


def _bn(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


# ------------------------------------------------------------------------------------------------ LR milestones
def test_lr_milestones_step_the_lr_where_the_authors_scheduler_does():
    cfg = cfg_of("train.lr=0.1", "train.lr_gamma=0.1", f"train.lr_milestones={AUTHORS_MILESTONES}").train
    # 10 epochs: int(3.0000000000000004) = 3, int(6.000000000000001) = 6, int(8.0) = 8
    want = [0.1] * 3 + [0.01] * 3 + [0.001] * 2 + [0.0001] * 2
    assert [lr_at(cfg, e, 10) for e in range(10)] == pytest.approx(want, rel=1e-12)
    # 200 epochs (the paper's runs): ×0.1 from epochs 60, 120, 160
    got = [lr_at(cfg, e, 200) for e in range(200)]
    changes = [e for e in range(1, 200) if got[e] != got[e - 1]]
    assert changes == [60, 120, 160]
    # without milestones: every lr_step_frac (0.3 -> 3 epochs of 10), as before
    plain = cfg_of("train.lr=0.1", "train.lr_gamma=0.1").train
    assert [lr_at(plain, e, 10) for e in range(10)] == pytest.approx([0.1] * 3 + [0.01] * 3 + [0.001] * 3 + [0.0001])


@pytest.mark.parametrize("key", ["train.lr_milestones", "kd.lam_milestones"])
def test_milestones_outside_the_run_are_refused_before_the_run_dir(key, tmp_path):
    # refused by the config itself (every run, search and pipeline stage is made from a validated config),
    # so nothing is written
    with pytest.raises(UserError, match=key):
        cfg_of(f"{key}=[0.3,1.5]", f"out={tmp_path / 'run'}")
    assert not (tmp_path / "run").exists()
    if key == "train.lr_milestones":  # a role's recipe override: refused when the stage configs are made
        cfg = cfg_of("pipeline.teacher.train={lr_milestones: [0.3, 1.5]}")
        with pytest.raises(UserError, match="lr_milestones"):
            stage_configs(cfg, tmp_path / "pipe")


# ------------------------------------------------------------------------------------------------ λ milestones
def test_lambda_milestones_from_the_config_decay_lambda_as_the_authors_code(tmp_path):
    with Session() as s:
        teacher = train_from_config(cfg_of("train.epochs=1", f"out={tmp_path / 'teacher'}"), session=s)
        assert teacher["status"] == "finished"
        kd = cfg_of("train.epochs=10", "kd.method=soft", "kd.lam=1.0", f"kd.teacher={tmp_path / 'teacher'}",
                    f"kd.lam_milestones={AUTHORS_MILESTONES}", "kd.lam_gamma=0.6",
                    f"train.lr_milestones={AUTHORS_MILESTONES}", "train.lr=0.01", f"out={tmp_path / 'student'}")
        train_from_config(kd, session=s)
        default = cfg_of("train.epochs=10", "kd.method=soft", "kd.lam=1.0", f"kd.teacher={tmp_path / 'teacher'}")
        plain = build_trainer(default, s)
        assert [plain.objective.lam_at(e, 10) for e in range(10)] == [1.0] * 10  # ×0.5 every 60 epochs
    rows = [json.loads(line) for line in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    want_lam = [1.0] * 3 + [0.6] * 3 + [0.36] * 2 + [0.216] * 2
    want_lr = [0.01] * 3 + [0.001] * 3 + [0.0001] * 2 + [0.00001] * 2
    assert [r["train_lam"] for r in rows] == pytest.approx(want_lam, rel=1e-6)
    assert [r["lr"] for r in rows] == pytest.approx(want_lr, rel=1e-9)


# ------------------------------------------------------------------------------------------------ optimizer
class Net(nn.Module):
    """Conv with bias, ReLU, BatchNorm, linear with bias: two decayed weights, four undecayed parameters (the
    conv's bias comes before the ReLU so that its gradient is not zero, as it would be before a BatchNorm)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=True)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 5, bias=True)

    def forward(self, x):
        return self.fc(self.bn(F.relu(self.conv(x))).mean((2, 3)))


def _net(seed=0):
    torch.manual_seed(seed)
    return Net()


def _loss(model, x, y):
    return F.cross_entropy(model(x), y)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_weight_decay_on_weights_groups_and_one_step_by_hand(optimizer):
    wd, lr = 0.1, 0.05
    cfg = cfg_of(f"train.optimizer={optimizer}", f"train.lr={lr}", f"train.weight_decay={wd}",
                 "train.weight_decay_on=weights", "train.adam_eps=1e-5").train
    model = _net()
    opt = build_optimizer(model.parameters(), cfg, model)
    # the decayed group: exactly the multi-dimensional tensors (conv kernel, linear weight)
    names = {id(p): n for n, p in model.named_parameters()}
    by_wd = {g["weight_decay"]: sorted(names[id(p)] for p in g["params"]) for g in opt.param_groups}
    assert by_wd == {wd: ["conv.weight", "fc.weight"], 0.0: ["bn.bias", "bn.weight", "conv.bias", "fc.bias"]}
    if optimizer == "adam":
        assert all(g["eps"] == 1e-5 for g in opt.param_groups)
    # one step with known gradients vs the update written out
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: torch.full_like(p, 1e-5) * (1 + torch.arange(p.numel()).view_as(p) % 3) for n, p in
             model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = grads[n].clone()
    opt.step()
    for n, p in model.named_parameters():
        g = grads[n] + (wd * before[n] if n in ("conv.weight", "fc.weight") else 0)
        if optimizer == "sgd":  # Nesterov momentum 0.9, first step: buf = g, update g + 0.9 * buf
            want = before[n] - lr * (g + 0.9 * g)
        else:  # Adam's first step: m̂ = g, v̂ = g², update g / (|g| + eps)
            want = before[n] - lr * g / (g.abs() + 1e-5)
        torch.testing.assert_close(p.detach(), want, rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize("flags", [["train.optimizer=sgd", "train.weight_decay=0.01"],
                                   ["train.optimizer=sgd", "train.nesterov=false", "train.weight_decay_on=weights"],
                                   ["train.optimizer=adam", "train.weight_decay=0.01", "train.adam_eps=1e-5"]])
def test_optimizer_steps_bit_identical_to_torchs_per_parameter_loop(flags):
    """build_optimizer runs the update as foreach operators (a few per step instead of three per parameter); each
    parameter must end exactly where torch's per-parameter loop (foreach=False) puts it, step after step."""
    cfg = cfg_of(*flags, "train.lr=0.05").train
    a, b = _net(), _net()
    b.load_state_dict(a.state_dict())
    opt_a = build_optimizer(a.parameters(), cfg, a)
    opt_b = build_optimizer(b.parameters(), cfg, b)
    assert all(g["foreach"] for g in opt_a.param_groups)
    for g in opt_b.param_groups:
        g["foreach"] = False  # the reference: torch's loop over the parameters
    x = torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(3))
    y = torch.arange(8) % 5
    for _ in range(5):
        for m, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            _loss(m, x, y).backward()
            opt.step()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), n


def test_adam_eps_is_the_configs():
    model = _net()
    for eps in (1e-8, 1e-5):
        opt = build_optimizer(model.parameters(), cfg_of("train.optimizer=adam", f"train.adam_eps={eps}").train, model)
        assert isinstance(opt, torch.optim.Adam) and opt.defaults["eps"] == eps
    assert cfg_of().train.adam_eps == 1e-8  # PyTorch's default unless asked


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_optimizer_weight_decay_on_weights_equals_the_authors_l2_term_in_the_loss(optimizer):
    """The authors add ``wd * sum(tf.nn.l2_loss(w))`` = ``wd / 2 * sum ||w||^2`` over the conv / FC kernels to
    the loss (op_util.Optimizer_w_MHGD); ``weight_decay_on=weights`` must train exactly the same, for SGD and
    for Adam (PyTorch's Adam weight decay is this L2 gradient, not AdamW's decoupled decay)."""
    wd = 0.05
    lr = 0.1 if optimizer == "sgd" else 0.01
    flags = [f"train.optimizer={optimizer}", f"train.lr={lr}", "train.adam_eps=1e-5"]
    x = torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    y = torch.arange(8) % 5
    a, b = _net(), _net()
    opt_a = build_optimizer(a.parameters(), cfg_of(*flags, f"train.weight_decay={wd}",
                                                   "train.weight_decay_on=weights").train, a)
    opt_b = build_optimizer(b.parameters(), cfg_of(*flags, "train.weight_decay=0").train, b)
    for _ in range(4):
        opt_a.zero_grad()
        _loss(a, x, y).backward()
        opt_a.step()
        opt_b.zero_grad()
        l2 = sum((w ** 2).sum() / 2 for w in (b.conv.weight, b.fc.weight))
        (_loss(b, x, y) + wd * l2).backward()
        opt_b.step()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=n)
    # and it is not the same as decaying every parameter
    c = _net()
    opt_c = build_optimizer(c.parameters(), cfg_of(*flags, f"train.weight_decay={wd}").train, c)
    for _ in range(4):
        opt_c.zero_grad()
        _loss(c, x, y).backward()
        opt_c.step()
    assert not torch.allclose(c.bn.weight, b.bn.weight)


def test_weight_decay_on_weights_reaches_the_trainer_and_dmls_teacher_copy(tmp_path):
    with Session() as s:
        train_from_config(cfg_of("train.epochs=1", f"out={tmp_path / 'teacher'}"), session=s)
        flags = ["train.epochs=1", "kd.method=dml", f"kd.teacher={tmp_path / 'teacher'}", "train.optimizer=adam",
                 "train.weight_decay=1e-4", "train.weight_decay_on=weights"]
        tr = build_trainer(cfg_of(*flags), s)
        decayed = {id(p) for p in tr.model.parameters() if p.dim() > 1}  # conv kernels and linear weights
        groups = {g["weight_decay"]: {id(p) for p in g["params"]} for g in tr.optimizer.param_groups}
        assert groups[1e-4] == decayed
        assert groups[0.0] == {id(p) for p in tr.model.parameters() if p.dim() <= 1}
        tr.run_epochs(1)  # DML makes the teacher's optimizer at its first step
        teacher = list(tr.objective.teacher.parameters())
        t_groups = tr.objective.state_dict()["teacher_optimizer"]["param_groups"]
        assert {g["weight_decay"]: len(g["params"]) for g in t_groups} == {
            1e-4: sum(p.dim() > 1 for p in teacher), 0.0: sum(p.dim() <= 1 for p in teacher)}
        tr.objective.close()
        # default: one group, every parameter decayed
        tr = build_trainer(cfg_of("train.epochs=1", "train.weight_decay=1e-4"), s)
        assert len(tr.optimizer.param_groups) == 1 and tr.optimizer.param_groups[0]["weight_decay"] == 1e-4
        assert len(tr.optimizer.param_groups[0]["params"]) == len(list(tr.model.parameters()))


# ------------------------------------------------------------------------------------------------ BatchNorm
def test_batchnorm_momentum_and_eps_of_the_trained_model_and_the_teacher(tmp_path):
    with Session() as s:
        tr = build_trainer(cfg_of("train.epochs=1", "train.bn_momentum=0.01", "train.bn_eps=0.001",
                                  "quant.w_bits=4", "quant.a_bits=4"), s)
        bns = _bn(tr.model)
        assert len(bns) >= 3 and all(m.momentum == 0.01 and m.eps == 1e-3 for m in bns)
        # TF decay 0.99: moving = 0.99 * moving + 0.01 * batch statistic (from 0: 0.01 * the batch mean)
        first = bns[0]
        seen = {}
        hook = first.register_forward_pre_hook(lambda m, inp: seen.setdefault("x", inp[0].detach().clone()))
        x, _ = next(iter(tr.train_loader))
        tr.model.train()
        with torch.no_grad():
            tr.model(x)
        hook.remove()
        torch.testing.assert_close(first.running_mean, 0.01 * seen["x"].mean((0, 2, 3)), rtol=1e-5, atol=1e-7)
        # unset: PyTorch's defaults (momentum 0.1, eps 1e-5)
        plain = build_trainer(cfg_of("train.epochs=1"), s)
        assert all(m.momentum == 0.1 and m.eps == 1e-5 for m in _bn(plain.model))
        # a teacher keeps the epsilon it was trained with (its run's config), whatever the student's
        train_from_config(cfg_of("train.epochs=1", "train.bn_eps=0.001", f"out={tmp_path / 'teacher'}"), session=s)
        kd = build_trainer(cfg_of("train.epochs=1", "kd.method=soft", f"kd.teacher={tmp_path / 'teacher'}"), s)
        assert all(m.eps == 1e-3 for m in _bn(kd.objective.teacher))
        assert all(m.eps == 1e-5 for m in _bn(kd.model))
        kd.objective.close()


# ------------------------------------------------------------------------------------------------ folded teacher
def test_fold_teacher_bn_from_the_config_decides_which_network_the_teacher_forward_runs(tmp_path):
    """``kd.fold_teacher_bn`` (default true) from ``key=value`` to the KD objective of a trainer built from the
    config: true runs a BatchNorm-folded copy (the teacher's own modules never run, its logits equal within
    rounding); false runs the teacher as trained, its logits bit for bit those of the teacher's own eval
    forward."""
    with Session() as s:
        train_from_config(cfg_of("train.epochs=1", f"out={tmp_path / 'teacher'}"), session=s)
        flags = ["train.epochs=1", "kd.method=soft", f"kd.teacher={tmp_path / 'teacher'}"]
        x, _ = next(iter(build_trainer(cfg_of(*flags), s).train_loader))
        logits = {}
        for fold in ("default", "true", "false"):
            tr = build_trainer(cfg_of(*flags, *([] if fold == "default" else [f"kd.fold_teacher_bn={fold}"])), s)
            teacher = tr.objective.teacher.eval()
            ran = []
            hook = teacher.bn1.register_forward_hook(lambda *_: ran.append(1))
            with torch.no_grad():
                logits[fold] = tr.objective.forward_teacher(x).logits
                own = teacher(x)
            hook.remove()
            assert len(ran) == (2 if fold == "false" else 1), fold  # the objective's forward + our own one
            tr.objective.close()
            if fold == "false":
                assert torch.equal(logits[fold], own)
            else:
                torch.testing.assert_close(logits[fold], own, rtol=1e-4, atol=1e-5 * float(own.abs().max()))
        assert torch.equal(logits["default"], logits["true"])


# ------------------------------------------------------------------------------------------------ search cutout
def test_search_cutout_applies_to_search_members_only(tmp_path):
    cfg = cfg_of("data.train_size=32", "data.val_size=32", "train.epochs=1", "search.epochs=1", "search.population=2",
                 "search.perturb_interval=1", "augment.cutout=16", "search.cutout=0",
                 "pipeline.teacher.model=resnet_tiny", "pipeline.student.model=resnet_tiny", "pipeline.student.method=soft",
                 "pipeline.baselines=[]",
                 base=BASE + ["name=rf", f"out={tmp_path / 'pipe'}"])
    stages = stage_configs(cfg, tmp_path / "pipe")
    seen = []
    with Session() as s:
        executor = LocalExecutor(MemberFactory(s))

        def on_round(info):
            seen.extend(m.trainer.train_loader.augment.cutout for m in executor.members.values())

        search_from_config(stages["alpha_search"], executor=executor, on_round=on_round, verbose=False, session=s)
        assert seen and set(seen) == {0}  # the authors' searches: no_cutout
        retrain = build_trainer(stages["teacher"], s)  # stage α's retraining with A_T keeps Cutout
        assert retrain.train_loader.augment.cutout == 16
        # unset: the members use augment.cutout
        unset = derive(stages["alpha_search"], "test", search={"cutout": None})
        member = MemberFactory(s)(unset, 0, lambda epoch: None)
        assert member.train_loader.augment.cutout == 16
    assert math.isfinite(json.loads((tmp_path / "pipe" / "alpha_search" / "search.json").read_text())["best_val_acc"])
