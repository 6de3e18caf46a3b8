"""benchmarks/gpu_session.sh cannot rot unnoticed: its dry mode (CPU, no GPU) parses every command of every
mode with that command's own argument parser (and validates the rolekd configs and overrides it passes), then
runs its multi-GPU pipeline row at micro size on CPU with 2 workers."""

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"


def test_every_gpu_session_command_parses_and_the_pipeline_row_runs_on_cpu(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), OMP_NUM_THREADS="1")
    done = subprocess.run(["bash", str(SCRIPT), "dry"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    steps = re.findall(r"^\s*step \S+ (\w+) ", SCRIPT.read_text(), re.M)
    oks = re.findall(r"^dry: ok ", done.stdout, re.M)
    assert len(steps) >= 15 and len(oks) == len(steps) + 1  # + mode_early's call of the mini row
    assert (tmp_path / "dry_pipeline" / "report.md").is_file()
    assert "2 worker processes" in (tmp_path / "dry_pipeline.log").read_text()
