"""The fused executor: the members of a search trained as one stacked model on one device.

Each member is a :class:`~rolekd.search.members.Member` built exactly as the local executor builds it
(its own trainer: loader with its own generator and policy augmentation, random streams, optimizer,
objective and its state), so everything but training -- exploit, snapshot, restore, saved states,
evaluation of one member -- is the local executor's code. What differs is where the weights live and
how a round trains:

* **Stacked weights.** At :meth:`FusedExecutor.start` every parameter and buffer of the members'
  networks is stacked along a new first dimension (one tensor per name, row ``r`` = the ``r``-th member
  by index), and each member's own ``nn.Parameter`` / buffer becomes a *view* of its row. A member's
  optimizer, ``state_dict`` and ``load_state_dict`` therefore read and write its row in place: an
  exploit is a slice copy, and a member trained by itself (:meth:`Member.train`) trains its row.
* **Lockstep training.** The members of one :meth:`~FusedExecutor.train` call whose rows are
  contiguous and who are at the same epoch train their epochs together. Per step each member draws its
  batch from its own loader inside its own random streams (the data order and per-sample augmentation
  it draws in the local executor), the batches are stacked, and one forward runs every member's
  network on its own batch -- a ``torch.func.vmap`` of ``functional_call`` (``search.fused_kernel=vmap``)
  or grouped convolutions with the members side by side along the channels (``grouped``,
  :mod:`rolekd.search.grouped`) (BatchNorm in training mode
  with the stacked running statistics; DoReFa quantizers take each member's own maximum). The loss is
  then computed *per member*, by that member's own objective pieces on its slice of the outputs: plain
  cross-entropy, or the KD objective's task loss, λ and KD loss with the member's own distiller (its
  feature taps come out of the vmapped forward). One backward through the stacked graph gives every
  member's gradient as its row (the members' losses are summed; no row depends on another member);
  with KD gradient clipping the task and the KD gradients are taken separately and clipped per member
  and per parameter, as :class:`~rolekd.distill.objective.KDObjective` does. Each row's gradient is
  handed to the member's parameters as views and the member's own optimizer steps (the local math).
  The frozen teacher of a student-role search runs once over all members' concatenated batches (eval
  mode: per-sample outputs are the per-member ones).
* **Per-member failure.** After each epoch a member whose training loss or weights are not finite (or
  whose KD loss failed in linear algebra) stops with its own failed :class:`Outcome`, exactly the
  message the local executor gives; the others continue. A failure of the fused step itself fails every
  member of that lockstep group (the controller restores and retries them).
* **Evaluation** (by the trainer's rule: every ``train.eval_every`` epochs and after the last epoch of
  the call): every member on the same validation batch in one pass (the images are shared).

Timings: a member's ``train_time_s`` (and ``eval_s``) is its share of the fused epoch's wall time (the
wall time divided by the members of the group), so that the search's summed training time is wall time.

Not fused: a KD method that trains the teacher (DML: one teacher per member) and objectives other than
cross-entropy and :class:`~rolekd.distill.objective.KDObjective`; ``search.executor=fused`` refuses them
(:func:`fused_unsupported`), ``search.executor=auto`` falls back to the local executor for them. Random
operations inside the network's forward (dropout) draw from the process's stream under vmap
(``randomness="different"``), not from the member's. ``train.compile`` compiles the fused forward
(``torch.compile`` of the kernel's forward) instead of each member's network.
"""

from __future__ import annotations

import copy
import time
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from ..augment.space import validate_policy
from ..config import Config
from ..distill.base import as_float, distiller_class
from ..distill.objective import KDObjective, clip_factor, clip_sum
from ..errors import UserError
from ..models.taps import Outputs, TappedNet
from ..train import CrossEntropy, EpochSums, Trainer
from .grouped import GroupedNet, check_grouped
from .members import LocalExecutor, Member, MemberFactory, Outcome, error_outcome

def fused_unsupported(cfg: Config) -> str | None:
    """Why members of ``cfg`` (a search config) cannot be fused (None when they can)."""
    if cfg.search.role == "student" and cfg.kd.method and distiller_class(cfg.kd.method).trains_teacher:
        return (f"KD method {cfg.kd.method!r} trains a teacher per member, which the fused executor does not "
                f"stack")
    return None


