"""KD vs no KD on a 4-bit student, with the reference-scale KD losses (issue 12), several seeds each.

    python benchmarks/kd_vs_nokd.py --out runs/kd_vs_nokd            # ~25 min on the shared 2-core CPU VM

On the bundled CIFAR-10 sample (4,000 train / 1,000 test real images): a full-precision resnet_tiny
teacher trained ``--teacher-epochs`` epochs, then 4-bit resnet_tiny students initialised from it and
trained ``--epochs`` epochs with Adam (lr 1e-3, weight decay 1e-5), crop + flip, no cutout — without KD
and with each KD method — once per seed (``train.seed``: the initial data order and augmentation
draws; the initialisation is the teacher's). λ as the paper sets it (§5.3): 1 for the single-method
baselines (soft, KD-SVD, MHGD, RKD), 0.4 for II-KD; each method clips its KD gradient as its reference
code does (KD-SVD, MHGD, II-KD). Every run is an ordinary ``rolekd train`` / ``rolekd distill`` run
directory under ``--out``; rerunning skips finished runs. Prints test accuracy per run and mean ± std
(sample standard deviation over the seeds) per method.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from rolekd.cli import main as rolekd

LAM = {"soft": 1.0, "kdsvd": 1.0, "mhgd": 1.0, "rkd": 1.0, "iikd": 0.4}


def run(args: list[str]) -> None:
    code = rolekd(args)
    if code != 0:
        raise SystemExit(f"rolekd {' '.join(args)} failed with status {code}")


def test_acc(run_dir: Path) -> float:
    return float(json.loads((run_dir / "result.json").read_text())["test_acc"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/kd_vs_nokd")
    ap.add_argument("--teacher-epochs", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="*", default=["none", "soft", "iikd", "kdsvd", "mhgd", "rkd"])
    args = ap.parse_args()
    out = Path(args.out)
    quiet = ["train.progress=false"]
    teacher = out / "teacher"
    run(["train", "model=resnet_tiny", f"epochs={args.teacher_epochs}", "augment.cutout=0", *quiet,
         f"out={teacher}"])
    student = ["model=resnet_tiny", "w_bits=4", "a_bits=4", f"epochs={args.epochs}", "train.optimizer=adam",
               "train.lr=0.001", "train.weight_decay=1e-5", "augment.cutout=0", *quiet]
    results: dict[str, list[float]] = {}
    for m in args.methods:
        for seed in args.seeds:
            d = out / f"{m}_seed{seed}"
            if m == "none":  # same initialisation (the teacher's weights), no KD
                run(["train", *student, f"teacher={teacher}", f"train.seed={seed}", f"out={d}"])
            else:
                run(["distill", *student, f"teacher={teacher}", f"method={m}", f"kd.lam={LAM[m]}",
                     f"train.seed={seed}", f"out={d}"])
            results.setdefault(m, []).append(test_acc(d))
            print(f"{m} seed {seed}: test acc {100 * results[m][-1]:.1f}%", flush=True)
    print(f"\nteacher: {100 * test_acc(teacher):.1f}%")
    print("| student (4-bit resnet_tiny) | λ | test acc % per seed | mean ± std |\n|---|---:|---|---:|")
    for m, accs in results.items():
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        name = "no KD" if m == "none" else m
        lam = "-" if m == "none" else f"{LAM[m]:g}"
        print(f"| {name} | {lam} | {', '.join(f'{100 * a:.1f}' for a in accs)} | "
              f"{100 * statistics.mean(accs):.2f} ± {100 * sd:.2f} |")
    (out / "summary.json").write_text(json.dumps({"teacher": test_acc(teacher), "results": results}, indent=2))


if __name__ == "__main__":
    main()
