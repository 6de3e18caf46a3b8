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
* **settings for small budgets** (each off by default, which is PBA's behaviour; docs/RECIPE.md lists them as
  departures): ``reward_window=W`` ranks members, and picks the final best, by the mean of each member's last
  ``W`` round rewards; an exploited member inherits its clone's reward history with its weights, so one round
  of a new policy's short-term cost does not send it straight back to the bottom quantile. ``init="random"``
  starts every member from its own random policy (each of the 60 ints uniform over its range, as PBA's
  explore resamples it), drawn from a generator of its own seeded by ``seed``, so the explore stream is the
  same as with the all-zero start. ``burn_in=E``: no exploit before every member has trained ``E`` epochs.
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
    """``(bottom, top)`` member ids; members whose reward (or score) is None are left out of the ranking."""
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


def random_policy(rng: np.random.Generator) -> list[int]:
    """A policy with each of the 60 ints drawn uniformly over its range (PBA's explore resampling every int)."""
    return explore(ZERO_POLICY, rng, resample_prob=1.0)


def init_generator(seed: int) -> np.random.Generator:
    """The generator of a search's random initial policies: its own stream, derived from the search seed."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), 0x1217])))


# perturbation rounds below which a search warns that it is too short to learn: the first evidence study's
# searches had 9 and learned nothing useful; the lead had 39, PBA's ~66 (benchmarks/evidence/SEARCH.md)
MIN_ROUNDS = 10


def perturbation_rounds(epochs: int, interval: int, burn_in: int = 0) -> int:
    """How many times a search of ``epochs`` epochs perturbs (rounds end every ``interval`` epochs; none
    after the last epoch, none before ``burn_in``)."""
    ends = range(interval, epochs, interval)  # the epochs after which perturb() runs
    return sum(1 for e in ends if e >= burn_in)


def too_short(epochs: int, interval: int, burn_in: int = 0) -> str | None:
    """One line when a search has fewer than MIN_ROUNDS perturbation rounds, else None."""
    n = perturbation_rounds(epochs, interval, burn_in)
    if n >= MIN_ROUNDS:
        return None
    return (f"this search perturbs its policies only {n} time(s) ({epochs} epochs, every {interval}"
            f"{f', after a burn-in of {burn_in}' if burn_in else ''}): a schedule grows from its start only through "
            f"exploits, and the first evidence study's 9-round searches learned nothing useful "
            f"(benchmarks/evidence/SEARCH.md; PBA's run ~66 rounds). Raise search.epochs (to the retraining's "
            f"epochs) or lower search.perturb_interval")


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
                 init_policy: Sequence[int] = ZERO_POLICY, *, init: str = "zero", reward_window: int = 1,
                 burn_in: int = 0):
        if population < 2:
            raise ValueError(f"a PBT population needs at least 2 members, got {population}")
        if init not in ("zero", "random"):
            raise ValueError(f"init must be 'zero' or 'random', got {init!r}")
        if int(reward_window) < 1 or int(burn_in) < 0:
            raise ValueError(f"reward_window must be >= 1 and burn_in >= 0, got {reward_window}, {burn_in}")
        self.population = int(population)
        self.quantile = float(quantile)
        self.resample_prob = float(resample_prob)
        self.seed = int(seed)
        self.init = init
        self.reward_window = int(reward_window)
        self.burn_in = int(burn_in)
        self.rng = np.random.Generator(np.random.PCG64(self.seed))
        if init == "random":
            g = init_generator(self.seed)
            self.policies: list[list[int]] = [random_policy(g) for _ in range(self.population)]
        else:
            self.policies = [list(validate_policy(init_policy)) for _ in range(self.population)]
        self.history: list[list[list[int]]] = [[] for _ in range(self.population)]  # policy per trained epoch
        self.rewards: list[float | None] = [None] * self.population
        # each member's round rewards, its clones' before it was exploited included (the reward_window mean)
        self.reward_history: list[list[float]] = [[] for _ in range(self.population)]
        self.member_logs: list[list[str]] = [[] for _ in range(self.population)]  # pbt_policy_<i>.txt lines
        self.global_log: list[str] = []  # pbt_global.txt lines
        self.exploits: list[Exploit] = []

    # ------------------------------------------------------------------------------ bookkeeping
    def record(self, member: int, epochs: int, reward: float) -> None:
        """``member`` trained ``epochs`` more epochs with its current policy and reached ``reward``."""
        self.history[member].extend([list(self.policies[member]) for _ in range(int(epochs))])
        self.rewards[member] = float(reward)
        self.reward_history[member].append(float(reward))

    def invalidate(self, member: int) -> None:
        """Forget ``member``'s reward (it failed this round); it is replaced at the next perturb."""
        self.rewards[member] = None

    def scores(self) -> list[float | None]:
        """What members are ranked by: the mean of each member's last ``reward_window`` round rewards (its
        latest reward when the window is 1, PBA's rule); None for a member without a valid reward."""
        out: list[float | None] = []
        for r, hist in zip(self.rewards, self.reward_history):
            if r is None:
                out.append(None)
            elif self.reward_window == 1 or not hist:
                out.append(r)
            else:
                recent = hist[-self.reward_window:]
                out.append(float(sum(recent) / len(recent)))
        return out

    def best(self) -> int:
        """The member with the highest score (ties: the later one, as Ray's top quantile)."""
        scores = self.scores()
        ranked = [i for i in range(self.population) if scores[i] is not None]
        if not ranked:
            raise RuntimeError("no member has a reward")
        ranked.sort(key=lambda i: scores[i])
        return ranked[-1]

    def quantiles(self) -> tuple[list[int], list[int]]:
        return rank(self.scores(), self.quantile)

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
        if epoch < self.burn_in:
            bottom = []  # burn-in: no exploit yet (a failed member is still replaced)
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
        self.reward_history[target] = list(self.reward_history[clone])
        step = Exploit(target, clone, int(epoch), old, new, reason)
        self.exploits.append(step)
        return step

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """A JSON-serialisable snapshot (the numpy generator state included)."""
        return {
            "population": self.population, "quantile": self.quantile, "resample_prob": self.resample_prob,
            "seed": self.seed, "rng": self.rng.bit_generator.state, "init": self.init,
            "reward_window": self.reward_window, "burn_in": self.burn_in, "reward_history": self.reward_history,
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
        for key in ("init", "reward_window", "burn_in"):  # a state saved before these settings: PBA's
            saved = state.get(key, {"init": "zero", "reward_window": 1, "burn_in": 0}[key])
            if saved != getattr(self, key):
                raise ValueError(f"saved search has {key}={saved!r}, this one {getattr(self, key)!r}")
        self.reward_history = [[float(x) for x in h] for h in state.get(
            "reward_history", [[] if r is None else [r] for r in self.rewards])]
        self.member_logs = [list(x) for x in state["member_logs"]]
        self.global_log = list(state["global_log"])
        self.exploits = [Exploit(**e) for e in state["exploits"]]