def _objective_unsupported(trainer: Trainer) -> str | None:
    obj = trainer.objective
    if type(obj) not in (CrossEntropy, KDObjective):
        return f"objective {type(obj).__name__} (fused: cross-entropy and the frozen-teacher KD objective)"
    return None


class StackedWeights:
    """The parameters and buffers of same-shaped networks stacked along a new first dimension; every
    network's own parameters and buffers become views of their row (see the module docstring). Keys are
    the networks' names with ``prefix``."""

    def __init__(self, models: Sequence[nn.Module], prefix: str = ""):
        first = models[0]
        shapes = [(n, t.shape, t.dtype) for n, t in first.state_dict(keep_vars=True).items()]
        for m in models[1:]:
            if [(n, t.shape, t.dtype) for n, t in m.state_dict(keep_vars=True).items()] != shapes:
                raise UserError("search.executor=fused needs members of one architecture; use search.executor=local")
        self.n = len(models)
        self.params: dict[str, torch.Tensor] = {}
        self.buffers: dict[str, torch.Tensor] = {}
        names = [n for n, _ in first.named_parameters()]
        for name in names:
            ps = [m.get_parameter(name) for m in models]
            stacked = torch.stack([p.detach() for p in ps])
            for r, p in enumerate(ps):
                p.data = stacked[r]
            self.params[prefix + name] = stacked
        for name, _ in first.named_buffers():
            path, _, leaf = name.rpartition(".")
            owners = [m.get_submodule(path) for m in models]
            stacked = torch.stack([o._buffers[leaf].detach() for o in owners])
            for r, o in enumerate(owners):
                o._buffers[leaf] = stacked[r]
            self.buffers[prefix + name] = stacked
        self.grad_names = [prefix + n for n in names if first.get_parameter(n).requires_grad]
        self._trained = set(self.grad_names)
        # each row's trained parameters, in grad_names order (where a row's gradient is handed out)
        self.row_params = [[m.get_parameter(n[len(prefix):]) for n in self.grad_names] for m in models]

    def rows(self, a: int, n: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[torch.Tensor]]:
        """(parameters, buffers, trained leaves) of rows ``a .. a + n - 1`` as views: the trained
        parameters as fresh leaves that require gradients (in ``grad_names`` order)."""
        params = {}
        for name, t in self.params.items():
            v = t[a:a + n]
            if name in self._trained:
                v = v.detach().requires_grad_(True)
            params[name] = v
        leaves = [params[name] for name in self.grad_names]
        return params, {name: t[a:a + n] for name, t in self.buffers.items()}, leaves


