"""Search members and the local executor.

A :class:`Member` is one trainer of the population plus the policy it trains with. Its trainer is made
by a *member factory* ``factory(member_config, index, policy_for_epoch) -> Trainer`` that the caller
gives (the experiment layer's, so a member has the data pipeline, augmentation and KD objective of
ordinary runs). Its randomness is its own: the loader generator lives in its trainer, and the trainer
keeps its own torch random streams (``own_rng``), so members trained one after another in one process
draw exactly what they would draw each in a process of its own (the Ray executor), and an exploit
copies weights and optimizer state but never the random streams.

An *executor* runs the population. Its interface is what the controller needs and nothing more, so
that a batched executor (several members at once on one GPU) can slot in:

* ``start(configs)`` -- build members ``{index: member config}``;
* ``train(policies, epochs)`` -- train each member ``{index: policy}`` for ``epochs`` epochs and
  return ``{index: Outcome}`` (per-epoch rows with ``val_acc``, or the error that stopped it);
* ``exploit(pairs)`` -- for each ``(source, target)``, copy the source's weights, optimizer and
  objective state (not its random streams) into the target;
* ``snapshot(ids)`` / ``restore(index)`` -- remember the current state as the last good one / go
  back to it (random streams included);
* ``saved_states(ids)`` / ``load_states(states)`` -- the last good states as CPU tensors (to save to
  disk) / load saved states (resume);
* ``close()``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from ..augment.space import validate_policy
from ..config import Config, KDConfig, derive
from ..errors import UserError
from ..train import Trainer
from .pbt import ZERO_POLICY

MemberFactory = Callable[[Config, int, Callable[[int], Sequence[int]]], Trainer]


def member_seed(search_seed: int, index: int) -> int:
    """Member ``index``'s training seed, derived from the search seed (independent streams)."""
    return int(np.random.SeedSequence([int(search_seed), int(index)]).generate_state(1)[0] & 0x7FFFFFFF)


def member_config(cfg: Config, index: int) -> Config:
    """The training config of member ``index`` of the search ``cfg``.

    The search's data split (reduced); one run of ``search.epochs`` epochs (the LR schedule spans the
    search); the member's own seed; evaluation every ``search.eval_every`` epochs (default: only at the
    end of each round, where the controller reads the reward); no schedule file (the controller sets
    the policy); no per-step progress bar. Role ``teacher`` trains plainly (KD settings dropped); role ``student`` keeps ``kd``
    and ``quant``.
    """
    return derive(cfg, f"search member {index}",
                  train={"epochs": cfg.search.epochs, "seed": member_seed(cfg.search.seed, index), "progress": False,
                         "eval_every": cfg.search.eval_every or cfg.search.epochs},
                  augment={"schedule": None, "schedule_epochs": None, "matched_random_seed": None},
                  **({"kd": KDConfig()} if cfg.search.role == "teacher" else {}))


def clone_state(obj: Any, device: torch.device | str | None = None) -> Any:
    """A deep copy of a (nested) state whose tensors are cloned (and moved to ``device`` if given)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        return t.to(device, copy=True) if device is not None else t.clone()
    if isinstance(obj, Mapping):
        return {k: clone_state(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [clone_state(v, device) for v in obj]
    if isinstance(obj, tuple):
        return tuple(clone_state(v, device) for v in obj)
    return obj


@dataclass
class Outcome:
    """What one member's round produced: per-epoch rows, or the error that stopped it."""

    rows: list[dict] = field(default_factory=list)
    error: str | None = None
    train_s: float = 0.0
    eval_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def reward(self) -> float:
        return float(self.rows[-1]["val_acc"])

    @classmethod
    def of_rows(cls, rows: list[dict]) -> "Outcome":
        """A round's outcome from its per-epoch metrics rows (their ``train_time_s`` and ``eval_s`` summed)."""
        return cls(rows=rows, train_s=sum(r["train_time_s"] for r in rows),
                   eval_s=sum(r.get("eval_s", 0.0) for r in rows))


