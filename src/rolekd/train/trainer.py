"""One trainer for plain training, KD training and PBT search members.

The loop, optimizer, step LR schedule, evaluation, metrics, checkpoints and resume live here; what a
step optimises is an :class:`~rolekd.train.objective.Objective` (plain cross-entropy or a KD
objective), and what augmentation an epoch uses comes from ``policy_for_epoch``. Search members drive
:meth:`Trainer.train_epoch` / :meth:`Trainer.evaluate` / :meth:`Trainer.state_dict` directly.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TrainConfig
from ..data.loader import DeviceLoader
from .checkpoint import load_state, load_weights, save_state, save_weights
from .metrics import MetricsLog
from .objective import CrossEntropy, Objective, StepContext

PolicyFn = Callable[[int], "Sequence[int] | None"]


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        from ..errors import UserError

        raise UserError(f"train.device={name} but no CUDA device is available: use train.device=cpu or auto")
    return dev


def build_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                           weight_decay=cfg.weight_decay)


def lr_at(cfg: TrainConfig, epoch: int, epochs: int) -> float:
    """Step schedule: ``lr * gamma ** (epoch // step)``, step = ``lr_step_frac`` of the epochs."""
    step = max(1, int(round(cfg.lr_step_frac * epochs)))
    return cfg.lr * cfg.lr_gamma ** (epoch // step)


class Trainer:
    def __init__(self, model: nn.Module, train_loader: DeviceLoader, cfg: TrainConfig,
                 eval_loaders: dict[str, DeviceLoader] | None = None, objective: Objective | None = None,
                 policy_for_epoch: PolicyFn | None = None, run_dir: str | Path | None = None,
                 epochs: int | None = None, log_name: str = "train"):
        self.cfg = cfg
        self.train_loader = train_loader
        self.eval_loaders = dict(eval_loaders or {})
        self.device = train_loader.device
        self.epochs = int(epochs or cfg.epochs)
        self.cuda = self.device.type == "cuda"
        self.channels_last = cfg.channels_last == "on" or (cfg.channels_last == "auto" and self.cuda)
        self.amp = cfg.amp == "bf16" or (cfg.amp == "auto" and self.cuda)
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.step_model = torch.compile(model) if cfg.compile else model
        self.objective = objective or CrossEntropy()
        self.objective.setup(model, self.device)
        params = [p for p in model.parameters() if p.requires_grad] + list(self.objective.extra_parameters())
        self.optimizer = build_optimizer(params, cfg)
        self.objective.bind_optimizer(self.optimizer)
        self.policy_for_epoch = policy_for_epoch
        self.run_dir = Path(run_dir) if run_dir else None
        self.log_name = log_name
        self.epoch = 0  # epochs completed
        self.history: list[dict] = []

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

    def train_epoch(self, progress: bool | None = None) -> dict:
        """Train epoch ``self.epoch`` once over the training loader; returns its metrics row."""
        progress = self.cfg.progress if progress is None else progress
        lr = self._set_lr()
        self._set_policy()
        self.objective.on_epoch_start(self.epoch, self.epochs)
        self.model.train()
        ctx = StepContext(epoch=self.epoch, epochs=self.epochs, autocast=self.autocast)
        sums: dict[str, torch.Tensor] = {}
        correct = torch.zeros((), device=self.device)
        seen = 0
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(self.train_loader), desc=f"{self.log_name} epoch {self.epoch + 1}/{self.epochs}",
                       leave=False, dynamic_ncols=True)
        t0 = time.perf_counter()
        for step, (x, y) in enumerate(self.train_loader):
            self.optimizer.zero_grad(set_to_none=True)
            logits, metrics = self.objective.train_step(self.step_model, x, y, ctx)
            self.optimizer.step()
            n = y.shape[0]
            seen += n
            correct += (logits.argmax(1) == y).sum()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0) + v.detach().float() * n
            if bar is not None:
                bar.update(1)
                if step % 20 == 0:
                    bar.set_postfix(loss=f"{float(sums['loss']) / seen:.3f}", acc=f"{float(correct) / seen:.3f}",
                                    ips=f"{seen / (time.perf_counter() - t0):.0f}")
        if bar is not None:
            bar.close()
        elapsed = time.perf_counter() - t0
        row = {"epoch": self.epoch, "lr": lr, "train_acc": float(correct) / max(seen, 1),
               "train_time_s": elapsed, "train_img_per_s": seen / max(elapsed, 1e-9)}
        for k, v in sums.items():
            row[f"train_{k}"] = float(v) / max(seen, 1)
        if not all(math.isfinite(row[f"train_{k}"]) for k in sums):
            row["nonfinite"] = True
        self.epoch += 1
        return row

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
            "cpu_rng": torch.get_rng_state(),
        }
        if self.cuda:
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict, rng: bool = True) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.objective.load_state_dict(state.get("objective", {}))
        self.epoch = int(state["epoch"])
        if rng:
            self.train_loader.load_state_dict(state["loader"])
            torch.set_rng_state(state["cpu_rng"])
            if self.cuda and "cuda_rng" in state:
                torch.cuda.set_rng_state(state["cuda_rng"], self.device)

    def checkpoint_dir(self) -> Path:
        assert self.run_dir is not None
        return self.run_dir / "checkpoint"

    def save_checkpoint(self) -> None:
        """Weights to safetensors, the rest to a weights-only-loadable ``state.pt``."""
        state = self.state_dict()
        state.pop("model")
        ck = self.checkpoint_dir()
        save_weights(self.model, ck / "model.safetensors")
        save_state(state, ck / "state.pt")

    def resume(self) -> bool:
        """Load the last completed epoch from the run directory, if there is one."""
        if self.run_dir is None:
            return False
        ck = self.checkpoint_dir()
        if not (ck / "state.pt").is_file() or not (ck / "model.safetensors").is_file():
            return False
        state = load_state(ck / "state.pt")
        load_weights(self.model, ck / "model.safetensors", what="run checkpoint")
        state["model"] = self.model.state_dict()
        self.load_state_dict(state)
        return True

    # ------------------------------------------------------------------------------ the loop
    def fit(self, on_epoch_end: Callable[["Trainer", dict], None] | None = None) -> list[dict]:
        """Train to ``self.epochs``, evaluating, logging and checkpointing every epoch.

        With a run directory, an earlier interrupted run of it is resumed from its last completed
        epoch, and the result equals an uninterrupted run with the same seed (on CPU).
        """
        log = MetricsLog(self.run_dir) if self.run_dir else None
        if self.resume() and log is not None:
            log.truncate_after(self.epoch - 1)
        self.history = log.rows() if log is not None else []
        try:
            while self.epoch < self.epochs:
                row = self.train_epoch()
                if row["epoch"] % self.cfg.eval_every == 0 or self.epoch == self.epochs:
                    for name, loader in self.eval_loaders.items():
                        for k, v in self.evaluate(loader).items():
                            row[f"{name}_{k}"] = v
                self.history.append(row)
                if log is not None:
                    log.log(row)
                    self.save_checkpoint()
                if self.cfg.progress:
                    shown = {k: round(v, 4) for k, v in row.items() if k.endswith("acc") or k.endswith("loss")}
                    print(f"[{self.log_name}] epoch {self.epoch}/{self.epochs} {shown} "
                          f"({row['train_img_per_s']:.0f} img/s)", flush=True)
                if on_epoch_end is not None:
                    on_epoch_end(self, row)
        finally:
            if log is not None:
                log.close()
        return self.history
