"""One trainer for plain training, KD training and PBT search members.

The epoch loop, optimizer, step LR schedule, evaluation, metrics, checkpoints and resume live here;
what a step optimises is an :class:`~rolekd.train.objective.Objective` (plain cross-entropy or a KD
objective), and what augmentation an epoch uses comes from ``policy_for_epoch``.

:meth:`Trainer.run_epochs` is the only epoch loop: ``rolekd train``/``distill`` run it once over the
whole run (:meth:`Trainer.fit`, with metrics and a checkpoint per epoch), a search member once per PBT
round. **When evaluation happens** (one rule for both): after an epoch when the number of epochs
trained so far is a multiple of ``train.eval_every``, and after the last epoch of every
:meth:`run_epochs` call (the end of a run, the end of a search round, where PBT reads the reward).

A trainer made with ``own_rng=True`` (search members) keeps its own torch random streams: they are
swapped in around its training and evaluation, so trainers that share a process draw what each
would draw alone, and its :meth:`state_dict` carries those streams, not the process's.

**Checkpoints** (:meth:`Trainer.save_checkpoint`, every epoch of :meth:`fit`) are one unit,
``<run dir>/checkpoint/`` = ``model.safetensors`` + ``state.pt`` (optimizer, objective, loader and RNG
state, epoch) + ``manifest.json`` (the parts, the epoch and the metrics rows up to it), published by
:func:`rolekd.files.write_checkpoint`: a kill at any instant leaves the previous or the new one, and
:meth:`resume` continues exactly. A checkpoint missing a part is an error, never a silent restart.

**Divergence**: :meth:`fit` (and :meth:`run_epochs` with ``check_finite``) stops with
:class:`NonFiniteLoss` after an epoch whose training loss or weights are not finite, or when a linear
algebra routine of the objective fails on non-finite input; :meth:`fit` logs that epoch's row (as
valid JSON, non-finite numbers as null) and keeps the checkpoint of the last finite epoch.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..config import TrainConfig
from ..data.loader import DeviceLoader
from ..errors import UserError
from ..files import (json_safe, load_state, load_weights, model_state, nonfinite_keys, read_checkpoint, state_bytes,
                     tensors_bytes, write_checkpoint)
from .metrics import MetricsLog, read_rows
from .objective import CrossEntropy, Objective, StepContext

PolicyFn = Callable[[int], "Sequence[int] | None"]


class NonFiniteLoss(RuntimeError):
    """Training diverged: the loss or the weights became NaN or infinite. ``row`` is the metrics row of
    the epoch that diverged (None when the epoch did not finish), ``epoch`` its index."""

    def __init__(self, message: str, row: dict | None = None, epoch: int | None = None):
        super().__init__(message)
        self.row = row
        self.epoch = epoch


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"train.device={name} but no CUDA device is available: use train.device=cpu or auto")
    return dev


def can_compile(device: torch.device) -> bool:
    """Whether ``torch.compile`` can build kernels for ``device``: on CPU, Inductor needs a C++ compiler; without
    one ``train.compile`` says so in one line and the run trains eagerly (same numerics as without it)."""
    if device.type != "cpu":
        return True
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
        return True
    except Exception as e:  # no compiler on PATH (or an unusable one)
        why = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        print(f"rolekd: train.compile: no C++ compiler for torch.compile on CPU ({why}); training eagerly "
              f"(install g++ to compile)", file=sys.stderr, flush=True)
        return False


WEIGHT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)  # whose weights ``weight_decay_on=weights`` decays


def layer_weights(model: nn.Module) -> list[nn.Parameter]:
    """The weights of the convolution and linear layers of ``model`` (DoReFa's quantized layers included):
    what ``train.weight_decay_on=weights`` decays; biases and BatchNorm parameters are not among them."""
    return [m.weight for m in model.modules()
            if isinstance(m, WEIGHT_LAYERS) and isinstance(getattr(m, "weight", None), nn.Parameter)]


def param_groups(params, weight_decay_on: str, model: nn.Module | None = None) -> list:
    """The optimizer's parameter groups: one group (every parameter decayed) for ``all``; for ``weights``
    the conv / linear weights of ``model`` (:func:`layer_weights`) with the optimizer's weight decay and the
    other parameters (biases, BatchNorm, an objective's extra parameters) with weight decay 0."""
    params = list(params)
    if weight_decay_on == "all":
        return params
    if weight_decay_on != "weights":
        raise UserError(f"train.weight_decay_on={weight_decay_on!r} must be all or weights")
    if model is None:
        raise ValueError("weight_decay_on=weights needs the model whose conv / linear weights are decayed")
    decayed = {id(p) for p in layer_weights(model)}
    on = [p for p in params if id(p) in decayed]
    off = [p for p in params if id(p) not in decayed]
    return ([{"params": on}] if on else []) + ([{"params": off, "weight_decay": 0.0}] if off else [])


def build_optimizer(params, cfg: TrainConfig, model: nn.Module | None = None) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov) or Adam (``eps = train.adam_eps``) over ``params`` with weight decay
    ``train.weight_decay`` on every parameter, or (``train.weight_decay_on=weights``) on the conv / linear
    weights of ``model`` only (:func:`param_groups`).

    The optimizer's weight decay adds ``wd * w`` to the gradient, for SGD and for Adam alike (``torch.optim.
    Adam``, not AdamW), before the momentum / moment estimates: the gradient of the L2 loss term
    ``wd / 2 * ||w||^2``, which is what the authors' code adds to its loss (``tf.nn.l2_loss(w) * wd``, and
    ``l2_loss`` is ``||w||^2 / 2``). The returned optimizer's ``weight_decay_on`` attribute records the
    rule (DML's teacher copy follows it).

    The update runs as ``torch._foreach_*`` operations over all parameters (``foreach=True``, also on the CPU,
    where torch would loop per parameter): the same arithmetic per element (bit-identical, tested), a few
    operators per step instead of three per parameter (188 for ResNet18's SGD with momentum)."""
    groups = param_groups(params, cfg.weight_decay_on, model)
    if cfg.optimizer == "adam":
        opt = torch.optim.Adam(groups, lr=cfg.lr, eps=cfg.adam_eps, weight_decay=cfg.weight_decay, foreach=True)
    else:
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                              weight_decay=cfg.weight_decay, foreach=True)
    opt.weight_decay_on = cfg.weight_decay_on
    return opt


def lr_at(cfg: TrainConfig, epoch: int, epochs: int) -> float:
    """Step schedule ``lr * lr_gamma ** n`` at a 0-based epoch: ``n = epoch // step``, step = ``lr_step_frac``
    of the epochs; or with ``lr_milestones``, ``n`` = the number of milestones ``m`` with ``epoch >=
    int(m * epochs)`` (the authors' code: ``[0.3, 0.6, 0.8]``, ``kd_model.py`` ``_learning_rate_scheduler``)."""
    if cfg.lr_milestones is not None:
        n = sum(1 for m in cfg.lr_milestones if epoch >= int(float(m) * epochs))
    else:
        n = epoch // max(1, int(round(cfg.lr_step_frac * epochs)))
    return cfg.lr * cfg.lr_gamma ** n


class EpochSums:
    """An epoch's running training metrics: each step's metrics weighted by its batch size, correct
    predictions and images seen; :meth:`row` is the epoch's metrics row. (One per trainer epoch; the fused
    search executor keeps one per member.)"""

    def __init__(self, device: torch.device):
        self.sums: dict[str, torch.Tensor] = {}
        self.correct = torch.zeros((), device=device)
        self.seen = 0

    def add(self, logits: torch.Tensor, labels: torch.Tensor, metrics: dict[str, torch.Tensor]) -> None:
        n = labels.shape[0]
        self.seen += n
        self.correct += (logits.argmax(1) == labels).sum()
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0) + v.detach().float() * n

    def mean(self, key: str) -> float:
        return float(self.sums[key]) / max(self.seen, 1) if key in self.sums else float("nan")

    def row(self, epoch: int, lr: float, elapsed: float) -> dict:
        """The metrics row: ``epoch``, ``lr``, ``train_acc``, ``train_<metric>`` means, timing; ``nonfinite``
        when a mean is not finite."""
        seen = max(self.seen, 1)
        row = {"epoch": epoch, "lr": lr, "train_acc": float(self.correct) / seen, "train_time_s": elapsed,
               "train_img_per_s": self.seen / max(elapsed, 1e-9)}
        for k, v in self.sums.items():
            row[f"train_{k}"] = float(v) / seen
        if not all(math.isfinite(row[f"train_{k}"]) for k in self.sums):
            row["nonfinite"] = True
        return row


