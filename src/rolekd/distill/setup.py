"""Config -> KD objective: load the frozen teacher, build the method, prepare it, init the student.

Used by ``rolekd distill``, KD search members and the pipeline. Within one process the frozen teacher
is loaded once per (weights file, model, device) and shared by every student (search members), and a
method's prepared parts (MHGD's attention network, trained on the teacher) are computed once and
copied into later objectives.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from ..config import Config
from ..data import DataBundle, DeviceLoader, Split
from ..errors import UserError

_TEACHERS: dict[tuple, nn.Module] = {}
_PREPARED: dict[tuple, dict] = {}
_PREPARE_SEED = 7919  # RNG of a method's own preparation (batch shuffling, initialisation, dropout)


def load_teacher(cfg: Config, num_classes: int, device: torch.device) -> tuple[nn.Module, Path, str]:
    """The frozen full-precision teacher of ``cfg.kd.teacher`` (cached per process)."""
    from ..train.checkpoint import load_weights
    from ..train.run import build_model, teacher_paths

    weights, name = teacher_paths(cfg)
    st = weights.stat()
    key = (str(weights.resolve()), st.st_mtime_ns, name, num_classes, str(device))
    if key not in _TEACHERS:
        teacher = build_model(cfg, num_classes, model_name=name, quantize=False)
        load_weights(teacher, weights, what="teacher checkpoint")
        teacher.to(device).eval().requires_grad_(False)
        _TEACHERS[key] = teacher
    return _TEACHERS[key], weights, name


class _Images:
    """Re-iterable image batches of a loader (for MHGD's preparation on the teacher)."""

    def __init__(self, loader: DeviceLoader):
        self.loader = loader

    def __iter__(self):
        return (x for x, _ in self.loader)


def kd_objective_from_config(cfg: Config, bundle: DataBundle, train_loader: DeviceLoader, device: torch.device):
    """Build the KD objective of ``cfg.kd`` (the student's initialisation from the teacher is
    :func:`rolekd.train.run.init_student_from_teacher`)."""
    from . import build_kd_objective, list_distillers

    kd = cfg.kd
    if kd.method not in list_distillers():
        raise UserError(f"unknown KD method {kd.method!r}: choose one of {', '.join(list_distillers())}")
    teacher, weights, _ = load_teacher(cfg, bundle.num_classes, device)
    kwargs = dict(lam=kd.lam, lam_decay=kd.lam_decay, lam_decay_every=kd.lam_decay_every, clip=kd.clip,
                  clip_e0=kd.clip_e0)
    if kd.method == "soft":
        kwargs["T"] = kd.T
    if kd.method in ("mhgd", "iikd"):
        kwargs["prepare_epochs"] = kd.prepare_epochs
    if kd.method == "dml":
        teacher = copy.deepcopy(teacher)  # DML trains its own copy of the teacher
    objective = build_kd_objective(kd.method, teacher, **kwargs)
    if objective.needs_prepare:
        # it depends only on the teacher, the method and the data (its own fixed shuffling seed), so it is
        # prepared once per process and shared, e.g. by all search members
        pkey = (str(weights.resolve()), weights.stat().st_mtime_ns, kd.method, kd.prepare_epochs,
                cfg.data.model_dump_json(), cfg.train.batch_size, str(device))
        if pkey in _PREPARED:
            objective.distiller.load_state_dict(_PREPARED[pkey])
        else:
            prep = DeviceLoader(Split(train_loader.images, train_loader.labels), cfg.train.batch_size, bundle.mean, bundle.std,
                                device, shuffle=True, seed=_PREPARE_SEED,
                                channels_last=train_loader.channels_last)
            # its own RNG too (attention initialisation, dropout): the same result whether it is prepared
            # here or reused from an earlier stage of the same process, e.g. after a resume
            cuda = [device] if device.type == "cuda" else []
            with torch.random.fork_rng(devices=cuda, device_type="cuda"):
                torch.manual_seed(_PREPARE_SEED)
                objective.prepare(_Images(prep), epochs=kd.prepare_epochs)
            _PREPARED[pkey] = {k: v.detach().clone() for k, v in objective.distiller.state_dict().items()}
    return objective

