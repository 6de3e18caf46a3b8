#!/usr/bin/env python3
"""Why did the evidence study's PBA searches learn nothing useful? (issue 31, the diagnosis)

    python benchmarks/evidence/search_diagnosis.py [--run benchmarks/evidence/run] \
        [--out benchmarks/evidence/figures] [--fixtures ../shared/fixtures] [--json FILE]

Reads only the committed logs of the study's two searches (``<run>/alpha_search``, ``<run>/beta_search``:
``rewards.csv``, ``pbt_global.txt``, ``schedule.json``, ``search.json``, ``config.yaml``) and, for contrast,
the role-wise KD authors' released 16-member student-search logs and PBA's published schedule
(``<fixtures>/role-kd``, ``<fixtures>/pba``). It imports neither torch nor rolekd: the controller's rules
(``src/rolekd/search/pbt.py``) are re-stated here where they are needed (the stable ascending sort, the
quantile size, "best" = the later member among ties) and checked against the logs.

For each search and each round (the reward is the validation accuracy at a round's end) it measures

1. the members' spread (sd, range, the gap between the top quantile's worst and the bottom quantile's best)
   against the reward's binomial sampling error, SE = sqrt(p(1-p)/n_val), and the SE of a difference of two
   members (sqrt 2 x SE); and an empirical estimate of the noise from the round-to-round change of the
   members' offsets from the round mean (members that kept their weights and policy);
2. how many exploits copied a member whose lead over the exploited one was within 1 / 2 SE of a difference;
3. what an exploited member got in the round after it took its new (perturbed) policy: its reward minus its
   clone source's (same weights at the round's start, the clone kept its own policy) and minus the round
   median, its rank, whether it fell straight back into the bottom quantile; active op slots
   (probability > 0, of 30) against the rank of the round the policy was trained in;
4. the lineage of the final best member (when it first took ops, active slots per epoch);
5. the authors' log: exploits per member and per 3-epoch round, how long each final lineage is all-zero.

It prints Markdown tables (the numbers in ``SEARCH.md``) and draws ``search_diagnosis.png`` and
``search_lineage.png`` in ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import numpy as np
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SEARCHES = (("alpha_search", "α search (teacher role)"), ("beta_search", "β search (student role, II-KD)"))
SLOTS = 30  # 2 halves x 15 ops; slot k's probability is policy[2k] / 10
# two-sided 95% Student t quantiles, df 1..30
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


# ---------------------------------------------------------------------------------------------- helpers
def t975(df: int) -> float:
    return T975[df - 1] if 1 <= df <= len(T975) else 1.96


def mean_ci(x) -> tuple[float, float, float]:
    """Mean and its 95% t interval."""
    x = np.asarray(x, float)
    m = float(x.mean())
    if len(x) < 2:
        return m, float("nan"), float("nan")
    h = t975(len(x) - 1) * float(x.std(ddof=1)) / math.sqrt(len(x))
    return m, m - h, m + h


def ranks_avg(x) -> np.ndarray:
    """Ranks 1..n of x (ascending), ties averaged."""
    x = np.asarray(x, float)
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        idx = x == v
        if idx.sum() > 1:
            r[idx] = r[idx].mean()
    return r


def fmt_p(p: float) -> str:
    """A permutation p-value as printed: "= 0.005", or "< 0.001" where no permutation reached the statistic."""
    return "< 0.001" if p < 0.001 else f"= {p:.3f}"


def spearman(x, y, n_perm: int = 20000, seed: int = 0) -> tuple[float, float]:
    """Spearman's rho and a two-sided permutation p-value."""
    rx, ry = ranks_avg(x), ranks_avg(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan"), float("nan")
    rho = float(np.corrcoef(rx, ry)[0, 1])
    rng = np.random.default_rng(seed)
    perm = np.array([np.corrcoef(rx, rng.permutation(ry))[0, 1] for _ in range(n_perm)])
    p = float((np.abs(perm) >= abs(rho) - 1e-12).mean())
    return rho, p


def read_yaml_2level(path: Path) -> dict:
    """The scalar keys of a two-level YAML file as {'section.key': value} (enough for config.yaml)."""
    out, section = {}, None
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        indent = len(line) - len(line.lstrip())
        key, _, val = line.strip().partition(":")
        val = val.split(" #")[0].strip()
        if indent == 0:
            section = key
            if val:
                out[key] = val
        elif indent == 2 and section is not None and val:
            out[f"{section}.{key}"] = val
    return out


def pol_of(s: str) -> list[int]:
    return ["0123456789a".index(c) for c in s]


def slots(policy) -> int:
    """Active op slots: entries with probability > 0 (even positions)."""
    return sum(1 for k in range(0, len(policy), 2) if int(policy[k]) > 0)


def quantile_size(n: int, fraction: float) -> int:  # pbt.py's rule
    if n <= 1:
        return 0
    k = int(math.ceil(n * fraction))
    if k > n / 2:
        k = int(math.floor(n / 2))
    return k


def controller_order(rewards: dict[int, float]) -> list[int]:
    """Members sorted ascending by reward, stable (ties keep member order): pbt.py's ranking."""
    return sorted(sorted(rewards), key=lambda m: rewards[m])


def parse_pbt_line(text: str):
    try:
        return json.loads(text)
    except ValueError:  # PBA's Python-literal lines (single quotes)
        return json.loads(text.replace("'", '"'))


def policy_field(cfg):
    return list(cfg["hp_policy"]) if isinstance(cfg, dict) else list(cfg)


def pba_lineage(lines: list[str], epochs: int) -> list[list[int]]:
    """One trial's PBT log -> its per-epoch policies (PBA's parse_log_schedule, multiplier 1)."""
    rows = [parse_pbt_line(l) for l in lines if l.strip()]
    first = 0
    for i in range(len(rows) - 1):
        if str(rows[i][0]) != str(rows[i + 1][1]):
            first = i + 1
    rows = rows[first:]
    segs = [(int(rows[0][3]), policy_field(rows[0][4]))]
    for i in range(len(rows) - 1):
        segs.append((int(rows[i + 1][3]) - int(rows[i][3]), policy_field(rows[i][5])))
    segs.append((epochs - int(rows[-1][3]), policy_field(rows[-1][5])))
    out = []
    for n, p in segs:
        out.extend([p] * n)
    return out


# ---------------------------------------------------------------------------------------------- one search
def load_search(d: Path) -> dict:
    cfg = read_yaml_2level(d / "config.yaml")
    n_val = int(cfg["data.val_size"])
    pop = int(cfg["search.population"])
    epochs = int(cfg["search.epochs"])
    interval = int(cfg["search.perturb_interval"])
    quant = float(cfg["search.quantile"])
    n_rounds = math.ceil(epochs / interval)
    R = np.full((n_rounds + 1, pop), np.nan)  # R[r, m], rounds 1-based
    P: dict[tuple[int, int], str] = {}  # policy trained in round r
    train_acc = np.full((n_rounds + 1, pop), np.nan)
    with open(d / "rewards.csv") as f:
        for row in csv.DictReader(f):
            e, m = int(row["epoch"]), int(row["member"])
            r = (e - 1) // interval + 1
            if (r, m) in P and P[(r, m)] != row["policy"]:
                raise SystemExit(f"{d}: member {m} changed policy inside round {r}")
            P[(r, m)] = row["policy"]
            if row["val_acc"] != "":
                if e != min(r * interval, epochs):
                    raise SystemExit(f"{d}: val_acc at epoch {e}, not at a round's end")
                R[r, m] = float(row["val_acc"])
            if e == min(r * interval, epochs) and row["train_acc"] != "":
                train_acc[r, m] = float(row["train_acc"])
    exploits = []
    for line in (d / "pbt_global.txt").read_text().splitlines():
        if not line.strip():
            continue
        t, c, ti, ci, old, new = parse_pbt_line(line)
        exploits.append({"target": int(t), "clone": int(c), "epoch": int(ti), "round": int(ti) // interval,
                         "old": policy_field(old), "new": policy_field(new)})
    checks = []
    # the logs agree with each other and with the controller's rules
    for r in range(1, n_rounds):
        rew = {m: R[r, m] for m in range(pop)}
        order = controller_order(rew)
        k = quantile_size(pop, quant)
        bottom, top = set(order[:k]), set(order[-k:])
        ex = [x for x in exploits if x["round"] == r]
        if {x["target"] for x in ex} != bottom:
            checks.append(f"round {r}: exploited {sorted(x['target'] for x in ex)} != bottom quantile {sorted(bottom)}")
        for x in ex:
            if x["clone"] not in top:
                checks.append(f"round {r}: clone {x['clone']} not in the top quantile {sorted(top)}")
            if "".join("0123456789a"[v] for v in x["new"]) != P[(r + 1, x["target"])]:
                checks.append(f"round {r}: member {x['target']}'s next policy is not the logged new policy")
            if "".join("0123456789a"[v] for v in x["old"]) != P[(r, x["clone"])]:
                checks.append(f"round {r}: logged old policy is not clone {x['clone']}'s")
    # lineages: replay the rounds (history per epoch, and whose weights each round came from)
    hist = {m: [] for m in range(pop)}
    carrier = {m: [] for m in range(pop)}  # member whose own training produced round r's weights
    for r in range(1, n_rounds + 1):
        k_ep = min(interval, epochs - (r - 1) * interval)
        for m in range(pop):
            hist[m].extend([pol_of(P[(r, m)])] * k_ep)
            carrier[m].append(m)
        for x in exploits:
            if x["round"] == r:
                hist[x["target"]] = [list(p) for p in hist[x["clone"]]]
                carrier[x["target"]] = list(carrier[x["clone"]])
    final = {m: R[n_rounds, m] for m in range(pop)}
    best = controller_order(final)[-1]
    summary = json.loads((d / "search.json").read_text()) if (d / "search.json").is_file() else {}
    if summary and int(summary.get("best_member", best)) != best:
        checks.append(f"best member {best} != search.json's {summary['best_member']}")
    if (d / "schedule.json").is_file():
        sched = json.loads((d / "schedule.json").read_text())["policies"]
        if [list(map(int, p)) for p in sched] != hist[best]:
            checks.append("the replayed best lineage differs from schedule.json")
    return {"dir": d, "n_val": n_val, "pop": pop, "epochs": epochs, "interval": interval, "quantile": quant,
            "n_rounds": n_rounds, "R": R, "P": P, "train_acc": train_acc, "exploits": exploits, "hist": hist,
            "carrier": carrier, "best": best, "checks": checks,
            "lr_step": max(1, int(round(float(cfg.get("train.lr_step_frac", 0.3)) * epochs))),
            "lr_gamma": float(cfg.get("train.lr_gamma", 0.1)), "lr": float(cfg.get("train.lr", "nan")),
            "optimizer": cfg.get("train.optimizer", "?")}


def rank_desc(rew: dict[int, float]) -> dict[int, int]:
    """Rank 1 = the controller's best (the last of the stable ascending sort)."""
    order = controller_order(rew)
    return {m: len(order) - i for i, m in enumerate(order)}


def analyse(S: dict) -> dict:
    R, pop, n_val, nr, k = S["R"], S["pop"], S["n_val"], S["n_rounds"], quantile_size(S["pop"], S["quantile"])
    exploits = S["exploits"]
    rounds = []
    for r in range(1, nr + 1):
        v = R[r]
        p = float(v.mean())
        se = math.sqrt(p * (1 - p) / n_val)
        srt = np.sort(v)
        gap = float(srt[-k] - srt[k - 1])  # top quantile's worst - bottom quantile's best
        ex = [x for x in exploits if x["round"] == r]
        leads = [float(R[r, x["clone"]] - R[r, x["target"]]) for x in ex]
        rounds.append({"round": r, "epoch": r * S["interval"], "n": pop, "mean": p, "sd": float(v.std(ddof=1)),
                       "range": float(srt[-1] - srt[0]), "gap": gap, "se": se, "se_diff": math.sqrt(2) * se,
                       "n_exploits": len(ex), "leads": leads,
                       "within1": sum(l < math.sqrt(2) * se for l in leads),
                       "within2": sum(l < 2 * math.sqrt(2) * se for l in leads),
                       "slots": [slots(pol_of(S["P"][(r, m)])) for m in range(pop)],
                       "rank": rank_desc({m: R[r, m] for m in range(pop)})})
    # empirical noise: change of a member's offset from the round mean between consecutive rounds, for members
    # that were not exploited at that boundary (same weights, same policy)
    exploited_at = {(x["round"], x["target"]) for x in exploits}
    d_off, pairs = [], []
    for r in range(1, nr):
        off_r, off_n = R[r] - R[r].mean(), R[r + 1] - R[r + 1].mean()
        for m in range(pop):
            if (r, m) not in exploited_at:
                d_off.append(off_n[m] - off_r[m])
                pairs.append((r, off_r[m], off_n[m]))
    d_off = np.array(d_off)
    sigma_emp = float(d_off.std(ddof=1) / math.sqrt(2))
    late = np.array([p for p in pairs if p[0] >= 4])  # rounds whose LR has dropped at least once (search LR steps)
    sigma_emp_late = float(np.std(late[:, 2] - late[:, 1], ddof=1) / math.sqrt(2)) if len(late) > 2 else float("nan")
    pr = np.array(pairs)
    offset_corr = float(np.corrcoef(pr[:, 1], pr[:, 2])[0, 1])
    offset_corr_late = float(np.corrcoef(late[:, 1], late[:, 2])[0, 1]) if len(late) > 2 else float("nan")
    # payoff of exploited members in the next round
    pay = []
    for x in exploits:
        r, t, c = x["round"], x["target"], x["clone"]
        if r + 1 > nr:
            continue
        nxt = {m: R[r + 1, m] for m in range(pop)}
        order = controller_order(nxt)
        bottom = set(order[:k])
        rk = rank_desc(nxt)
        se_d = rounds[r]["se_diff"]  # round r+1 (0-based index r)
        pay.append({"round": r, "target": t, "clone": c, "lead": float(R[r, c] - R[r, t]),
                    "slots_new": slots(x["new"]), "slots_clone": slots(x["old"]),
                    "vs_clone": float(R[r + 1, t] - R[r + 1, c]), "vs_median": float(R[r + 1, t] - np.median(R[r + 1])),
                    "rank_t": rk[t], "rank_c": rk[c], "t_bottom": t in bottom, "c_bottom": c in bottom,
                    "t_top": rk[t] <= k, "c_top": rk[c] <= k, "se_diff_next": se_d,
                    "train_acc_vs_clone": float(S["train_acc"][r + 1, t] - S["train_acc"][r + 1, c])})
    # slots vs rank (the rank of the round the policy was trained in)
    sl = np.array([rounds[r - 1]["slots"][m] for r in range(1, nr + 1) for m in range(pop)])
    rk = np.array([rounds[r - 1]["rank"][m] for r in range(1, nr + 1) for m in range(pop)])
    rho, p_rho = spearman(sl, rk)
    rnd = np.array([r for r in range(1, nr + 1) for m in range(pop)])
    leaders = []
    for r in range(1, nr + 1):
        order = sorted(range(pop), key=lambda m: rounds[r - 1]["rank"][m])
        lead_m = order[0]
        zero = [m for m in order if rounds[r - 1]["slots"][m] == 0]
        leaders.append({"round": r, "member": lead_m, "slots": rounds[r - 1]["slots"][lead_m],
                        "max_slots": max(rounds[r - 1]["slots"]), "margin": float(R[r, lead_m] - R[r, order[1]]),
                        "margin_over_best_zero": float(R[r, lead_m] - R[r, zero[0]]) if zero and zero[0] != lead_m
                        else None})
    early = np.array([p for p in pairs if p[0] <= 3])
    sigma_emp_early = float(np.std(early[:, 2] - early[:, 1], ddof=1) / math.sqrt(2)) if len(early) > 2 else float("nan")
    offset_corr_early = float(np.corrcoef(early[:, 1], early[:, 2])[0, 1]) if len(early) > 2 else float("nan")
    aug = sl > 0
    best = S["best"]
    bh = S["hist"][best]
    bslots = [slots(p) for p in bh]
    first = next((i + 1 for i, s in enumerate(bslots) if s > 0), None)
    carrier = S["carrier"][S["best"]]
    first_ops_exploit = None
    for i, x in enumerate(exploits):
        if slots(x["new"]) and x["round"] < nr and carrier[x["round"]] == x["target"] and \
                all(slots(p) == 0 for p in S["hist"][S["best"]][:x["round"] * S["interval"]]):
            first_ops_exploit = {"index": i + 1, "round": x["round"], "target": x["target"], "clone": x["clone"]}
    return {"rounds": rounds, "sigma_emp": sigma_emp, "sigma_emp_early": sigma_emp_early,
            "offset_corr_early": offset_corr_early, "first_ops_exploit": first_ops_exploit, "sigma_emp_late": sigma_emp_late, "offset_corr": offset_corr,
            "offset_corr_late": offset_corr_late, "n_offset_pairs": len(d_off), "n_offset_pairs_late": len(late),
            "payoff": pay, "slots_flat": sl, "rank_flat": rk, "round_flat": rnd, "rho": rho, "p_rho": p_rho,
            "mean_rank_aug": float(rk[aug].mean()) if aug.any() else float("nan"), "n_aug": int(aug.sum()),
            "mean_rank_zero": float(rk[~aug].mean()) if (~aug).any() else float("nan"), "n_zero": int((~aug).sum()),
            "leaders": leaders, "best": best, "best_slots": bslots, "best_first_active": first,
            "best_active_epochs": sum(s > 0 for s in bslots), "best_carrier": S["carrier"][best],
            "best_n_exploits": sum(1 for i in range(1, len(S["carrier"][best])) if S["carrier"][best][i] != S["carrier"][best][i - 1])}


# ---------------------------------------------------------------------------------------------- authors' log
def analyse_authors(fx: Path) -> dict | None:
    d = fx / "role-kd"
    if not (d / "pbt_global.txt").is_file():
        return None
    epochs, interval = 200, 3
    rows = [parse_pbt_line(l) for l in (d / "pbt_global.txt").read_text().splitlines() if l.strip()]
    cfg0 = rows[0][4] if isinstance(rows[0][4], dict) else {}
    targets = [str(r[0]) for r in rows]
    clones = [str(r[1]) for r in rows]
    members = sorted({*targets, *clones}, key=int)
    per_target = {m: targets.count(m) for m in members}
    per_clone = {m: clones.count(m) for m in members}
    bins = [(int(r[2]) - 1) // interval + 1 for r in rows]  # 3-epoch round of the target's iteration
    n_bins = math.ceil(epochs / interval)
    per_round = np.bincount(bins, minlength=n_bins + 1)[1:]
    first_ex = min(int(r[2]) for r in rows)
    lineages = {}
    for i in range(16):
        f = d / f"pbt_policy_{i}.txt"
        if f.is_file() and f.read_text().strip():
            h = pba_lineage(f.read_text().splitlines(), epochs)
            s = [slots(p) for p in h]
            lineages[i] = {"slots": s, "zero_start": next((j for j, v in enumerate(s) if v > 0), len(s)),
                           "active_epochs": sum(v > 0 for v in s), "lines": len(f.read_text().strip().splitlines())}
    pba = None
    f = fx / "pba" / "rcifar10_16_wrn.txt"
    if f.is_file():
        lines = [l for l in f.read_text().splitlines() if l.strip()]
        h = pba_lineage(lines, 200)
        s = [slots(p) for p in h]
        changes = sum(1 for j in range(1, len(h)) if h[j] != h[j - 1])
        pba = {"slots": s, "zero_start": next((j for j, v in enumerate(s) if v > 0), len(s)), "changes": changes,
               "lines": len(lines)}
    return {"n": len(rows), "members": members, "iters": [int(r[2]) for r in rows], "clone_iters": [int(r[3]) for r in rows], "per_target": per_target, "per_clone": per_clone,
            "per_round": per_round, "first_exploit_iter": first_ex, "lineages": lineages, "pba": pba,
            "train_size": cfg0.get("train_size"), "validation_size": cfg0.get("validation_size"),
            "num_epochs": cfg0.get("num_epochs"), "dataset": cfg0.get("dataset")}


# ---------------------------------------------------------------------------------------------- output
def pts(x: float, nd: int = 2) -> str:
    return f"{100 * x:+.{nd}f}" if x < 0 else f"{100 * x:.{nd}f}"


def print_tables(name: str, label: str, S: dict, A: dict) -> None:
    print(f"\n### {label} (`{name}`): population {S['pop']}, {S['n_rounds']} rounds of {S['interval']} epochs, "
          f"n_val = {S['n_val']}\n")
    if S["checks"]:
        print("**log checks failed:** " + "; ".join(S["checks"]) + "\n")
    else:
        print("(logs consistent: exploited = bottom quantile, clones in the top quantile, logged policies = trained "
              "policies, replayed best lineage = schedule.json)\n")
    print("| round | epoch | n | mean (%) | sd (pts) | range (pts) | top-q min − bottom-q max (pts) | SE (pts) | "
          "SE diff (pts) | sd / SE | exploits | leads (pts) | within 1 SE diff | within 2 SE diff |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    for q in A["rounds"]:
        leads = ", ".join(f"{100 * l:.2f}" for l in q["leads"]) or "—"
        w1 = f"{q['within1']}/{q['n_exploits']}" if q["n_exploits"] else "—"
        w2 = f"{q['within2']}/{q['n_exploits']}" if q["n_exploits"] else "—"
        print(f"| {q['round']} | {q['epoch']} | {q['n']} | {100 * q['mean']:.2f} | {100 * q['sd']:.2f} | "
              f"{100 * q['range']:.2f} | {pts(q['gap'])} | {100 * q['se']:.2f} | {100 * q['se_diff']:.2f} | "
              f"{q['sd'] / q['se']:.2f} | {q['n_exploits']} | {leads} | {w1} | {w2} |")
    ex = [q for q in A["rounds"] if q["n_exploits"]]
    n_ex = sum(q["n_exploits"] for q in ex)
    w1, w2 = sum(q["within1"] for q in ex), sum(q["within2"] for q in ex)
    sd_se = [q["sd"] / q["se"] for q in A["rounds"]]
    print(f"\nAll rounds: mean sd {100 * np.mean([q['sd'] for q in A['rounds']]):.2f} pts (rounds 4–10 "
          f"{100 * np.mean([q['sd'] for q in A['rounds'][3:]]):.2f}) vs mean SE "
          f"{100 * np.mean([q['se'] for q in A['rounds']]):.2f} pts (sd/SE {np.mean(sd_se):.2f}; rounds 4–10 "
          f"{np.mean(sd_se[3:]):.2f}); exploits within 1 SE diff {w1}/{n_ex} ({100 * w1 / n_ex:.0f}%), within 2 SE "
          f"diff {w2}/{n_ex} ({100 * w2 / n_ex:.0f}%).")
    print(f"Empirical noise (sd of the change of a kept member's offset from the round mean / √2): "
          f"{100 * A['sigma_emp']:.2f} pts over {A['n_offset_pairs']} member-round pairs; rounds 1→4 {100 * A['sigma_emp_early']:.2f} pts; rounds 4→10 "
          f"{100 * A['sigma_emp_late']:.2f} pts ({A['n_offset_pairs_late']} pairs). Correlation of a kept member's "
          f"offset with its offset one round later: {A['offset_corr']:.2f} (rounds 1→4: {A['offset_corr_early']:.2f}, "
          f"rounds 4→10: {A['offset_corr_late']:.2f}).")
    p_late = float(np.mean([q["mean"] for q in A["rounds"][3:]]))
    print(f"Paired SE of a difference on the same {S['n_val']} images, sqrt(d/n) for a share d of images the two "
          f"members classify differently (one right, one wrong): d = 0.2: {100 * math.sqrt(0.2 / S['n_val']):.2f} pts, "
          f"d = 0.3: {100 * math.sqrt(0.3 / S['n_val']):.2f}, independent errors at p = {100 * p_late:.0f}% "
          f"(d = 2p(1-p) = {2 * p_late * (1 - p_late):.2f}): {100 * math.sqrt(2 * p_late * (1 - p_late) / S['n_val']):.2f} pts. "
          f"n_val for SE diff = 0.3 pts at independent errors: {2 * p_late * (1 - p_late) / 0.003 ** 2:,.0f}; at d = 0.3: "
          f"{0.3 / 0.003 ** 2:,.0f}.")
    print("\n| exploit after round | target ← clone | lead (pts) | active slots: clone → new | next round: target − clone "
          "(pts) | target − median (pts) | rank target / clone (1 = best) | target in bottom-q next | clone in bottom-q next |")
    print("|---:|---|---:|---|---:|---:|---|---|---|")
    for p in A["payoff"]:
        print(f"| {p['round']} | {p['target']} ← {p['clone']} | {100 * p['lead']:.2f} | {p['slots_clone']} → "
              f"{p['slots_new']} | {pts(p['vs_clone'])} | {pts(p['vs_median'])} | {p['rank_t']} / {p['rank_c']} | "
              f"{'yes' if p['t_bottom'] else 'no'} | {'yes' if p['c_bottom'] else 'no'} |")
    pay = A["payoff"]
    vc = mean_ci([p["vs_clone"] for p in pay])
    vm = mean_ci([p["vs_median"] for p in pay])
    tb, cb = sum(p["t_bottom"] for p in pay), sum(p["c_bottom"] for p in pay)
    tt, ct = sum(p["t_top"] for p in pay), sum(p["c_top"] for p in pay)
    ta = mean_ci([p["train_acc_vs_clone"] for p in pay])
    print(f"\nNext-round payoff of the {len(pay)} exploited members: vs their clone {pts(vc[0])} pts "
          f"[{pts(vc[1])}, {pts(vc[2])}], vs the median {pts(vm[0])} pts [{pts(vm[1])}, {pts(vm[2])}] (mean [95% t CI]); "
          f"below their clone in {sum(p['vs_clone'] < 0 for p in pay)}/{len(pay)}; back in the bottom quantile "
          f"{tb}/{len(pay)} (their clones {cb}/{len(pay)}; chance 2/8); in the top quantile {tt}/{len(pay)} (clones "
          f"{ct}/{len(pay)}). Train accuracy (augmented batches, last epoch of the round) vs clone: {pts(ta[0])} pts "
          f"[{pts(ta[1])}, {pts(ta[2])}].")
    # by the search's learning rate in the payoff round (step schedule: x lr_gamma every lr_step epochs)
    phase = lambda r: (r * S["interval"] - 1) // S["lr_step"]  # noqa: E731  (LR phase of round r's last epoch)
    for ph in sorted({phase(p["round"] + 1) for p in pay}):
        sub = [p for p in pay if phase(p["round"] + 1) == ph]
        rs = sorted({p["round"] + 1 for p in sub})
        m = mean_ci([p["vs_clone"] for p in sub])
        print(f"- payoff round{'s' if len(rs) > 1 else ''} {rs[0]}{'–' + str(rs[-1]) if len(rs) > 1 else ''} ({S['optimizer']} LR {S['lr'] * S['lr_gamma'] ** ph:g}): vs clone "
              f"{pts(m[0])} pts [{pts(m[1])}, {pts(m[2])}], n = {len(sub)}; back in the bottom quantile "
              f"{sum(p['t_bottom'] for p in sub)}/{len(sub)}")
    print(f"\nActive op slots vs rank in the round the policy was trained in ({len(A['slots_flat'])} member-rounds): "
          f"Spearman ρ = {A['rho']:+.2f} (permutation p {fmt_p(A['p_rho'])}; ρ > 0: more slots, worse rank); mean rank "
          f"(1 = best) with ops {A['mean_rank_aug']:.2f} (n = {A['n_aug']}), all-zero {A['mean_rank_zero']:.2f} "
          f"(n = {A['n_zero']}).")
    print("Leader per round (member: its active slots / the most any member had; its margin over the runner-up, pts"
          "; for a leader with ops, over the best all-zero member): " + ", ".join(
        f"r{l['round']} m{l['member']}: {l['slots']}/{l['max_slots']}, +{100 * l['margin']:.2f}"
        + (f" (+{100 * l['margin_over_best_zero']:.2f} over all-zero)" if l["slots"] and l["margin_over_best_zero"]
           is not None else "") for l in A["leaders"]))
    if A["first_ops_exploit"]:
        f = A["first_ops_exploit"]
        print(f"The best lineage's ops came from exploit {f['index']} of {len(S['exploits'])} (after round {f['round']}, "
              f"member {f['target']} copied {f['clone']}).")
    bs = A["best_slots"]
    print(f"Final best member {A['best']}: weights carried by members {A['best_carrier']} (round 1..{S['n_rounds']}), "
          f"{A['best_n_exploits']} exploit(s) in its lineage; first active epoch "
          f"{A['best_first_active'] if A['best_first_active'] else 'never'} of {S['epochs']}; active in "
          f"{A['best_active_epochs']} epochs; slots per epoch {bs}.")


def print_authors(Au: dict, studies: dict) -> None:
    print("\n### Authors' log (role-kd, 16 members, 200 epochs)\n")
    pt = list(Au["per_target"].values())
    pc = list(Au["per_clone"].values())
    pr = Au["per_round"]
    print(f"{Au['n']} exploits ({Au['dataset']}, train_size {Au['train_size']}, validation_size "
          f"{Au['validation_size']}, num_epochs {Au['num_epochs']}); first at iteration {Au['first_exploit_iter']}. "
          f"Per member as target: min {min(pt)}, median {np.median(pt):.0f}, max {max(pt)}; as clone source: min "
          f"{min(pc)}, max {max(pc)}. Per 3-epoch round: {int((pr > 0).sum())} of {len(pr)} rounds have exploits, "
          f"mean {pr.mean():.2f}, max {pr.max()}; cumulative by epoch 30: {int(pr[:10].sum())}, by 60: "
          f"{int(pr[:20].sum())}, by 100: {int(pr[:34].sum())}.")
    z0 = min(L["zero_start"] for L in Au["lineages"].values())
    print(f"Exploits at clone iterations before {z0} (the final lineages take their first op at iteration {z0}): "
          f"{sum(1 for r in Au['clone_iters'] if r < z0)} of {Au['n']}; none of the policies they produced is in a final "
          f"lineage.")
    zs = {i: L["zero_start"] for i, L in Au["lineages"].items()}
    print("Final lineages (pbt_policy_i.txt, PBA's parser): all-zero for the first N epochs: " + ", ".join(
        f"m{i}: {z}" for i, z in sorted(zs.items())) + f" (median {np.median(list(zs.values())):.0f}); active epochs "
          f"median {np.median([L['active_epochs'] for L in Au['lineages'].values()]):.0f} of 200; exploits in the "
          f"final lineages (log lines) median {np.median([L['lines'] for L in Au['lineages'].values()]):.0f}.")
    if Au["pba"]:
        p = Au["pba"]
        print(f"PBA's rcifar10_16_wrn.txt: {p['lines']} lines, all-zero for the first {p['zero_start']} epochs, "
              f"policy changes {p['changes']} times, active slots {min(s for s in p['slots'] if s)}–{max(p['slots'])}.")
    for name, (S, A) in studies.items():
        print(f"Study {name}: {len(S['exploits'])} exploits, per member as target: "
              f"{[sum(x['target'] == m for x in S['exploits']) for m in range(S['pop'])]}")


def draw_diagnosis(studies: dict, out: Path) -> Path:
    fig, axes = plt.subplots(len(studies), 3, figsize=(17, 5.8 * len(studies)), dpi=80, layout="constrained",
                             gridspec_kw={"width_ratios": [1.4, 1, 1]})
    axes = np.atleast_2d(axes)
    cmap = plt.get_cmap("viridis")
    max_slots = max(max(A["slots_flat"]) for _, (S, A) in studies.items()) or 1
    norm = plt.Normalize(0, max_slots)
    for row, (name, (S, A)) in enumerate(studies.items()):
        label = dict(SEARCHES).get(name, name)
        R, nr, iv, pop = S["R"], S["n_rounds"], S["interval"], S["pop"]
        dx = lambda m: (m - (pop - 1) / 2) * 0.2  # noqa: E731  (members side by side within a round)
        # (a) each member's reward minus the round mean, with the +-1/2 SE band of a single reward
        ax = axes[row, 0]
        ep = np.array([q["epoch"] for q in A["rounds"]])
        mu = np.array([q["mean"] for q in A["rounds"]])
        se = np.array([q["se"] for q in A["rounds"]]) * 100
        x_band = np.concatenate([[ep[0] - 1.5], ep, [ep[-1] + 1.5]])
        se_band = np.concatenate([[se[0]], se, [se[-1]]])
        ax.fill_between(x_band, -2 * se_band, 2 * se_band, color="0.88", lw=0, label="±2 SE of one reward (binomial)")
        ax.fill_between(x_band, -se_band, se_band, color="0.74", lw=0, label="±1 SE")
        ax.axhline(0, color="0.3", lw=0.8)
        for r in range(1, nr + 1):
            for m in range(pop):
                s = A["rounds"][r - 1]["slots"][m]
                ax.scatter(r * iv + dx(m), 100 * (R[r, m] - mu[r - 1]), s=30, zorder=3,
                           color=cmap(norm(s)) if s else "white", edgecolor="k", lw=0.6)
        for x in S["exploits"]:
            r = x["round"]
            yt, yc = 100 * (R[r, x["target"]] - mu[r - 1]), 100 * (R[r, x["clone"]] - mu[r - 1])
            ax.annotate("", xy=(r * iv + dx(x["target"]), yt), xytext=(r * iv + dx(x["clone"]), yc),
                        arrowprops=dict(arrowstyle="->", color="crimson", lw=0.9, alpha=0.75), zorder=2)
            ax.scatter(r * iv + dx(x["target"]), yt, marker="x", color="crimson", s=40, zorder=4, lw=1.3)
        b = A["best"]
        ax.plot([r * iv + dx(b) for r in range(1, nr + 1)], 100 * (R[1:, b] - mu), color="tab:orange", lw=1.2, ls="--",
                zorder=2, label=f"final best member {b}")
        ax.scatter([], [], marker="x", color="crimson", label="exploited member (arrow from the member it copies)")
        ax.set_xticks(ep)
        ax.set_xlim(ep[0] - 1.8, ep[-1] + 1.8)
        ax.set_xlabel("search epoch (end of round)")
        ax.set_ylabel("member reward − round mean (val-acc points)")
        sd_late = np.mean([q["sd"] for q in A["rounds"][3:]]) * 100
        ax.set_title(f"{label}: member rewards vs sampling error\nn_val = {S['n_val']}: SE of one reward ≈ "
                     f"{np.mean(se[3:]):.2f} pts; member sd in rounds 4–10 ≈ {sd_late:.2f} pts", fontsize=10)
        ys = 100 * (R[1:] - mu[:, None])
        ax.set_ylim(min(ys.min(), -2.2 * se.max()) - 0.3, max(ys.max(), 2.2 * se.max()) + 0.25 * (ys.max() - ys.min()))
        ax.legend(fontsize=7.5, loc="upper right", ncol=2)
        # (b) next-round payoff of exploited members
        ax = axes[row, 1]
        pay = A["payoff"]
        xs = np.array([p["round"] + 1 for p in pay], float)
        jit = np.array([(i % 2) * 0.2 - 0.1 for i in range(len(pay))])
        rr = np.arange(2, nr + 1)
        sdr = np.array([A["rounds"][r - 1]["se_diff"] for r in rr]) * 100
        xb = np.concatenate([[rr[0] - 0.5], rr, [rr[-1] + 0.5]])
        sb = np.concatenate([[sdr[0]], sdr, [sdr[-1]]])
        ax.fill_between(xb, -2 * sb, 2 * sb, color="0.88", lw=0, label="±2 SE of a difference")
        ax.fill_between(xb, -sb, sb, color="0.74", lw=0, label="±1 SE of a difference")
        ax.axhline(0, color="k", lw=0.6)
        c = [cmap(norm(p["slots_new"])) for p in pay]
        ax.scatter(xs + jit, [100 * p["vs_clone"] for p in pay], c=c, edgecolor="k", s=46, zorder=3,
                   label="exploited member − the member it copied")
        ax.scatter(xs + jit, [100 * p["vs_median"] for p in pay], c=c, marker="^", edgecolor="k", lw=0.4, s=28,
                   zorder=3, alpha=0.7, label="exploited member − round median")
        m = mean_ci([p["vs_clone"] for p in pay])
        ax.axhline(100 * m[0], color="crimson", lw=1, ls=":", label="mean vs copied member")
        ax.set_title(f"the round after an exploit (new, perturbed policy)\nvs the copied member: {100 * m[0]:+.2f} pts "
                     f"[{100 * m[1]:+.2f}, {100 * m[2]:+.2f}]\nback in the bottom quantile at once: "
                     f"{sum(p['t_bottom'] for p in pay)}/{len(pay)} (copied members: {sum(p['c_bottom'] for p in pay)}/"
                     f"{len(pay)})", fontsize=10)
        ax.set_xlabel("round (the one after the exploit)")
        ax.set_ylabel("val-acc points")
        ax.set_xticks(rr)
        ax.set_xlim(rr[0] - 0.5, rr[-1] + 0.5)
        ax.legend(fontsize=7.5, loc="lower right")
        # (c) active slots vs rank
        ax = axes[row, 2]
        rng = np.random.default_rng(1)
        sl, rk, rd = A["slots_flat"], A["rank_flat"], A["round_flat"]
        sc = ax.scatter(sl + rng.uniform(-0.35, 0.35, len(sl)), rk + rng.uniform(-0.22, 0.22, len(rk)), c=rd,
                        cmap="plasma", s=22, edgecolor="k", lw=0.3, vmin=1, vmax=nr)
        for sel, xpos, lab in ((sl == 0, -3.2, "all-zero"), (sl > 0, max_slots + 2.0, "with ops")):
            if sel.any():
                mr = rk[sel].mean()
                ax.errorbar([xpos], [mr], yerr=[[rk[sel].std() / math.sqrt(sel.sum())]], fmt="D", color="k", ms=7,
                            capsize=3)
                ax.annotate(f"mean {mr:.1f}\n{lab}\n(n={int(sel.sum())})", (xpos, mr), textcoords="offset points",
                            xytext=(0, 14), ha="center", fontsize=7.5)
        ax.set_xlim(-5.5, max_slots + 4.0)
        ax.set_ylim(pop + 0.6, 0.4)
        ax.set_yticks(range(1, pop + 1))
        ax.set_xlabel("active op slots of the member's policy (of 30)")
        ax.set_ylabel("rank at the end of that round (1 = best)")
        ax.set_title(f"augmentation vs rank (every member, every round)\nSpearman ρ = {A['rho']:+.2f} "
                     f"(permutation p {fmt_p(A['p_rho'])})\nρ > 0: more ops, worse rank", fontsize=10)
        fig.colorbar(sc, ax=ax, pad=0.01, shrink=0.8).set_label("round", fontsize=8)
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=norm)
    cb = fig.colorbar(sm, ax=axes[-1, :2], location="bottom", shrink=0.4, pad=0.01, aspect=40)
    cb.set_label("active op slots of the policy (white = all-zero)", fontsize=8)
    fig.suptitle("Evidence study's searches: reward spread vs sampling error, exploits, and what a new policy costs "
                 "in the next round", fontsize=12)
    out.mkdir(parents=True, exist_ok=True)
    p = out / "search_diagnosis.png"
    fig.savefig(p, dpi=80)
    plt.close(fig)
    return p


def draw_lineage(studies: dict, Au: dict | None, out: Path) -> Path:
    ncol = 3 if Au else 1
    fig, axes = plt.subplots(1, ncol, figsize=(16, 4.2), dpi=90, gridspec_kw={"width_ratios": [1, 1.2, 1][:ncol]})
    axes = np.atleast_1d(axes)
    ax = axes[0]
    for (name, (S, A)), col in zip(studies.items(), ("tab:blue", "tab:green")):
        for m in range(S["pop"]):
            s = [slots(p) for p in S["hist"][m]]
            ax.plot(np.arange(1, len(s) + 1), s, color=col, lw=0.6, alpha=0.35)
        ax.plot(np.arange(1, len(A["best_slots"]) + 1), A["best_slots"], color=col, lw=2.2,
                label=f"{name.split('_')[0]}: final best member {A['best']}")
    ax.set_xlabel("search epoch")
    ax.set_ylabel("active op slots (of 30)")
    ax.set_title("study: every final lineage (thin), the best (thick)", fontsize=10)
    ax.legend(fontsize=8)
    if Au:
        ax = axes[1]
        for j, i in enumerate(sorted(Au["lineages"])):
            sl_ = Au["lineages"][i]["slots"]
            ax.plot(np.arange(1, len(sl_) + 1), sl_, color="0.45", lw=0.8, alpha=0.6,
                    label="authors' 16 final lineages (role-kd)" if j == 0 else None)
        if Au["pba"]:
            ax.plot(np.arange(1, 201), Au["pba"]["slots"], color="crimson", lw=1.6, label="PBA published rcifar10_16_wrn")
        for (name, (S, A)), col in zip(studies.items(), ("tab:blue", "tab:green")):
            ax.plot(np.arange(1, len(A["best_slots"]) + 1), A["best_slots"], color=col, lw=2.2,
                    label=f"study {name.split('_')[0]}: best lineage")
        zs = sorted({L["zero_start"] for L in Au["lineages"].values()})
        ax.axvline(30, color="k", ls="--", lw=0.8)
        ax.text(31, 28.5, "end of the study's search", fontsize=7.5)
        ax.set_ylim(-0.5, 30)
        ax.set_xlabel("search epoch")
        ax.set_ylabel("active op slots (of 30)")
        ax.set_title(f"authors' lineages all-zero for their first {'/'.join(map(str, zs))} epochs; "
                     f"PBA's for {Au['pba']['zero_start'] if Au['pba'] else '?'}", fontsize=10)
        ax.legend(fontsize=7.5, loc="center right")
        ax = axes[2]
        pr = Au["per_round"]
        ax.bar(np.arange(1, len(pr) + 1) * 3, np.cumsum(pr), width=2.6, color="0.6",
               label=f"authors: 16 members, 200 epochs ({Au['n']})")
        for (name, (S, A)), col in zip(studies.items(), ("tab:blue", "tab:green")):
            cnt = np.bincount([x["round"] for x in S["exploits"]], minlength=S["n_rounds"] + 1)[1:]
            ax.step(np.arange(1, S["n_rounds"] + 1) * S["interval"], np.cumsum(cnt), where="post", color=col, lw=2,
                    label=f"study {name.split('_')[0]}: 8 members, 30 epochs ({len(S['exploits'])})")
        ax.set_xlabel("search epoch")
        ax.set_ylabel("cumulative exploits")
        ax.set_title("exploits over the search", fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    p = out / "search_lineage.png"
    fig.savefig(p, dpi=90)
    plt.close(fig)
    return p


def jsonable(o):
    if isinstance(o, dict):
        return {str(k): jsonable(v) for k, v in o.items() if k not in ("R", "P", "hist", "train_acc", "dir")}
    if isinstance(o, (list, tuple)):
        return [jsonable(v) for v in o]
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (np.bool_,)):
        return bool(o)
    return o


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, default=ROOT / "benchmarks" / "evidence" / "run")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "evidence" / "figures")
    ap.add_argument("--fixtures", type=Path, default=ROOT.parent / "shared" / "fixtures")
    ap.add_argument("--json", type=Path, default=None, help="also write the measurements as JSON here")
    a = ap.parse_args()
    studies = {}
    for name, label in SEARCHES:
        d = a.run / name
        if not (d / "rewards.csv").is_file():
            print(f"{d}: no rewards.csv, skipped")
            continue
        S = load_search(d)
        A = analyse(S)
        studies[name] = (S, A)
        print_tables(name, label, S, A)
    Au = analyse_authors(a.fixtures)
    if Au:
        print_authors(Au, studies)
    else:
        print(f"\n{a.fixtures}: no role-kd logs, the contrast is skipped")
    p1 = draw_diagnosis(studies, a.out)
    p2 = draw_lineage(studies, Au, a.out)
    for p in (p1, p2):
        print(f"wrote {p} ({p.stat().st_size / 1024:.0f} KB)")
    if a.json:
        a.json.write_text(json.dumps(jsonable({"studies": {n: {"search": S, "analysis": A} for n, (S, A) in studies.items()},
                                               "authors": Au}), indent=1))


if __name__ == "__main__":
    main()
