"""The evidence study's pilot (issue 20): which small-data regime leaves augmentation room to help?

    python benchmarks/evidence/pilot.py --data-path ../shared/data/cifar10_jpeg.npz \
        --pba-schedule ../shared/fixtures/pba/rcifar10_16_wrn.txt --out runs/pilot

Every arm trains the fp32 network on the first N images of PBA's reduced CIFAR-10 permutation (numpy seed
0; ``data.full_train_size``) and tests on all 10,000 test images, with 3 seeds, as ordinary ``rolekd train``
runs in parallel worker processes (the pipeline's stage runner, one thread each). It looks at no learned
schedule: the arms are crop + flip, cutout alone, PBA's published schedule (searched for WRN-28-10 on
reduced CIFAR-10), that schedule with its probabilities or magnitudes halved, and a light random policy.
The table (mean ± std over the seeds of the last epoch's training accuracy on augmented batches and the
test accuracy) is printed and written to ``<out>/pilot.md`` and ``pilot.json``. The criteria: crop + flip
overfits (train - test >= 15 points) and some arm beyond it beats it by >= 1 point on average.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from rolekd.augment.schedule import Schedule
from rolekd.augment.space import MAX_LEVEL, MAX_PROB, POLICY_LEN
from rolekd.config import load_config
from rolekd.pipeline.graph import ProcessExecutor, Task, run_graph


def scaled(sched: Schedule, prob: float = 1.0, mag: float = 1.0) -> Schedule:
    """``sched`` with every probability (even positions) and magnitude (odd) multiplied and rounded."""
    return Schedule([[int(round(v * (prob if i % 2 == 0 else mag))) for i, v in enumerate(p)] for p in sched.policies])


def light_random(seed: int, slots: int = 4, prob: int = 3, mag: int = 3) -> list[int]:
    """A fixed policy of ``slots`` op slots drawn at random, each with probability prob/10, magnitude mag."""
    rng = np.random.default_rng(seed)
    p = [0] * POLICY_LEN
    for s in rng.choice(POLICY_LEN // 2, slots, replace=False):
        p[2 * s], p[2 * s + 1] = min(prob, MAX_PROB), min(mag, MAX_LEVEL)
    return p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-path", required=True, help="cifar10_jpeg.npz (or --dataset cifar10 for torchvision's)")
    ap.add_argument("--dataset", default="cifar10-jpeg")
    ap.add_argument("--pba-schedule", required=True, help="PBA's published schedule (rcifar10_16_wrn.txt)")
    ap.add_argument("--model", default="resnet_tiny")
    ap.add_argument("--sizes", nargs="+", type=int, default=[1000])
    ap.add_argument("--epochs", type=int, default=120)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--arms", nargs="+", default=None, help="run only these arms")
    ap.add_argument("--out", default="runs/pilot")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    pba = Schedule.load(a.pba_schedule, epochs=200)
    files = {}
    for name, s in {"pba": pba, "pba_halfprob": scaled(pba, prob=0.5), "pba_halfmag": scaled(pba, mag=0.5),
                    "light_random": Schedule([light_random(0)])}.items():
        files[name] = out / f"schedule_{name}.json"
        s.save(files[name])
    arms = {  # name -> overrides (the base: crop + flip, no cutout)
        "crop+flip": [],
        "cutout 8": ["augment.cutout=8"],
        "cutout 16": ["augment.cutout=16"],
        "PBA schedule": [f"augment.schedule={files['pba']}"],
        "PBA schedule, probabilities x0.5": [f"augment.schedule={files['pba_halfprob']}"],
        "PBA schedule, magnitudes x0.5": [f"augment.schedule={files['pba_halfmag']}"],
        "light random policy (4 ops, p 0.3, m 3)": [f"augment.schedule={files['light_random']}"],
    }
    if a.arms:
        arms = {k: v for k, v in arms.items() if k in a.arms}
    tasks = []
    for n in a.sizes:
        for i, (arm, extra) in enumerate(arms.items()):
            for seed in range(a.seeds):
                d = f"n{n}_arm{i}_s{seed}"
                cfg = load_config(None, [
                    f"dataset={a.dataset}", f"data.path={a.data_path}", f"data.full_train_size={n}",
                    f"model={a.model}", f"epochs={a.epochs}", f"seed={seed}", "augment.cutout=0",
                    "augment.fit_epochs=true", "train.eval_every=20", "train.eval_batch_size=1000",
                    "train.progress=false", "train.threads=1", "train.device=cpu", f"out={out / d}"] + extra)
                tasks.append((n, arm, seed, Task(d, "train", cfg)))
    t0 = time.time()
    results = run_graph([t for *_, t in tasks], ProcessExecutor(a.workers))
    wall = time.time() - t0
    rows, table = [], {}
    for n, arm, seed, t in tasks:
        metrics = [json.loads(line) for line in open(Path(t.config.out) / "metrics.jsonl")]
        train = 100 * metrics[-1]["train_acc"]
        test = 100 * results[t.dir]["test_acc"]
        rows.append({"n": n, "arm": arm, "seed": seed, "train_acc": train, "test_acc": test,
                     "wall_s": results[t.dir]["wall_time_s"]})
        table.setdefault((n, arm), []).append((train, test))
    lines = [f"Pilot: {a.model} fp32, first N images of PBA's reduced CIFAR-10 permutation, {a.epochs} epochs, "
             f"tested on all test images, {a.seeds} seeds (mean ± std); wall {wall:.0f} s with {a.workers} workers.", "",
             "| N | augmentation | train acc (%) | test acc (%) | train - test | test - crop+flip |",
             "|---:|---|---:|---:|---:|---:|"]

    def ms(v):
        return f"{statistics.mean(v):.2f} ± {statistics.stdev(v) if len(v) > 1 else 0:.2f}"

    for (n, arm), v in table.items():
        tr, te = [x for x, _ in v], [y for _, y in v]
        base = [y for _, y in table.get((n, "crop+flip"), v)]
        lines.append(f"| {n} | {arm} | {ms(tr)} | {ms(te)} | {statistics.mean(tr) - statistics.mean(te):+.1f} | "
                     f"{statistics.mean(te) - statistics.mean(base):+.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    (out / "pilot.md").write_text(text)
    (out / "pilot.json").write_text(json.dumps({"wall_s": wall, "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
