"""Projected GPU-hours of a pipeline config from measured per-step times (a projection, not a measurement).

    python benchmarks/project_gpu_hours.py configs/paper/table2_resnet18.yaml dataset=cifar10
    python benchmarks/project_gpu_hours.py CONFIG --rates RATES.json      # other measured step times

Every run of the pipeline (``rolekd.pipeline.stage_configs``) is counted in images through a training step and
images through an evaluation forward: a search trains ``population x epochs x data.train_size`` images and
evaluates ``population x data.val_size`` at each round's end; a retraining stage trains ``epochs x`` the training
set and evaluates the test set every ``train.eval_every`` epochs. Each image costs the measured time of a training
step of its kind (fp32, low-bit, low-bit with a KD method, clipped or not) divided by the step's batch; an
evaluation forward is taken as 1/3 of a plain training step of that network (forward only: an assumption, not a
measurement). The default rates are ResNet18 at batch 256 on one NVIDIA H200 (benchmarks/RESULTS.md, "The stage
graph on a GPU", `bench_kd.py`, git 4210257).

One GPU: the sum. Eight GPUs: the larger of the sum / 8 (every GPU busy) and the critical path (α search with its
members spread over the 8 GPUs, the teacher, the β search likewise, then the student), a lower bound on the wall.
"""

from __future__ import annotations

import argparse
import json

from rolekd.distill import distiller_class
from rolekd.pipeline.run import pipeline_config, stage_configs

H200_RESNET18_B256_MS = {"batch": 256, "fp32": 9.9, "lowbit": 25.5,
                         "kd": {"soft": 30.3, "dml": 36.3, "rkd": 34.9, "kdsvd": 106.9, "mhgd": 109.4, "iikd": 122.0},
                         "kd_unclipped": {"iikd": 90.8}, "source": "H200, bench_kd.py --batch 256, git 4210257"}
TRAIN_SIZE = {"cifar10": 50000, "cifar100": 50000, "cifar10-jpeg": 50000}
TEST_SIZE = 10000


def step_ms(cfg, rates) -> tuple[float, float]:
    """(training step ms, evaluation forward ms) at the rates' batch for a run of ``cfg``."""
    low = min(cfg.quant.w_bits, cfg.quant.a_bits) < 32
    plain = rates["lowbit"] if low else rates["fp32"]
    train = plain
    if cfg.kd.method:
        clipped = distiller_class(cfg.kd.method).clip_kd_grad if cfg.kd.clip is None else cfg.kd.clip
        table = rates["kd"] if clipped else {**rates["kd"], **rates.get("kd_unclipped", {})}
        train = table.get(cfg.kd.method, plain)
    return train, plain / 3


def project(cfg, rates) -> list[dict]:
    rows = []
    b = rates["batch"]
    for d, c in stage_configs(cfg).items():
        train_ms, eval_ms = step_ms(c, rates)
        if d.endswith("_search"):
            s = c.search
            trained = s.population * s.epochs * c.data.train_size
            rounds = -(-s.epochs // s.perturb_interval)
            evaluated = s.population * rounds * c.data.val_size
        else:
            n = c.data.full_train_size or TRAIN_SIZE.get(c.data.name, 50000)
            trained = c.train.epochs * n
            evaluated = -(-c.train.epochs // (c.train.eval_every or 1)) * TEST_SIZE
        hours = (trained * train_ms + evaluated * eval_ms) / b / 1000 / 3600
        rows.append({"run": d, "trained_images": trained, "evaluated_images": evaluated, "gpu_hours": hours})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--rates", default=None, help="JSON of measured step times (default: the H200 ResNet18 ones)")
    ap.add_argument("--gpus", type=int, default=8)
    a = ap.parse_args()
    rates = json.load(open(a.rates)) if a.rates else H200_RESNET18_B256_MS
    cfg = pipeline_config(a.config, a.overrides)
    rows = project(cfg, rates)
    total = sum(r["gpu_hours"] for r in rows)
    by = {r["run"]: r["gpu_hours"] for r in rows}
    critical = by.get("alpha_search", 0) / a.gpus + by.get("teacher", 0) + by.get("beta_search", 0) / a.gpus + \
        by.get("student", 0)
    print(f"{cfg.name}: projected from {rates.get('source', 'the given rates')}")
    print("| run | images trained | images evaluated | GPU-hours |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['run']} | {r['trained_images']:,} | {r['evaluated_images']:,} | {r['gpu_hours']:.2f} |")
    print(f"| **all runs** | | | **{total:.1f}** |")
    print(f"\none GPU: {total:.1f} h; {a.gpus} GPUs: >= {max(total / a.gpus, critical):.1f} h "
          f"(sum / {a.gpus} = {total / a.gpus:.1f} h, critical path {critical:.1f} h)")


if __name__ == "__main__":
    main()
