"""Knowledge distillation as a trainer :class:`~rolekd.train.objective.Objective`.

One step: the student's forward (with feature taps when the KD loss needs them), the teacher's forward
on the same batch (frozen: eval mode, no gradients; DML: train mode, it learns too), the task loss
``CE`` and the KD loss, then the gradients, per parameter tensor::

    grad = grad(CE) + clip(grad(λ·KD))      clip_kd_grad, clip_lam="paper" (default)
    grad = grad(CE) + clip(grad(KD))        clip_kd_grad, clip_lam="authors" (λ never enters the update)
    grad = grad(CE + λ·KD)                  no clipping: one backward
    clip(g) = g · min(1, ||grad(CE)|| · sigmoid(epoch - e0) / ||g||)

Whether a method's KD gradient is clipped is the method's own declaration (``Distiller.clip_kd_grad``:
KD-SVD, MHGD and II-KD, whose reference code clips; soft labels, DML and RKD add ``λ·KD`` as their
reference code does), overridden by ``clip_kd_grad=True/False``. The clip is KD-SVD's rule
(``op_util.Optimizer_w_Distillation`` in ``sseung0703/KD_methods_with_TF`` and ``bigaidream-projects/
role-kd``: ``tf.clip_by_norm(grad(KD), ||grad(CE)|| * sigmoid(epoch, 0))`` per variable, ``e0 = 0``,
counting epochs from the start of KD training — for MHGD after its attention network's own training,
so our 0-based KD epoch is the same count). Where λ enters: the paper writes ``task + λ·KD`` and clips
"the gradient for KD loss", read here as the gradient of the weighted term ``λ·KD`` (λ acts whenever
the clip does not bind); the authors' code clips the gradient of the *unweighted* KD loss and never
applies λ to it (``lamb`` only enters the logged total loss), ``clip_lam="authors"``. λ decays: by
default ``×0.5`` every 60 epochs (paper §5.1); alternatively ``lam_milestones`` (fractions of the run)
with ``lam_gamma`` (the authors' code uses ``[0.3, 0.6, 0.8]`` and 0.6).

A method that compares feature maps channel by channel (KD-SVD, MHGD, II-KD) may need a channel
adapter when the student's tap widths differ from the teacher's; the objective builds it in
:meth:`KDObjective.setup` from one ``probe`` batch (see :mod:`rolekd.distill.adapter`).

:class:`KDObjective` distils from a frozen teacher; :class:`MutualKDObjective` (DML) trains the teacher
too, with its own optimizer. :func:`build_kd_objective` picks the one the method asks for
(``Distiller.trains_teacher``).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..models.fold import fold_batchnorm
from ..models.taps import FeatureTaps, Outputs
from ..train.objective import Objective
from ..train.trainer import param_groups
from .base import Distiller, as_float, create_distiller


def _as_float(out: Outputs) -> Outputs:
    """At least float32 (bf16 autocast outputs are upcast; float64 is kept)."""
    return Outputs(as_float(out.logits), {k: as_float(v) for k, v in out.features.items()},
                   None if out.embedding is None else as_float(out.embedding))


def _detached(out: Outputs) -> Outputs:
    return Outputs(out.logits.detach(), {k: v.detach() for k, v in out.features.items()},
                   None if out.embedding is None else out.embedding.detach())


CLIP_LAM = ("paper", "authors")  # where λ enters a clipped KD gradient (module docstring)


def clip_factor(epoch: float, e0: float = 0.0) -> float:
    """``sigmoid(epoch - e0)``, rounded to 1 above ``1 - 1e-8`` as upstream."""
    z = epoch - e0
    s = 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0
    return 1.0 if s > 1 - 1e-8 else s


class KDObjective(Objective):
    """Task loss + λ·KD loss with optional per-parameter KD gradient clipping, from a frozen teacher.

    ``teacher``: the teacher network (same input batch as the student); eval mode, ``requires_grad``
    off, forward under ``no_grad``.
    """

    def __init__(self, teacher: nn.Module, distiller: Distiller, lam: float = 0.4, lam_decay: float = 0.5,
                 lam_decay_every: int = 60, lam_milestones: Sequence[float] | None = None, lam_gamma: float = 0.6,
                 clip_kd_grad: bool | None = None, clip_e0: float = 0.0, clip_lam: str = "paper",
                 probe: torch.Tensor | None = None, fold_teacher_bn: bool = False):
        if not isinstance(distiller, Distiller):
            raise TypeError(f"distiller must be a rolekd Distiller, got {type(distiller).__name__}")
        if clip_lam not in CLIP_LAM:
            raise UserError(f"kd clip_lam={clip_lam!r} must be one of {', '.join(CLIP_LAM)}")
        if lam < 0:
            raise UserError(f"kd lam={lam} must be >= 0")
        if not 0 < lam_decay <= 1 or not 0 < lam_gamma <= 1:
            raise UserError(f"kd lam_decay={lam_decay} and lam_gamma={lam_gamma} must be in (0, 1]")
        if int(lam_decay_every) < 1:
            raise UserError(f"kd lam_decay_every={lam_decay_every} must be >= 1")
        if lam_milestones is not None:
            lam_milestones = [float(m) for m in lam_milestones]
            if any(not 0 <= m <= 1 for m in lam_milestones):
                raise UserError(f"kd lam_milestones={lam_milestones} must be fractions of the run in [0, 1]")
        self.teacher = teacher
        self.distiller = distiller
        self.lam = float(lam)
        self.lam_decay = float(lam_decay)
        self.lam_decay_every = int(lam_decay_every)
        self.lam_milestones = sorted(lam_milestones) if lam_milestones is not None else None
        self.lam_gamma = float(lam_gamma)
        self.clip_kd_grad = bool(distiller.clip_kd_grad if clip_kd_grad is None else clip_kd_grad)
        self.clip_e0 = float(clip_e0)
        self.clip_lam = clip_lam
        self.probe = probe  # one batch of inputs to build shape-dependent parts (channel adapters) in setup
        self._epochs: int | None = None
        self._s_taps: FeatureTaps | None = None
        self._s_taps_model: nn.Module | None = None
        # the teacher's forward may run on a copy with its BatchNorm folded into the convolutions
        # (rolekd.models.fold; rounding-level differences), made at the first forward after setup
        self.fold_teacher_bn = bool(fold_teacher_bn) and not distiller.trains_teacher
        self._t_net: nn.Module | None = None
        self._t_taps: FeatureTaps | None = None
        self._set_teacher_mode()

    # ------------------------------------------------------------------ configuration
    @property
    def _uses_taps(self) -> bool:
        return self.distiller.needs_features or self.distiller.needs_embedding

    def _set_teacher_mode(self) -> None:
        self.teacher.eval()
        self.teacher.requires_grad_(False)

    def lam_at(self, epoch: int, epochs: int | None = None) -> float:
        """λ at a 0-based epoch: ``lam * lam_decay ** (epoch // lam_decay_every)``, or with milestones
        ``lam * lam_gamma ** #{m : epoch >= int(m * epochs)}`` (``epochs`` defaults to the current run's)."""
        if self.lam_milestones is not None:
            epochs = self._epochs if epochs is None else epochs
            if epochs is None:
                raise ValueError("lam_at with lam_milestones needs the run's number of epochs")
            n = sum(1 for m in self.lam_milestones if epoch >= int(m * epochs))
            return self.lam * self.lam_gamma ** n
        return self.lam * self.lam_decay ** (epoch // self.lam_decay_every)

    # ------------------------------------------------------------------ trainer hooks
    def setup(self, model: nn.Module, device: torch.device) -> None:
        self._drop_teacher_net()
        self.teacher.to(device)
        self.distiller.to(device)
        self._set_teacher_mode()
        if self.probe is not None and self.distiller.needs_features:
            self.build_adapters(model, self.probe.to(device))

    def build_adapters(self, model: nn.Module, images: torch.Tensor) -> bool:
        """Let the method create its shape-dependent parts (a channel adapter for taps of different
        widths) from both networks' outputs on ``images``: eval mode, no gradients, nothing updated
        (BatchNorm statistics included). Returns True if parameters were added; call before the
        optimizer is built (:meth:`setup` does, with ``probe``)."""
        base = getattr(model, "_orig_mod", model)
        was_training, t_training = base.training, self.teacher.training
        base.eval()
        self.teacher.eval()
        try:
            with torch.no_grad():
                t_out = _as_float(self.forward_teacher(images))
                s_out = _as_float(self._forward_student(base, images))
        finally:
            base.train(was_training)
            self.teacher.train(t_training)
        added = self.distiller.build_adapters(s_out, t_out)
        self.distiller.to(images.device)
        return added

    def extra_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.distiller.parameters() if p.requires_grad]

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        self._epochs = epochs

    def prepare(self, batches: Iterable[torch.Tensor], epochs: int | None = None) -> None:
        """Train the distiller's own parts (MHGD's attention) on the frozen teacher; call before KD training."""
        if self.distiller.needs_prepare:
            kwargs = {} if epochs is None else {"epochs": epochs}
            was_training = self.teacher.training
            self.distiller.prepare(self.teacher, batches, **kwargs)
            self.teacher.train(was_training)

    @property
    def needs_prepare(self) -> bool:
        return self.distiller.needs_prepare and not self.distiller.is_prepared

    # ------------------------------------------------------------------ one step
    def _student_taps(self, model: nn.Module) -> FeatureTaps:
        base = getattr(model, "_orig_mod", model)  # hooks go on the eager module (torch.compile keeps it)
        if self._s_taps is None or self._s_taps_model is not base:
            if self._s_taps is not None:
                self._s_taps.remove()
            self._s_taps = FeatureTaps(base, features=self.distiller.needs_features,
                                       embedding=self.distiller.needs_embedding)
            self._s_taps_model = base
        return self._s_taps

    def release_student_taps(self) -> None:
        """Remove the hooks of the student's feature taps (made again at the next step that needs them), so
        that a copy of the student network carries none."""
        if self._s_taps is not None:
            self._s_taps.remove()
        self._s_taps = self._s_taps_model = None

    def _forward_student(self, model: nn.Module, images: torch.Tensor) -> Outputs:
        if self._uses_taps:
            return self._student_taps(model)(images)
        return Outputs(model(images))

    def _teacher_net(self) -> nn.Module:
        """The network the teacher's forward runs: the teacher, or its BatchNorm-folded copy (made once)."""
        if self._t_net is None:
            self._t_net = fold_batchnorm(self.teacher) if self.fold_teacher_bn else self.teacher
            if self._uses_taps:
                self._t_taps = FeatureTaps(self._t_net, features=self.distiller.needs_features,
                                           embedding=self.distiller.needs_embedding)
        return self._t_net

    def _drop_teacher_net(self) -> None:
        if self._t_taps is not None:
            self._t_taps.remove()
        self._t_net = self._t_taps = None

    def forward_teacher(self, images: torch.Tensor) -> Outputs:
        """The frozen teacher's outputs (with the taps the distiller reads); the caller sets no_grad/autocast."""
        net = self._teacher_net()
        if self._t_taps is not None:
            return self._t_taps(images)
        return Outputs(net(images))

    def _teacher_outputs(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, ctx,
                         lam: float) -> tuple[Outputs, Outputs]:
        """(teacher, student) outputs of one batch: the frozen teacher without gradients."""
        if self.teacher.training:
            self.teacher.eval()
        with torch.no_grad(), ctx.autocast():
            t_out = self.forward_teacher(images)
        with ctx.autocast():
            s_out = self._forward_student(model, images)
        return t_out, s_out

    def step_losses(self, s_out: Outputs, t_out: Outputs, labels: torch.Tensor, lam: float
                    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(task loss, unweighted KD loss, metrics) of one step from the student's and the teacher's outputs,
        with this epoch's ``lam`` (:meth:`lam_at`) in the metrics (the fused search executor calls it per
        member)."""
        s_out, t_out = _as_float(s_out), _as_float(t_out)
        task = F.cross_entropy(s_out.logits, labels)
        kd = self.distiller(s_out, t_out, labels)
        metrics = {"loss": (task + kd * lam).detach(), "task_loss": task.detach(), "kd_loss": kd.detach(),
                   "lam": torch.full((), lam, device=task.device)}
        for name, value in self.distiller.terms().items():
            metrics[f"kd_{name}"] = value
        return task, kd, metrics

    def train_step(self, model, images, labels, ctx):
        self._epochs = ctx.epochs
        lam = self.lam_at(ctx.epoch, ctx.epochs)
        t_out, s_out = self._teacher_outputs(model, images, labels, ctx, lam)
        task, kd, metrics = self.step_losses(s_out, t_out, labels, lam)
        self._backward(model, task, kd, lam, ctx.epoch)
        return s_out.logits.float().detach(), metrics

    def clips(self, kd: torch.Tensor) -> bool:
        """Whether this step's KD gradient is clipped (then task and KD gradients are taken apart)."""
        authors = self.clip_lam == "authors"
        return bool(self.clip_kd_grad and kd.requires_grad and (authors or float(self.lam)))

    def kd_grad_loss(self, kd: torch.Tensor, lam: float) -> torch.Tensor:
        """The loss whose gradient is clipped: λ·KD (the paper's reading) or KD itself (the authors' code)."""
        return kd if self.clip_lam == "authors" else kd * lam

    def _backward(self, model: nn.Module, task: torch.Tensor, kd: torch.Tensor, lam: float, epoch: int) -> None:
        if not self.clips(kd):
            (task + kd * lam).backward()
            return
        params = [p for p in model.parameters() if p.requires_grad]
        extra = [p for p in self.distiller.parameters() if p.requires_grad]
        # the KD gradient first, keeping the graph; the task gradient's pass then frees it as it goes (the same
        # numbers either way; 1% faster on the CPU step than the other order)
        g_kd = torch.autograd.grad(self.kd_grad_loss(kd, lam), params + extra, retain_graph=True, allow_unused=True)
        g_task = torch.autograd.grad(task, params, allow_unused=True)
        grads = clip_sum(g_task, g_kd[:len(params)], clip_factor(epoch, self.clip_e0))
        for p, g in zip(params, grads):
            _accumulate(p, g)
        for p, gk in zip(extra, g_kd[len(params):]):  # the distiller's own trainable parts: unclipped
            _accumulate(p, gk)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"distiller": self.distiller.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state and "distiller" in state:
            self.distiller.load_state_dict(state["distiller"])

    def close(self) -> None:
        """Remove the feature hooks this objective registered."""
        if self._s_taps is not None:
            self._s_taps.remove()
        self._s_taps = self._s_taps_model = None
        self._drop_teacher_net()


class MutualKDObjective(KDObjective):
    """Deep mutual learning: the teacher learns too (train mode), from the distiller's
    :meth:`teacher_loss`, stepped here by its own optimizer: ``teacher_optimizer(params)`` if given,
    else a copy of the trainer's optimizer (class and hyper-parameters, given by :meth:`bind_optimizer`)
    whose learning rate follows the trainer's (scaled by the two optimizers' ratio at creation) and whose
    weight decay falls on the same kind of parameters (``train.weight_decay_on``)."""

    def __init__(self, teacher: nn.Module, distiller: Distiller,
                 teacher_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
                 **kwargs):
        self.teacher_optimizer = teacher_optimizer
        self._student_opt: torch.optim.Optimizer | None = None
        self._lr_ratio = 1.0
        self._t_opt: torch.optim.Optimizer | None = None
        self._pending_t_opt_state: dict | None = None
        super().__init__(teacher, distiller, **kwargs)

    def _set_teacher_mode(self) -> None:
        self.teacher.train()
        self.teacher.requires_grad_(True)

    def bind_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        self._student_opt = optimizer
        if self._t_opt is not None:
            self._lr_ratio = self._t_opt.param_groups[0]["lr"] / optimizer.param_groups[0]["lr"]

    def _teacher_optim(self) -> torch.optim.Optimizer:
        if self._t_opt is None:
            params = [p for p in self.teacher.parameters() if p.requires_grad]
            if self.teacher_optimizer is not None:
                self._t_opt = self.teacher_optimizer(params)
            elif self._student_opt is not None:
                s = self._student_opt
                kwargs = dict(s.defaults)
                kwargs["lr"] = s.param_groups[0]["lr"]
                # the student's weight-decay rule (train.weight_decay_on) on the teacher's own layers
                self._t_opt = type(s)(param_groups(params, getattr(s, "weight_decay_on", "all"), self.teacher),
                                      **kwargs)
                self._t_opt.weight_decay_on = getattr(s, "weight_decay_on", "all")
            else:
                raise RuntimeError("DML trains the teacher: pass teacher_optimizer=... or call "
                                   "bind_optimizer(optimizer) before training")
            if self._student_opt is not None:
                self._lr_ratio = self._t_opt.param_groups[0]["lr"] / self._student_opt.param_groups[0]["lr"]
            if self._pending_t_opt_state is not None:
                self._t_opt.load_state_dict(self._pending_t_opt_state)
                self._pending_t_opt_state = None
        return self._t_opt

    def _teacher_outputs(self, model, images, labels, ctx, lam):
        if not self.teacher.training:
            self.teacher.train()
        with ctx.autocast():
            t_out = self.forward_teacher(images)
            s_out = self._forward_student(model, images)
        opt = self._teacher_optim()
        if self._student_opt is not None:
            for g in opt.param_groups:
                g["lr"] = self._student_opt.param_groups[0]["lr"] * self._lr_ratio
        t_loss = self.distiller.teacher_loss(s_out.logits.detach().float(), t_out.logits.float(), labels, lam)
        opt.zero_grad(set_to_none=True)
        t_loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return _detached(t_out), s_out

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["teacher"] = self.teacher.state_dict()
        state["teacher_optimizer"] = self._t_opt.state_dict() if self._t_opt is not None else self._pending_t_opt_state
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if state and state.get("teacher") is not None:
            self.teacher.load_state_dict(state["teacher"])
            opt_state = state.get("teacher_optimizer")
            if opt_state is not None:
                if self._t_opt is not None:
                    self._t_opt.load_state_dict(opt_state)
                else:
                    self._pending_t_opt_state = opt_state


def clip_sum(g_task: Sequence[torch.Tensor | None], g_kd: Sequence[torch.Tensor | None], factor: float,
             rows: bool = False) -> list[torch.Tensor | None]:
    """Per parameter tensor: ``g_task + g_kd * min(1, ||g_task|| * factor / ||g_kd||)`` -- the KD gradient
    clipped to the task gradient's norm (``tf.clip_by_norm`` per variable, as KD-SVD's code). ``rows=True``:
    the first dimension indexes independent networks (the fused search's members), each clipped on its
    own row. Batched over all tensors (few kernel launches on a GPU)."""
    out = list(g_task)
    idx = [i for i, gk in enumerate(g_kd) if gk is not None]
    if not idx:
        return out
    gks = [g_kd[i] for i in idx]
    gts = [g_task[i] if g_task[i] is not None else torch.zeros_like(g_kd[i]) for i in idx]
    if rows:
        bound = torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1) for g in gts]) * factor  # (T, R)
        norm = torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1) for g in gks])
    else:
        bound = torch.stack(torch._foreach_norm(gts)) * factor
        norm = torch.stack(torch._foreach_norm(gks))
    scale = bound / torch.maximum(norm, bound).clamp_min(1e-30)
    scales = [sc.view(-1, *([1] * (g.dim() - 1))) if rows else sc for sc, g in zip(scale.unbind(), gks)]
    for i, g in zip(idx, torch._foreach_add(gts, torch._foreach_mul(gks, scales))):
        out[i] = g
    return out


