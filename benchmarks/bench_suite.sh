#!/usr/bin/env bash
# The README's test command's wall time, two commits side by side on this machine (issue 33):
#
#   bash benchmarks/bench_suite.sh OLD [NEW] [ROUNDS] [FIRST]
#
# OLD and NEW are git revisions (NEW defaults to HEAD). Each round runs `python -m pytest -q` once in a checkout
# of each commit (PYTHONPATH=its src, so the installed rolekd is not used), alternating which goes first (odd
# rounds OLD first; FIRST, default 1, numbers the first round). The checkouts sit beside this repository (the
# tests find ../shared from there). Prints each run's wall time and pytest's last line. Run it on an otherwise
# idle machine: it holds /tmp/rolekd-cpu.lock while it runs.
set -euo pipefail
OLD=${1:?usage: bench_suite.sh OLD [NEW] [ROUNDS] [FIRST]}
NEW=${2:-HEAD}
ROUNDS=${3:-1}
FIRST=${4:-1}
REPO=$(git rev-parse --show-toplevel)
BESIDE=$(dirname "$REPO")
old=$(git -C "$REPO" rev-parse --short "$OLD")
new=$(git -C "$REPO" rev-parse --short "$NEW")
for sha in "$old" "$new"; do
  git -C "$REPO" worktree add -q --detach "$BESIDE/bench_suite_$sha" "$sha"
done
cleanup() {
  for sha in "$old" "$new"; do git -C "$REPO" worktree remove --force "$BESIDE/bench_suite_$sha" 2>/dev/null || true; done
}
trap cleanup EXIT
run() {  # run SHA ROUND
  local dir="$BESIDE/bench_suite_$1" t0 t1 last
  t0=$(date +%s.%N)
  last=$(cd "$dir" && PYTHONPATH="$dir/src" python -m pytest -q -p no:cacheprovider 2>&1 | tail -1) || true
  t1=$(date +%s.%N)
  python -c "print(f'$1 round $2: {$t1 - $t0:.1f} s  ($last)')"
}
exec 9>/tmp/rolekd-cpu.lock
flock 9
for r in $(seq "$FIRST" $((FIRST + ROUNDS - 1))); do
  if (( r % 2 )); then run "$old" "$r"; run "$new" "$r"; else run "$new" "$r"; run "$old" "$r"; fi
done