class Trainer:
    def __init__(self, model: nn.Module, train_loader: DeviceLoader, cfg: TrainConfig,
                 eval_loaders: dict[str, DeviceLoader] | None = None, objective: Objective | None = None,
                 policy_for_epoch: PolicyFn | None = None, run_dir: str | Path | None = None,
                 log_name: str = "train", own_rng: bool = False):
        self.cfg = cfg
        self.train_loader = train_loader
        self.eval_loaders = dict(eval_loaders or {})
        self.device = train_loader.device
        self.epochs = int(cfg.epochs)
        self.cuda = self.device.type == "cuda"
        if self.cuda:  # fixed input shapes: cuDNN's autotuned convolutions (no effect on the CPU)
            torch.backends.cudnn.benchmark = True
        self.channels_last = train_loader.channels_last  # decided once, where the loaders are made
        self.amp = cfg.amp == "bf16" or (cfg.amp == "auto" and self.cuda)
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.step_model = torch.compile(model) if cfg.compile and can_compile(self.device) else model
        self.objective = objective or CrossEntropy()
        self.objective.setup(model, self.device)
        params = [p for p in model.parameters() if p.requires_grad] + list(self.objective.extra_parameters())
        self.optimizer = build_optimizer(params, cfg, model)
        self.objective.bind_optimizer(self.optimizer)
        self.policy_for_epoch = policy_for_epoch
        self.run_dir = Path(run_dir) if run_dir else None
        self.log_name = log_name
        self.epoch = 0  # epochs completed
        self.history: list[dict] = []
        self._rng: dict[str, torch.Tensor] | None = self._process_rng() if own_rng else None

    # ------------------------------------------------------------------------------ random streams
    def _process_rng(self) -> dict[str, torch.Tensor]:
        rng = {"cpu_rng": torch.get_rng_state()}
        if self.cuda:
            rng["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return rng

    def _set_process_rng(self, rng: dict) -> None:
        torch.set_rng_state(rng["cpu_rng"])
        if self.cuda and rng.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(rng["cuda_rng"], self.device)

    @contextlib.contextmanager
    def rng_scope(self):
        """Run the body on this trainer's own random streams (``own_rng``); a no-op otherwise."""
        if self._rng is None:
            yield
            return
        self._set_process_rng(self._rng)
        try:
            yield
        finally:
            self._rng = self._process_rng()

    # ------------------------------------------------------------------------------ one epoch
    def autocast(self):
        if self.amp:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _set_lr(self) -> float:
        lr = lr_at(self.cfg, self.epoch, self.epochs)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return lr

    def _set_policy(self) -> None:
        aug = self.train_loader.augment
        if self.policy_for_epoch is not None and aug is not None and hasattr(aug, "set_policy"):
            aug.set_policy(self.policy_for_epoch(self.epoch))

    def begin_epoch(self) -> float:
        """Set up epoch ``self.epoch``: its learning rate (returned), its policy, the objective's epoch
        start, training mode."""
        lr = self._set_lr()
        self._set_policy()
        self.objective.on_epoch_start(self.epoch, self.epochs)
        self.model.train()
        return lr

    def train_epoch(self, progress: bool | None = None) -> dict:
        """Train epoch ``self.epoch`` once over the training loader; returns its metrics row."""
        progress = self.cfg.progress if progress is None else progress
        lr = self.begin_epoch()
        ctx = StepContext(epoch=self.epoch, epochs=self.epochs, autocast=self.autocast)
        sums = EpochSums(self.device)
        bar = None
        if progress and sys.stderr.isatty():  # a redirected stderr gets the one line per epoch only
            bar = tqdm(total=len(self.train_loader), desc=f"{self.log_name} epoch {self.epoch + 1}/{self.epochs}",
                       leave=False, dynamic_ncols=True)
        t0 = time.perf_counter()
        for step, (x, y) in enumerate(self.train_loader):
            self.optimizer.zero_grad(set_to_none=True)
            logits, metrics = self.objective.train_step(self.step_model, x, y, ctx)
            self.optimizer.step()
            sums.add(logits, y, metrics)
            if bar is not None:
                bar.update(1)
                if step % 20 == 0:
                    bar.set_postfix(loss=f"{sums.mean('loss'):.3f}", acc=f"{float(sums.correct) / sums.seen:.3f}",
                                    ips=f"{sums.seen / (time.perf_counter() - t0):.0f}")
        if bar is not None:
            bar.close()
        row = sums.row(self.epoch, lr, time.perf_counter() - t0)
        self.epoch += 1
        return row

    def divergence(self, epoch: int, what: str, row: dict | None = None) -> NonFiniteLoss:
        """The error of a run that diverged in (0-based) ``epoch``; ``what`` says how."""
        return NonFiniteLoss(f"{self.log_name}: training diverged in epoch {epoch + 1}/{self.epochs} ({what})",
                             row=row, epoch=epoch)

    def numerical_failure(self, epoch: int, error: Exception) -> NonFiniteLoss:
        """The error of a run whose objective's linear algebra failed in ``epoch`` (on non-finite input)."""
        what = "non-finite weights" if not self.weights_finite() else "a numerical failure"
        msg = str(error).splitlines()[0] if str(error) else type(error).__name__
        msg = msg if len(msg) <= 160 else msg[:157] + "..."
        return self.divergence(epoch, f"{what}: {msg}")

    def nonfinite(self, row: dict) -> str | None:
        """How the epoch of ``row`` diverged (its training loss, else the weights), None when it did not."""
        if row.get("nonfinite"):  # EpochSums.row: a training metric (the loss included) is not finite
            return "non-finite training loss"
        if not self.weights_finite():
            return "non-finite weights"
        return None

    def eval_due(self, end: int) -> bool:
        """Whether to evaluate now, after an epoch of a :meth:`run_epochs` call that ends at epoch ``end``
        (the rule in the module docstring)."""
        return self.epoch % max(1, int(self.cfg.eval_every)) == 0 or self.epoch == end

    @torch.no_grad()
    def evaluate(self, loader: DeviceLoader) -> dict:
        """Top-1 accuracy and mean cross-entropy of the model on ``loader`` (no augmentation)."""
        self.model.eval()
        correct = torch.zeros((), device=self.device)
        loss = torch.zeros((), device=self.device)
        for x, y in loader:
            with self.autocast():
                logits = self.step_model(x)
            loss += F.cross_entropy(logits.float(), y, reduction="sum")
            correct += (logits.argmax(1) == y).sum()
        n = max(loader.num_samples, 1)
        return {"acc": float(correct) / n, "loss": float(loss) / n}

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Everything needed to continue exactly (in memory; see :meth:`save_checkpoint`)."""
        state = {
            "epoch": self.epoch,
            "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "objective": self.objective.state_dict(),
            "loader": self.train_loader.state_dict(),
        }
        state.update(self._rng if self._rng is not None else self._process_rng())
        return state

    def load_state_dict(self, state: dict, rng: bool = True) -> None:
        """Load a state; ``rng=False`` keeps this trainer's data order and random streams (a PBT exploit
        copies weights, optimizer and objective state, never the random streams)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.objective.load_state_dict(state.get("objective", {}))
        self.epoch = int(state["epoch"])
        if rng:
            self.train_loader.load_state_dict(state["loader"])
            streams = {k: state[k].clone() for k in ("cpu_rng", "cuda_rng") if state.get(k) is not None}
            if self._rng is not None:
                self._rng = {"cpu_rng": streams["cpu_rng"], **({"cuda_rng": streams.get("cuda_rng")}
                                                               if self.cuda else {})}
            else:
                self._set_process_rng(streams)

    def checkpoint_dir(self) -> Path:
        assert self.run_dir is not None
        return self.run_dir / "checkpoint"

    def save_checkpoint(self, rows: list[dict] | None = None) -> None:
        """The checkpoint of the epochs completed so far, as one unit (see the module docstring):
        weights to safetensors, the rest to a weights-only-loadable ``state.pt``, ``rows`` (the metrics
        rows up to now) into the manifest."""
        state = self.state_dict()
        state.pop("model")
        write_checkpoint(self.checkpoint_dir(), {
            "model.safetensors": tensors_bytes(model_state(self.model)),
            "state.pt": state_bytes(state),
        }, {"epoch": self.epoch, "epochs": self.epochs, "metrics": list(rows or [])})

    def resume(self) -> bool:
        """Load the last completed epoch from the run directory, if there is one (UserError when its
        checkpoint is incomplete). The metrics rows the checkpoint holds go to ``self.history``."""
        if self.run_dir is None:
            return False
        ck = self.checkpoint_dir()
        manifest = read_checkpoint(ck)
        if manifest is None:
            return False
        state = load_state(ck / "state.pt")
        if int(state.get("epoch", -1)) != int(manifest.get("epoch", -2)):
            raise UserError(f"checkpoint {ck}: state.pt is of epoch {state.get('epoch')}, its manifest of epoch "
                            f"{manifest.get('epoch')}; delete {ck} to start the run again")
        load_weights(self.model, ck / "model.safetensors", what="run checkpoint")
        state["model"] = self.model.state_dict()
        self.load_state_dict(state)
        self.history = [dict(r) for r in manifest.get("metrics", [])]
        return True

    def weights_finite(self) -> bool:
        """Whether every floating-point parameter and buffer of the model (and of the objective's
        trained parts) is finite."""
        tensors = {**self.model.state_dict(), **{f"objective.{i}": p.detach() for i, p in
                                                   enumerate(self.objective.extra_parameters())}}
        return not nonfinite_keys(tensors)

    # ------------------------------------------------------------------------------ the loop
    def run_epochs(self, k: int, splits: Sequence[str] | None = None, check_finite: bool = False,
                   on_epoch_end: Callable[["Trainer", dict], None] | None = None,
                   progress: bool | None = None) -> list[dict]:
        """Train ``k`` epochs (at most to ``self.epochs``) and return their metrics rows.

        Evaluation (see the module docstring for when) adds ``<split>_acc`` / ``<split>_loss`` for each
        split of ``splits`` (default: every evaluation loader). ``check_finite``: raise
        :class:`NonFiniteLoss` after an epoch whose training loss or weights are not finite (or when the
        objective's linear algebra fails on non-finite input). ``on_epoch_end(trainer, row)`` runs after
        each epoch (logging, checkpoints)."""
        names = list(self.eval_loaders) if splits is None else list(splits)
        end = min(self.epochs, self.epoch + int(k))
        rows = []
        with self.rng_scope():
            while self.epoch < end:
                epoch = self.epoch
                try:
                    row = self.train_epoch(progress)
                except torch.linalg.LinAlgError as e:
                    if not check_finite:
                        raise
                    raise self.numerical_failure(epoch, e) from None
                if check_finite:
                    what = self.nonfinite(row)
                    if what is not None:
                        row["nonfinite"] = True
                        raise self.divergence(epoch, what, row=row)
                if self.eval_due(end):
                    t1 = time.perf_counter()
                    for name in names:
                        for key, v in self.evaluate(self.eval_loaders[name]).items():
                            row[f"{name}_{key}"] = v
                    row["eval_s"] = time.perf_counter() - t1
                rows.append(row)
                if on_epoch_end is not None:
                    on_epoch_end(self, row)
        return rows

    def fit(self, on_epoch_end: Callable[["Trainer", dict], None] | None = None) -> list[dict]:
        """Train to ``self.epochs``, evaluating, logging and checkpointing every epoch (then calling
        ``on_epoch_end(trainer, row)``).

        With a run directory, an earlier interrupted run of it is resumed from its last completed
        epoch (its metrics rows are those its checkpoint holds), and the result equals an uninterrupted
        run with the same seed (on CPU). A non-finite loss or weights stop the run with
        :class:`NonFiniteLoss` after that epoch's row is logged; the checkpoint stays at the last
        finite epoch.
        """
        self.history = []
        resumed = self.resume()  # before anything is written: an incomplete checkpoint changes nothing
        log = MetricsLog(self.run_dir) if self.run_dir else None
        if resumed:
            if log is not None:
                read_rows(log.jsonl, strict=False)  # notes a torn line; the checkpoint's rows replace them
                log.reset(self.history)
        elif log is not None:
            done = [r for r in log.rows() if isinstance(r.get("epoch"), int) and r["epoch"] >= 1]
            if done:
                raise UserError(f"run directory {self.run_dir} has metrics of {len(log.rows())} epochs but no "
                                f"checkpoint/ to resume them from; restore it, or delete metrics.jsonl to "
                                f"start the run again")
            log.reset([])  # rows of an epoch whose first checkpoint was never written

        def record(row: dict) -> dict:
            """The row as logged (JSON-safe, without timings of evaluation), in the history and the log."""
            row = json_safe({k: v for k, v in row.items() if k != "eval_s"})
            self.history.append(row)
            if log is not None:
                log.log(row)
            return row

        def after_epoch(trainer: "Trainer", row: dict) -> None:
            row = record(row)
            if log is not None:
                self.save_checkpoint(self.history)
            if self.cfg.progress:
                shown = {k: round(v, 4) for k, v in row.items()
                         if (k.endswith("acc") or k.endswith("loss")) and isinstance(v, float)}
                print(f"[{self.log_name}] epoch {self.epoch}/{self.epochs} {shown} "
                      f"({row['train_img_per_s']:.0f} img/s)", flush=True)
            if on_epoch_end is not None:
                on_epoch_end(trainer, row)

        try:
            try:
                self.run_epochs(self.epochs - self.epoch, check_finite=True, on_epoch_end=after_epoch)
            except NonFiniteLoss as e:
                if e.row is not None:
                    record(e.row)
                raise
        finally:
            if log is not None:
                log.close()
        return self.history
