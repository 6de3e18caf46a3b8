#!/usr/bin/env bash
# The quickstart's wall time, two commits side by side on this machine (issue 21):
#
#   bash benchmarks/bench_quickstart.sh OLD [NEW] [ROUNDS] [FIRST]
#
# OLD and NEW are git revisions of this repository (NEW defaults to HEAD); each round runs the embedded
# quickstart (`rolekd run train.progress=false`) once with OLD's code and once with NEW's, alternating which
# goes first (odd rounds OLD first; FIRST, default 1, numbers the first round: 2 starts with NEW), each in a
# fresh directory from a checkout of its commit (PYTHONPATH, so the installed rolekd is not used). Prints each run's wall time and, per stage, whether the two commits' test accuracies agree.
# Run it on an otherwise idle machine: it holds /tmp/rolekd-cpu.lock while it runs.
set -euo pipefail
OLD=${1:?usage: bench_quickstart.sh OLD [NEW] [ROUNDS] [FIRST]}
NEW=${2:-HEAD}
ROUNDS=${3:-1}
FIRST=${4:-1}
REPO=$(git rev-parse --show-toplevel)
WORK=$(mktemp -d /tmp/bench_quickstart.XXXXXX)
for rev in "$OLD" "$NEW"; do
  sha=$(git -C "$REPO" rev-parse --short "$rev")
  git -C "$REPO" worktree add -q --detach "$WORK/src_$sha" "$rev"
done
cleanup() {
  for d in "$WORK"/src_*; do git -C "$REPO" worktree remove --force "$d" 2>/dev/null || true; done
}
trap cleanup EXIT
run() {  # run SHA ROUND
  local dir="$WORK/run_$1_$2"
  mkdir -p "$dir"
  local t0 t1
  t0=$(date +%s.%N)
  (cd "$dir" && PYTHONPATH="$WORK/src_$1/src" python -m rolekd.cli run train.progress=false > log.txt 2>&1)
  t1=$(date +%s.%N)
  python -c "print(f'$1 round $2: {$t1 - $t0:.1f} s')" | tee -a "$WORK/walls.txt"
}
old=$(git -C "$REPO" rev-parse --short "$OLD")
new=$(git -C "$REPO" rev-parse --short "$NEW")
exec 9>/tmp/rolekd-cpu.lock
flock 9
for r in $(seq "$FIRST" $((FIRST + ROUNDS - 1))); do
  if (( r % 2 )); then run "$old" "$r"; run "$new" "$r"; else run "$new" "$r"; run "$old" "$r"; fi
done
python - "$WORK" "$old" "$new" "$FIRST" <<'EOF'
import json, pathlib, sys
work, old, new, first = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
walls = {}
for line in (work / "walls.txt").read_text().splitlines():
    sha, _, rnd, sec, _ = line.replace(":", "").split()
    walls.setdefault(sha, []).append(float(sec))
mo, mn = (sum(walls[s]) / len(walls[s]) for s in (old, new))
print(f"mean wall: {old} {mo:.1f} s, {new} {mn:.1f} s, ratio {mn / mo:.3f}")
def accs(sha):
    root = work / f"run_{sha}_{first}" / "runs" / "quickstart"
    return {p.parent.name: json.loads(p.read_text()).get("test_acc") for p in sorted(root.glob("*/result.json"))}
a, b = accs(old), accs(new)
same = [k for k in a if a[k] == b.get(k)]
print(f"test accuracy identical in {len(same)} of {len(a)} stages; differing: "
      + (", ".join(f"{k} {a[k]} vs {b.get(k)}" for k in a if k not in same) or "none"))
EOF
echo "runs kept in $WORK"
