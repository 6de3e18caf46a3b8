"""The population-based-training controller of PBA (Ho et al. 2019), as pure logic.

No training happens here: the controller holds every member's current policy, its per-epoch policy
history (its *lineage*), its latest reward, the PBT logs, and one seeded numpy ``Generator`` that
makes every random choice. The search loop (:mod:`rolekd.search.run`) trains members in lock-step
rounds and calls :meth:`PBTController.perturb` between rounds.

The rules, as in Ray Tune's ``PopulationBasedTraining`` (the version PBA used) and PBA's ``explore``:

* **ranking** -- members with a reward are sorted by it, ascending, with a *stable* sort (ties keep
  member order). The quantile size is ``ceil(n * quantile)``, lowered to ``floor(n / 2)`` when it
  is more than half the population; the bottom quantile is the first that many, the top quantile
  the last that many. Fewer than two ranked members: nothing happens.
* **exploit** -- each bottom member (in member order) copies a member of the top quantile chosen
  uniformly at random: weights, optimizer state and policy, and the clone's lineage so far.
* **explore** -- each of the 60 ints of the copied policy is, with probability ``resample_prob``,
  resampled uniformly (probabilities 0..10 at even positions, magnitudes 0..9 at odd ones);
  otherwise a step drawn uniformly from {0, 1, 2, 3} is subtracted or added with equal chance and
  the result clipped to the range. Draw order per int: one uniform for the resample test, then
  either the resampled value, or the step followed by one uniform for the direction.
* **logs** -- Ray Tune's PBT format: each exploit is one JSON line
  ``[target, clone, target_iter, clone_iter, {"hp_policy": clone's policy}, {"hp_policy": new}]``
  (member names as strings) appended to the global log; the target's own log is replaced by a copy
  of the clone's log and the line appended, so every member's log is one unbroken chain that
  PBA's ``parse_log_schedule`` (and :meth:`rolekd.augment.schedule.Schedule.load`) turns back into
  the member's lineage. (Ray keeps the target's old lines when the clone has no log file yet;
  the parsers drop such a prefix, so the schedules read back are the same.)
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np

from ..augment.schedule import format_pbt_line
from ..augment.space import MAX_LEVEL, MAX_PROB, POLICY_LEN, validate_policy

ZERO_POLICY: tuple[int, ...] = (0,) * POLICY_LEN


def quantile_size(n: int, fraction: float) -> int:
    """Members in each of the bottom / top quantiles of ``n`` ranked members (Ray Tune's rule)."""
    if n <= 1:
        return 0
    k = int(math.ceil(n * fraction))
    if k > n / 2:
        k = int(math.floor(n / 2))
    return k


def rank(rewards: Mapping[int, float | None] | Sequence[float | None], fraction: float
         ) -> tuple[list[int], list[int]]:
    """``(bottom, top)`` member ids; members whose reward is None are left out of the ranking."""
    items = rewards.items() if isinstance(rewards, Mapping) else enumerate(rewards)
    ranked = [i for i, r in items if r is not None]
    ranked.sort(key=lambda i: rewards[i])  # stable: ties keep member order
    k = quantile_size(len(ranked), fraction)
    if k == 0:
        return [], []
    return ranked[:k], ranked[-k:]


def explore(policy: Sequence[int], rng: np.random.Generator, resample_prob: float = 0.2) -> list[int]:
    """PBA's explore step on a 60-int policy (see the module docstring for the exact rule)."""
    old = validate_policy(policy)
    out = []
    for i, v in enumerate(old):
        hi = MAX_PROB if i % 2 == 0 else MAX_LEVEL
        if rng.random() < resample_prob:
            out.append(int(rng.integers(0, hi + 1)))
        else:
            step = int(rng.integers(0, 4))
            if rng.random() < 0.5:
                out.append(max(0, v - step))
            else:
                out.append(min(hi, v + step))
    return out


def policy_string(policy: Sequence[int]) -> str:
    """A compact 60-character form: one character per int, ``a`` for 10."""
    return "".join("0123456789a"[int(v)] for v in policy)


def parse_policy_string(text: str) -> list[int]:
    return validate_policy(["0123456789a".index(c) for c in text])


@dataclass
class Exploit:
    """One exploit/explore step: ``target`` took ``clone``'s state after ``epoch`` epochs."""

    target: int
    clone: int
    epoch: int
    old_policy: list[int]
    new_policy: list[int]
    reason: str = "exploit"  # exploit | replace (a failed member replaced by a top member)


class PBTController:
    """Policies, lineages, rewards, logs and the random stream of one PBT search."""

    def __init__(self, population: int, quantile: float = 0.25, resample_prob: float = 0.2, seed: int = 0,
                 init_policy: Sequence[int] = ZERO_POLICY):
        if population < 2:
            raise ValueError(f"a PBT population needs at least 2 members, got {population}")
        self.population = int(population)
        self.quantile = float(quantile)
        self.resample_prob = float(resample_prob)
        self.seed = int(seed)
        self.rng = np.random.Generator(np.random.PCG64(self.seed))
        init = validate_policy(init_policy)
        self.policies: list[list[int]] = [list(init) for _ in range(self.population)]
        self.history: list[list[list[int]]] = [[] for _ in range(self.population)]  # policy per trained epoch
        self.rewards: list[float | None] = [None] * self.population
        self.member_logs: list[list[str]] = [[] for _ in range(self.population)]  # pbt_policy_<i>.txt lines
        self.global_log: list[str] = []  # pbt_global.txt lines
        self.exploits: list[Exploit] = []

    # ------------------------------------------------------------------------------ bookkeeping
    def record(self, member: int, epochs: int, reward: float) -> None:
        """``member`` trained ``epochs`` more epochs with its current policy and reached ``reward``."""
        self.history[member].extend([list(self.policies[member]) for _ in range(int(epochs))])
        self.rewards[member] = float(reward)

    def invalidate(self, member: int) -> None:
        """Forget ``member``'s reward (it failed this round); it is replaced at the next perturb."""
        self.rewards[member] = None

    def best(self) -> int:
        """The member with the highest latest reward (ties: the later one, as Ray's top quantile)."""
        ranked = [i for i in range(self.population) if self.rewards[i] is not None]
        if not ranked:
            raise RuntimeError("no member has a reward")
        ranked.sort(key=lambda i: self.rewards[i])
        return ranked[-1]

    def quantiles(self) -> tuple[list[int], list[int]]:
        return rank(self.rewards, self.quantile)

    # ------------------------------------------------------------------------------ PBT step
    def perturb(self, epoch: int, failed: Iterable[int] = ()) -> list[Exploit]:
        """Rank, then exploit + explore the bottom quantile and every ``failed`` member.

        ``epoch`` is the number of epochs every member has trained (the log's iterations). Returns
        the steps to apply to the members' weights, in order; policies, lineages and logs are
        already updated here.
        """
        failed = sorted(set(int(i) for i in failed))
        for i in failed:
            self.rewards[i] = None
        bottom, top = self.quantiles()
        if failed and not top:
            ranked = [i for i in range(self.population) if self.rewards[i] is not None]
            if not ranked:
                raise RuntimeError("every member of the population failed in this round")
            top = [self.best()]
        targets = sorted(set(bottom) | set(failed))
        steps = []
        for t in targets:
            clone = int(top[int(self.rng.integers(len(top)))])
            steps.append(self._exploit(t, clone, epoch, "replace" if t in failed else "exploit"))
        return steps

    def _exploit(self, target: int, clone: int, epoch: int, reason: str) -> Exploit:
        if target == clone:
            raise RuntimeError(f"member {target} cannot exploit itself")
        old = list(self.policies[clone])
        new = explore(old, self.rng, self.resample_prob)
        line = format_pbt_line([str(target), str(clone), int(epoch), int(epoch), {"hp_policy": old},
                                {"hp_policy": new}])
        self.global_log.append(line)
        self.member_logs[target] = list(self.member_logs[clone]) + [line]
        self.history[target] = copy.deepcopy(self.history[clone])
        self.policies[target] = new
        self.rewards[target] = self.rewards[clone]
        step = Exploit(target, clone, int(epoch), old, new, reason)
        self.exploits.append(step)
        return step

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """A JSON-serialisable snapshot (the numpy generator state included)."""
        return {
            "population": self.population, "quantile": self.quantile, "resample_prob": self.resample_prob,
            "seed": self.seed, "rng": self.rng.bit_generator.state,
            "policies": self.policies, "history": self.history, "rewards": self.rewards,
            "member_logs": self.member_logs, "global_log": self.global_log,
            "exploits": [asdict(e) for e in self.exploits],
        }

    def load_state_dict(self, state: Mapping) -> None:
        if int(state["population"]) != self.population:
            raise ValueError(f"saved search has population {state['population']}, this one {self.population}")
        self.quantile = float(state["quantile"])
        self.resample_prob = float(state["resample_prob"])
        self.seed = int(state["seed"])
        self.rng = np.random.Generator(np.random.PCG64())
        self.rng.bit_generator.state = state["rng"]
        self.policies = [validate_policy(p) for p in state["policies"]]
        self.history = [[list(p) for p in h] for h in state["history"]]
        self.rewards = [None if r is None else float(r) for r in state["rewards"]]
        self.member_logs = [list(x) for x in state["member_logs"]]
        self.global_log = list(state["global_log"])
        self.exploits = [Exploit(**e) for e in state["exploits"]]