def _accumulate(p: nn.Parameter, g: torch.Tensor | None) -> None:
    if g is None:
        return
    g = g.detach() if g.requires_grad else g  # autograd.grad's results carry no graph: no detach operator each
    if p.grad is None:
        p.grad = g
    else:
        p.grad.add_(g)


_OBJECTIVE_KEYS = {"lam", "lam_decay", "lam_decay_every", "lam_milestones", "lam_gamma", "clip_kd_grad", "clip_e0",
                   "clip_lam", "probe", "fold_teacher_bn"}


def build_kd_objective(method: str | Distiller, teacher: nn.Module, **kwargs) -> KDObjective:
    """The KD objective of ``method`` (a name, or a built :class:`Distiller`) with ``teacher``: objective
    options (``lam``, ``lam_decay``, ``lam_decay_every``, ``lam_milestones``, ``lam_gamma``,
    ``clip_kd_grad`` (alias ``clip``; ``None``, the default, = the method's own declaration),
    ``clip_e0``, ``clip_lam`` (``"paper"``: clip the gradient of λ·KD; ``"authors"``: of KD, λ unused),
    ``probe`` (a batch of inputs; builds a channel adapter in ``setup`` when tap widths differ),
    ``fold_teacher_bn`` (the frozen teacher's forward on a BatchNorm-folded copy: rounding-level differences);
    ``teacher_optimizer`` for a method that trains the teacher) go to the objective, the rest to the
    distiller (e.g. ``T`` for soft). A method that trains the teacher (DML) gets a
    :class:`MutualKDObjective`."""
    if "clip" in kwargs:
        kwargs["clip_kd_grad"] = kwargs.pop("clip")
    okw = {k: kwargs.pop(k) for k in list(kwargs) if k in _OBJECTIVE_KEYS}
    t_opt = kwargs.pop("teacher_optimizer", None)
    distiller = method if isinstance(method, Distiller) else create_distiller(method, **kwargs)
    if distiller.trains_teacher:
        return MutualKDObjective(teacher, distiller, teacher_optimizer=t_opt, **okw)
    if t_opt is not None:
        raise UserError(f"KD method {distiller.name!r} does not train the teacher: teacher_optimizer does not apply")
    return KDObjective(teacher, distiller, **okw)
