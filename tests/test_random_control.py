"""A random schedule matched to a learned one epoch by epoch (``Schedule.matched_random``,
``augment.matched_random_seed``)."""

import numpy as np
import pytest
from scipy import stats

from rolekd.augment.schedule import Schedule
from rolekd.cli import main
from rolekd.config import load_config
from rolekd.errors import UserError

N_SLOTS = 30  # PBA's policy: 2 halves x 15 ops, each slot (probability 0..10, magnitude 0..9)


def counts(policies) -> list[int]:
    """Per epoch, the slots with a probability above 0 (probabilities at the even positions of the 60 ints)."""
    return [sum(1 for i in range(0, 60, 2) if p[i] > 0) for p in policies]


def learned(active: list[int], seed: int) -> Schedule:
    """A stand-in for a learned schedule with ``active[e]`` active slots in epoch ``e``: the first slots
    active, probabilities and magnitudes all 7 (so a random schedule is unlikely to equal it by chance),
    inactive slots with magnitude 5 (as explore leaves them)."""
    pols = []
    for k in active:
        p = [0, 5] * N_SLOTS
        for s in range(k):
            p[2 * s], p[2 * s + 1] = 7, 7
        pols.append(p)
    return Schedule(pols, source=f"learned-{seed}")


# ---------------------------------------------------------------------------------- the schedule itself
def test_matched_random_schedule_has_the_learned_active_slots_per_epoch_and_its_own_draws():
    active = [0, 1, 7, 30, 15, 0, 2]
    sched = learned(active, 0)
    rnd = sched.matched_random(3)
    pols = rnd.policies
    assert counts(pols) == active  # as many active slots in every epoch, an epoch without ops included
    for p in pols:
        assert all(1 <= p[i] <= 10 for i in range(0, 60, 2) if p[i] > 0)  # probability 1..10 where active
        assert all(0 <= p[i] <= 9 for i in range(1, 60, 2))  # magnitudes 0..9
        assert all(p[i + 1] == 0 for i in range(0, 60, 2) if p[i] == 0)  # an inactive slot is all zero
    assert rnd != sched
    assert rnd == sched.matched_random(3)  # seeded
    assert rnd != sched.matched_random(4)
    assert rnd.meta["seed"] == 3
    # the draws do not depend on which slots the learned schedule used, only on how many
    shuffled = [p[2 * 20:] + p[:2 * 20] for p in sched.policies]  # the same counts in other slots
    assert Schedule(shuffled, source=sched.source).matched_random(3) == rnd


def test_matched_random_draws_slots_probabilities_and_magnitudes_uniformly():
    """Slots without replacement and uniform over the 30; probabilities uniform over 1..10 (never 0),
    magnitudes over 0..9 (chi-square against the uniform; a fixed seed, so no flakiness), whatever slots
    the learned schedule used (here always the first five)."""
    k, epochs = 5, 3000
    rnd = learned([k] * epochs, 0).matched_random(11)
    slots = np.zeros(N_SLOTS)
    probs, mags = np.zeros(11), np.zeros(10)
    for p in rnd.policies:
        for s in range(N_SLOTS):
            if p[2 * s] > 0:
                slots[s] += 1
                probs[p[2 * s]] += 1
                mags[p[2 * s + 1]] += 1
    assert slots.sum() == k * epochs and probs[0] == 0
    for observed in (slots, probs[1:], mags):
        assert stats.chisquare(observed).pvalue > 1e-3, observed


def test_a_schedule_without_ops_and_a_seed_without_a_schedule_are_one_user_error_line(tmp_path, capsys):
    with pytest.raises(UserError, match="no op has a probability above 0 in any of its 3 epochs") as e:
        Schedule([[0] * 60] * 3, source="empty.json").matched_random(0)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"augment.*matched_random_seed is set but augment.schedule is not"):
        load_config(None, ["augment.matched_random_seed=1"])
    empty = tmp_path / "empty.json"
    Schedule([[0] * 60] * 2).save(empty)
    run = tmp_path / "run"
    assert main(["train", f"schedule={empty}", "augment.matched_random_seed=1", "epochs=1", f"out={run}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rolekd: error: ") and "no op has a probability above 0" in err[0]
    assert not (run / "config.yaml").exists()