def _as_float(out: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stacked outputs in at least float32 (one cast per tensor for all members; exact for bf16)."""
    return {k: as_float(v) for k, v in out.items()}


def _outputs(out: Mapping[str, torch.Tensor], j: int) -> Outputs:
    """Member ``j``'s :class:`Outputs` from stacked outputs."""
    emb = out.get("embedding")
    return Outputs(out["logits"][j], {k[len("feature:"):]: v[j] for k, v in out.items() if k.startswith("feature:")},
                   None if emb is None else emb[j])


class FusedExecutor(LocalExecutor):
    """All members on one device as one stacked model (see the module docstring).

    ``fallback=True`` (``search.executor=auto``): members that cannot be fused train as the local
    executor trains them, with a printed note, instead of a :class:`UserError`."""

    name = "fused"

    def __init__(self, factory: MemberFactory, fallback: bool = False, verbose: bool = True):
        super().__init__(factory)
        self.fallback = bool(fallback)
        self.verbose = verbose
        self.stack: StackedWeights | None = None
        self.net: TappedNet | None = None
        self.row: dict[int, int] = {}
        self._shared_teacher = False
        self._train_fwd = self._eval_fwd = None

    # ------------------------------------------------------------------------------ lifecycle
    def start(self, configs: Mapping[int, Config]) -> None:
        super().start(configs)
        order = sorted(self.members)
        trainers = [self.members[i].trainer for i in order]
        why = next((w for w in map(_objective_unsupported, trainers) if w), None)
        loaders = [(t.train_loader.num_samples, t.train_loader.batch_size, len(t.train_loader)) for t in trainers]
        if why is None and len(set(loaders)) > 1:
            why = "members with training sets or batches of different sizes"
        if why is not None:
            if not self.fallback:
                raise UserError(f"search.executor=fused does not support {why}; use search.executor=local")
            if self.verbose:
                print(f"[search] members train one after another (local executor): the fused executor does not "
                      f"support {why}", flush=True)
            self.name = "local"
            return
        obj = trainers[0].objective
        kd = isinstance(obj, KDObjective)
        for t in trainers:  # a member's own KD taps: hooks that a copy of its network must not carry
            if isinstance(t.objective, KDObjective):
                t.objective.release_student_taps()
        # the network's structure only: functional_call replaces its tensors
        template = copy.deepcopy(getattr(trainers[0].model, "_orig_mod", trainers[0].model))
        features, embedding = kd and obj.distiller.needs_features, kd and obj.distiller.needs_embedding
        self.net = TappedNet(template, features, embedding)
        self.stack = StackedWeights([t.model for t in trainers], prefix="net.")
        self.row = {i: r for r, i in enumerate(order)}
        self._shared_teacher = kd and all(t.objective.teacher is obj.teacher for t in trainers)
        self.kernel = next(iter(configs.values())).search.fused_kernel
        compile_ = trainers[0].cfg.compile  # train.compile: the fused forward (and its backward) compiled
        net = self.net
        if self.kernel == "grouped":
            check_grouped(template, next(iter(trainers[0].eval_loaders["val"]))[0][:2])
            self._template, self._compile, self._grouped = template, compile_, {}
            self._grouped_args = (features, embedding, trainers[0].channels_last)
            self._train_fwd = lambda p, b, x: self._grouped_net(x.shape[0])[1](p, b, x)
            self._eval_fwd = lambda p, b, x: self._grouped_net(next(iter(p.values())).shape[0])[2](p, b, x)
        else:
            self._train_fwd = vmap(lambda p, b, x: functional_call(net, (p, b), (x,)), randomness="different")
            self._eval_fwd = vmap(lambda p, b, x: functional_call(net, (p, b), (x,), {"tapped": False})["logits"],
                                  in_dims=(0, 0, None), randomness="different")
            if compile_:
                self._train_fwd, self._eval_fwd = torch.compile(self._train_fwd), torch.compile(self._eval_fwd)

    def _grouped_net(self, n: int) -> tuple[GroupedNet, Callable, Callable]:
        """The grouped-convolution network of ``n`` members (``search.fused_kernel=grouped``), made once per
        ``n``, in the tapped net's mode, with its (compiled, with ``train.compile``) training and evaluation
        forwards."""
        g = self._grouped.get(n)
        if g is None:
            net = GroupedNet(self._template, n, *self._grouped_args)
            run, shared = net.run, net.run_shared
            if self._compile:
                run, shared = torch.compile(run), torch.compile(shared)
            g = self._grouped[n] = (net, run, shared)
        g[0].train(self.net.training)
        return g

    def close(self) -> None:
        if self.net is not None and self.net.taps is not None:
            self.net.taps.remove()
        self.stack = self.net = self._train_fwd = self._eval_fwd = None
        self._grouped = {}
        super().close()

    # ------------------------------------------------------------------------------ training
    def train(self, policies: Mapping[int, Sequence[int]], epochs: int) -> dict[int, Outcome]:
        if self.stack is None:
            return super().train(policies, epochs)
        ids = sorted((int(i) for i in policies), key=lambda i: self.row[i])
        for i in ids:
            self.members[i].policy = validate_policy(policies[i])
        out: dict[int, Outcome] = {}
        for group in self._groups(ids):
            try:
                out.update(self._train_group(group, int(epochs)))
            except (UserError, torch.OutOfMemoryError):
                raise
            except Exception as e:  # the fused step failed: every member of the group fails
                out.update({m.index: error_outcome(e) for m in group})
        return out

    def _groups(self, ids: Sequence[int]) -> list[list[Member]]:
        """Maximal runs of members with consecutive rows at the same epoch (each trains in lockstep)."""
        groups: list[list[Member]] = []
        for i in ids:
            m = self.members[i]
            last = groups[-1][-1] if groups else None
            if last is not None and self.row[i] == self.row[last.index] + 1 and m.trainer.epoch == last.trainer.epoch:
                groups[-1].append(m)
            else:
                groups.append([m])
        return groups

    def _train_group(self, group: list[Member], k: int) -> dict[int, Outcome]:
        """Train the members of ``group`` (consecutive rows, same epoch) ``k`` epochs in lockstep."""
        ts = [m.trainer for m in group]
        a, n = self.row[group[0].index], len(group)
        start = ts[0].epoch
        end = min(ts[0].epochs, start + k)
        rows: list[list[dict]] = [[] for _ in group]
        errors: list[str | None] = [None] * n
        for epoch in range(start, end):
            live = [j for j in range(n) if errors[j] is None]
            if not live:
                break
            lrs = {j: ts[j].begin_epoch() for j in live}
            sums = [EpochSums(t.device) for t in ts]
            t0 = time.perf_counter()
            self._train_epoch(ts, a, epoch, sums, errors)
            share = (time.perf_counter() - t0) / n
            for j in live:
                if errors[j] is not None:
                    continue
                t = ts[j]
                row = sums[j].row(epoch, lrs[j], share)
                t.epoch += 1
                what = t.nonfinite(row)
                if what is not None:
                    errors[j] = error_outcome(t.divergence(epoch, what)).error
                    continue
                rows[j].append(row)
            live = [j for j in range(n) if errors[j] is None]
            if live and ts[live[0]].eval_due(end):
                t1 = time.perf_counter()
                results = self._evaluate_rows(ts, a, n, "val")
                share = (time.perf_counter() - t1) / n
                for j in live:
                    rows[j][-1].update({f"val_{key}": v for key, v in results[j].items()})
                    rows[j][-1]["eval_s"] = share
        return {m.index: Outcome(error=errors[j]) if errors[j] is not None else Outcome.of_rows(rows[j])
                for j, m in enumerate(group)}

    def _train_epoch(self, ts: list[Trainer], a: int, epoch: int, sums: list[EpochSums],
                     errors: list[str | None]) -> None:
        """One epoch of every live member of a group (rows ``a ..``), step by step in lockstep."""
        n = len(ts)
        iters = [iter(t.train_loader) if errors[j] is None else None for j, t in enumerate(ts)]
        for _ in range(len(ts[0].train_loader)):
            live = [j for j in range(n) if errors[j] is None]
            if not live:
                return
            batches = {}
            for j in live:
                with ts[j].rng_scope():  # the member's own streams, as in its own epoch loop
                    batches[j] = next(iters[j])
            x0, y0 = batches[live[0]]
            # a member that stopped keeps its row in the stacked pass, on zeros; nothing of it is used
            x = torch.stack([batches[j][0] if j in batches else torch.zeros_like(x0) for j in range(n)])
            y = torch.stack([batches[j][1] if j in batches else y0 for j in range(n)])
            for j in live:
                ts[j].optimizer.zero_grad(set_to_none=True)
            stepped = self._step(ts, a, epoch, x, y, live, sums, errors)
            for j in stepped:
                ts[j].optimizer.step()

    def _teacher_outputs(self, ts: list[Trainer], x: torch.Tensor, live: list[int]) -> dict[int, Outputs]:
        """The frozen teacher's outputs per live member: one pass over all members' batches when the
        members share their teacher (eval mode: per-sample outputs)."""
        n, b = x.shape[:2]
        with torch.no_grad(), ts[live[0]].autocast():
            if self._shared_teacher:
                obj = ts[live[0]].objective
                if obj.teacher.training:
                    obj.teacher.eval()
                out = obj.forward_teacher(x.flatten(0, 1))
                split = {"logits": out.logits.unflatten(0, (n, b)),
                         **{"feature:" + k: v.unflatten(0, (n, b)) for k, v in out.features.items()}}
                if out.embedding is not None:
                    split["embedding"] = out.embedding.unflatten(0, (n, b))
                split = _as_float(split)
                return {j: _outputs(split, j) for j in live}
            res = {}
            for j in live:  # members with teachers of their own (a custom member factory)
                obj = ts[j].objective
                if obj.teacher.training:
                    obj.teacher.eval()
                res[j] = obj.forward_teacher(x[j])  # step_losses casts to float32
            return res

    def _step(self, ts: list[Trainer], a: int, epoch: int, x: torch.Tensor, y: torch.Tensor, live: list[int],
              sums: list[EpochSums], errors: list[str | None]) -> list[int]:
        """Forward and backward of one stacked batch; hands each live member its gradient. Returns the
        members whose optimizer should step."""
        n = len(ts)
        params, buffers, leaves = self.stack.rows(a, n)
        with ts[live[0]].autocast():
            out = self._train_fwd(params, buffers, x)
        out = _as_float(out)
        obj0 = ts[live[0]].objective
        kd_role = isinstance(obj0, KDObjective)
        teacher = self._teacher_outputs(ts, x, live) if kd_role else {}
        losses: dict[int, tuple] = {}
        for j in live:
            t = ts[j]
            s_out = _outputs(out, j)
            try:
                losses[j] = self._member_loss(t, s_out, teacher.get(j), y[j], epoch)
            except torch.linalg.LinAlgError as e:
                errors[j] = error_outcome(t.numerical_failure(epoch, e)).error
        ok = sorted(losses)
        if not ok:
            return []
        names = self.stack.grad_names
        extras = [list(ts[j].objective.extra_parameters()) for j in ok]
        flat_extras = [p for e in extras for p in e]
        clip = kd_role and obj0.clips(losses[ok[0]][1])
        if not clip:
            total = sum(task if kd is None else task + kd * lam for task, kd, lam, _ in losses.values())
            grads = torch.autograd.grad(total, leaves + flat_extras, allow_unused=True)
            g_rows, g_extra = grads[:len(names)], grads[len(names):]
        else:
            g_task = torch.autograd.grad(sum(losses[j][0] for j in ok), leaves, retain_graph=True, allow_unused=True)
            g_kd = torch.autograd.grad(sum(obj0.kd_grad_loss(kd, lam) for _, kd, lam, _ in losses.values()),
                                       leaves + flat_extras, allow_unused=True)
            g_rows = clip_sum(g_task, g_kd[:len(names)], clip_factor(epoch, obj0.clip_e0), rows=True)
            g_extra = g_kd[len(names):]
        g_extra = iter(g_extra)
        for j, member_extras in zip(ok, extras):
            for p, g in zip(self.stack.row_params[a + j], g_rows):
                if g is not None:
                    p.grad = g[j]
            for p in member_extras:  # the distiller's own trainable parts: unclipped (as KDObjective)
                g = next(g_extra)
                if g is not None:
                    p.grad = g.detach()
            sums[j].add(out["logits"][j].detach(), y[j], losses[j][3])
        return ok

    @staticmethod
    def _member_loss(t: Trainer, s_out: Outputs, t_out: Outputs | None, labels: torch.Tensor, epoch: int
                     ) -> tuple[torch.Tensor, torch.Tensor | None, float, dict[str, torch.Tensor]]:
        """(task loss, KD loss or None, λ, metrics) of one member's step, as its objective computes them."""
        obj = t.objective
        if not isinstance(obj, KDObjective):  # CrossEntropy
            loss, metrics = obj.loss(s_out.logits, labels)
            return loss, None, 0.0, metrics
        lam = obj.lam_at(epoch, t.epochs)
        task, kd, metrics = obj.step_losses(s_out, t_out, labels, lam)
        return task, kd, lam, metrics

    # ------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def _evaluate_rows(self, ts: list[Trainer], a: int, n: int, split: str) -> list[dict]:
        """Accuracy and mean cross-entropy of rows ``a .. a + n - 1`` on ``split`` (the loader of the
        first member, shared by all), every member on each batch in one fused pass."""
        loader = ts[0].eval_loaders[split]
        if any(t.eval_loaders[split] is not loader for t in ts):
            return [t.evaluate(t.eval_loaders[split]) for t in ts]
        params, buffers, _ = self.stack.rows(a, n)
        params = {k: v.detach() for k, v in params.items()}
        self.net.eval()
        device = ts[0].device
        loss, correct = torch.zeros(n, device=device), torch.zeros(n, device=device)
        try:
            for x, y in loader:
                with ts[0].autocast():
                    logits = self._eval_fwd(params, buffers, x)
                loss += F.cross_entropy(logits.float().flatten(0, 1), y.repeat(n), reduction="none").view(n, -1).sum(1)
                correct += (logits.argmax(-1) == y).sum(1)
        finally:
            self.net.train()
        m = max(loader.num_samples, 1)
        return [{"acc": c / m, "loss": l / m} for c, l in zip(correct.tolist(), loss.tolist())]