class Member:
    """One population member: a trainer built by the member factory, its policy and last good state."""

    def __init__(self, factory: MemberFactory, cfg: Config, index: int, share_with: "Member | None" = None):
        self.index = int(index)
        self.cfg = cfg
        self.policy: list[int] = list(ZERO_POLICY)
        self.trainer = factory(cfg, self.index, lambda epoch: self.policy)
        if "val" not in self.trainer.eval_loaders:
            raise UserError("the search needs the reduced split's validation set: data.split=reduced")
        if share_with is not None:
            self._share_data(share_with)
        self.good: dict | None = None  # last good state (see snapshot/restore)

    def _share_data(self, other: "Member") -> None:
        """Use ``other``'s device tensors of the (identical) reduced split instead of our own copies."""
        mine, theirs = self.trainer.train_loader, other.trainer.train_loader
        if (mine.num_samples != theirs.num_samples or mine.device != theirs.device
                or not torch.equal(mine.labels, theirs.labels)):
            return
        mine.images, mine.labels = theirs.images, theirs.labels
        self.trainer.eval_loaders = dict(other.trainer.eval_loaders)  # unshuffled, no augmentation: stateless

    # ------------------------------------------------------------------------------ training
    def train(self, epochs: int, policy: Sequence[int]) -> Outcome:
        """Train ``epochs`` epochs with ``policy``, evaluating the validation split where the trainer's
        rule says (at least after the last epoch: the reward). Raises
        :class:`rolekd.train.NonFiniteLoss` on a NaN/inf loss."""
        self.policy = validate_policy(policy)
        return Outcome.of_rows(self.trainer.run_epochs(int(epochs), splits=["val"], check_finite=True, progress=False))

    def evaluate(self, split: str = "test") -> dict:
        with self.trainer.rng_scope():
            return self.trainer.evaluate(self.trainer.eval_loaders[split])

    # ------------------------------------------------------------------------------ state
    def state(self, device: torch.device | str | None = None) -> dict:
        """A deep copy of the trainer state (with this member's own random streams)."""
        return clone_state(self.trainer.state_dict(), device)

    def load_state(self, state: dict, rng: bool = True) -> None:
        """Load a state (deep-copied first: a loaded optimizer must never alias another member's
        buffers). ``rng=False`` keeps this member's random streams (an exploit)."""
        self.trainer.load_state_dict(clone_state(state), rng=rng)

    def snapshot(self) -> None:
        self.good = self.state()

    def restore(self) -> None:
        if self.good is None:
            raise RuntimeError(f"member {self.index} has no saved state to restore")
        self.load_state(self.good, rng=True)


def error_outcome(e: BaseException) -> Outcome:
    """The failed :class:`Outcome` of a member stopped by ``e``."""
    return Outcome(error=f"{type(e).__name__}: {e}")


def run_member(member: Member, epochs: int, policy: Sequence[int]) -> Outcome:
    """Train one member, turning any failure except bad user input into a failed :class:`Outcome`."""
    try:
        return member.train(epochs, policy)
    except (UserError, torch.OutOfMemoryError):  # bad input, or a device too small for the search: not the member's
        raise
    except Exception as e:  # a member's failure must not stop the search
        return error_outcome(e)


class LocalExecutor:
    """All members on this machine's device, in this process, trained one after another."""

    name = "local"

    def __init__(self, factory: MemberFactory) -> None:
        self.factory = factory
        self.members: dict[int, Member] = {}

    def start(self, configs: Mapping[int, Config]) -> None:
        first = None
        for i, c in configs.items():
            m = Member(self.factory, c, i, share_with=first)
            first = first or m
            self.members[int(i)] = m

    @property
    def device(self) -> str:
        m = next(iter(self.members.values()), None)
        return str(m.trainer.device) if m is not None else "?"

    def train(self, policies: Mapping[int, Sequence[int]], epochs: int) -> dict[int, Outcome]:
        return {int(i): run_member(self.members[int(i)], epochs, pol) for i, pol in policies.items()}

    def exploit(self, pairs: Sequence[tuple[int, int]]) -> None:
        states: dict[int, dict] = {}
        for src, dst in pairs:
            if src not in states:
                states[src] = self.members[src].state()
            self.members[dst].load_state(states[src], rng=False)

    def snapshot(self, ids: Sequence[int] | None = None) -> None:
        for i in (self.members if ids is None else ids):
            self.members[i].snapshot()

    def restore(self, index: int) -> None:
        self.members[index].restore()

    def saved_states(self, ids: Sequence[int] | None = None) -> dict[int, dict]:
        out = {}
        for i in (self.members if ids is None else ids):
            m = self.members[i]
            out[i] = clone_state(m.good if m.good is not None else m.state(), "cpu")
        return out

    def load_states(self, states: Mapping[int, dict]) -> None:
        for i, s in states.items():
            self.members[int(i)].load_state(s, rng=True)
        self.snapshot(list(states))

    def evaluate(self, index: int, split: str = "test") -> dict:
        return self.members[index].evaluate(split)

    def close(self) -> None:
        for m in self.members.values():
            m.trainer.objective.close()
        self.members.clear()
