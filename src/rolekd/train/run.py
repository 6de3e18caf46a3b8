"""From a validated :class:`~rolekd.config.Config` to a finished run directory.

A run directory holds ``config.yaml`` (the resolved config), ``metrics.jsonl``/``metrics.csv``,
``tb/`` (TensorBoard), ``checkpoint/`` (last completed epoch) and, when finished, ``model.safetensors``
and ``result.json``. Rerunning the same command resumes an interrupted run or reports a finished one;
a different config for an existing directory is refused so nothing written is lost.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from ..config import Config, dump_config
from ..data import DataBundle, DeviceLoader, load_dataset, reduced_split
from ..data.datasets import Split
from ..errors import UserError
from .checkpoint import load_weights, save_weights
from .trainer import Trainer, resolve_device

# keys that may differ between a run and its resumption
_VOLATILE = {("train", "progress"), ("train", "device")}


def _stable(d: dict) -> dict:
    d = json.loads(json.dumps(d))
    for sec, key in _VOLATILE:
        d.get(sec, {}).pop(key, None)
    return d


def prepare_run_dir(cfg: Config, run_dir: Path | None = None) -> Path:
    """Create the run directory and write ``config.yaml``; refuse a directory of another config."""
    run_dir = Path(run_dir or cfg.run_dir())
    cfg_file = run_dir / "config.yaml"
    if cfg_file.is_file():
        try:
            old = yaml.safe_load(cfg_file.read_text()) or {}
        except yaml.YAMLError:
            old = {}
        if _stable(old) != _stable(cfg.model_dump(mode="json")):
            raise UserError(f"run directory {run_dir} holds a run with a different config; rerun with the same "
                            f"config to resume it, or choose another directory with out=DIR (or name=NAME)")
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise UserError(f"run directory {run_dir} exists and is not a rolekd run; choose another with out=DIR")
    run_dir.mkdir(parents=True, exist_ok=True)
    if not cfg_file.is_file():
        cfg_file.write_text(dump_config(cfg))
    return run_dir


_DATA_CACHE: dict[tuple, DataBundle] = {}


def build_data(cfg: Config) -> DataBundle:
    key = (cfg.data.name, cfg.data.path, cfg.data.data_dir)
    if key not in _DATA_CACHE:
        _DATA_CACHE[key] = load_dataset(cfg.data.name, cfg.data.path, cfg.data.data_dir, cfg.data.download)
    bundle = _DATA_CACHE[key]
    if cfg.data.max_train or cfg.data.max_test:
        bundle = dataclasses.replace(
            bundle, train=bundle.train.subset(np.arange(min(cfg.data.max_train or len(bundle.train), len(bundle.train)))),
            test=bundle.test.subset(np.arange(min(cfg.data.max_test or len(bundle.test), len(bundle.test)))))
    return bundle


def data_splits(cfg: Config, bundle: DataBundle) -> tuple[Split, dict[str, Split]]:
    """Training split and evaluation splits: full = (train, {test}); reduced = (train, {val, test})."""
    if cfg.data.split == "reduced":
        train, val = reduced_split(bundle.train, cfg.data.train_size, cfg.data.val_size, cfg.data.split_seed)
        return train, {"val": val, "test": bundle.test}
    return bundle.train, {"test": bundle.test}


def build_augment(cfg: Config, bundle: DataBundle):
    from ..augment import BatchAugment

    return BatchAugment(policy=None, pad=cfg.augment.pad, flip=cfg.augment.flip, cutout=cfg.augment.cutout,
                        fill=bundle.fill)


def build_schedule(cfg: Config, epochs: int):
    """The per-epoch policy function of ``augment.schedule`` (None: base augmentation only)."""
    if not cfg.augment.schedule:
        return None
    from ..augment.schedule import Schedule

    sched = Schedule.load(cfg.augment.schedule, epochs=cfg.augment.schedule_epochs,
                          multiplier=cfg.augment.multiplier)
    if cfg.augment.fit_epochs:
        sched = sched.fit_to(epochs)
    return sched.vector_at


def build_model(cfg: Config, num_classes: int, model_name: str | None = None, quantize: bool = True):
    from ..models import create

    model = create(model_name or cfg.model.name, num_classes=num_classes, **cfg.model.kwargs)
    if quantize and (cfg.quant.w_bits != 32 or cfg.quant.a_bits != 32):
        from ..quant import quantize_model

        model = quantize_model(model, cfg.quant.w_bits, cfg.quant.a_bits)
    return model


def make_loaders(cfg: Config, bundle: DataBundle, device: torch.device, augment=None):
    train, evals = data_splits(cfg, bundle)
    cl = cfg.train.channels_last == "on" or (cfg.train.channels_last == "auto" and device.type == "cuda")
    train_loader = DeviceLoader(train, cfg.train.batch_size, bundle.mean, bundle.std, device, shuffle=True,
                                augment=augment, seed=cfg.train.seed, channels_last=cl)
    eval_loaders = {k: DeviceLoader(v, cfg.train.eval_batch_size, bundle.mean, bundle.std, device, shuffle=False,
                                    channels_last=cl) for k, v in evals.items()}
    return train_loader, eval_loaders


@dataclass
class Job:
    """Everything one training run needs, built from a config (also used by search members)."""

    cfg: Config
    bundle: DataBundle
    trainer: Trainer


def build_job(cfg: Config, run_dir: Path | None = None, policy_for_epoch=None, objective=None,
              model=None, log_name: str = "train") -> Job:
    torch.manual_seed(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    bundle = build_data(cfg)
    augment = build_augment(cfg, bundle)
    train_loader, eval_loaders = make_loaders(cfg, bundle, device, augment)
    if model is None:
        model = build_model(cfg, bundle.num_classes)
    if objective is None and cfg.kd.teacher and cfg.kd.init_from_teacher:
        init_student_from_teacher(cfg, model)
    if objective is None and cfg.kd.method:
        from ..distill.setup import kd_objective_from_config

        objective = kd_objective_from_config(cfg, bundle, train_loader, device)
    trainer = Trainer(model, train_loader, cfg.train, eval_loaders, objective=objective,
                      policy_for_epoch=policy_for_epoch or build_schedule(cfg, cfg.train.epochs),
                      run_dir=run_dir, log_name=log_name)
    return Job(cfg, bundle, trainer)


def teacher_paths(cfg: Config) -> tuple[Path, str]:
    """(weights file, model name) of ``kd.teacher``: a run directory or a .safetensors file."""
    if not cfg.kd.teacher:
        raise UserError("no teacher given: pass teacher=RUN_DIR (a finished rolekd train run) or teacher=FILE.safetensors")
    p = Path(cfg.kd.teacher).expanduser()
    name = cfg.kd.teacher_model
    if p.is_dir():
        weights = p / "model.safetensors"
        if not weights.is_file():
            raise UserError(f"teacher run {p} has no model.safetensors: finish its training first (rerun its command)")
        if name is None and (p / "config.yaml").is_file():
            name = (yaml.safe_load((p / "config.yaml").read_text()) or {}).get("model", {}).get("name")
    else:
        weights = p
        if not p.is_file():
            raise UserError(f"teacher {p} not found: give a teacher run directory or its model.safetensors")
    return weights, name or cfg.model.name


def init_student_from_teacher(cfg: Config, student) -> bool:
    """The paper initialises the (low-bit) student from its teacher when they share an architecture."""
    weights, name = teacher_paths(cfg)
    if name != cfg.model.name:
        return False
    load_weights(student, weights, what="teacher checkpoint")
    return True


def train_from_config(cfg: Config, run_dir: Path | None = None, log_name: str = "train") -> dict:
    """Train (or resume, or report) the run described by ``cfg``; returns ``result.json``'s content."""
    run_dir = prepare_run_dir(cfg, run_dir)
    result_file = run_dir / "result.json"
    if result_file.is_file():
        result = json.loads(result_file.read_text())
        print(f"{run_dir}: already finished (test acc {result.get('test_acc', float('nan')):.4f}); nothing to do")
        return result
    t0 = time.time()
    job = build_job(cfg, run_dir, log_name=log_name)
    try:
        history = job.trainer.fit()
    finally:
        job.trainer.objective.close()
    save_weights(job.trainer.model, run_dir / "model.safetensors", metadata={"model": cfg.model.name})
    last = history[-1]
    result = {"name": cfg.name, "model": cfg.model.name, "dataset": cfg.data.name, "epochs": cfg.train.epochs,
              "w_bits": cfg.quant.w_bits, "a_bits": cfg.quant.a_bits, "kd": cfg.kd.method,
              "schedule": cfg.augment.schedule,
              "test_acc": last.get("test_acc"), "best_test_acc": max(r.get("test_acc", 0.0) for r in history),
              "wall_time_s": round(time.time() - t0, 2), "device": str(job.trainer.device)}
    result_file.write_text(json.dumps(result, indent=2))
    print(f"{run_dir}: test acc {result['test_acc']:.4f} after {cfg.train.epochs} epochs")
    return result
