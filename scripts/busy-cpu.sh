#!/usr/bin/env bash
# Decode speed on a busy CPU, ours against llama.cpp on the same file:
#   scripts/busy-cpu.sh [-k rounds] [-n tokens] [-b "0 1 2"] FILE.gguf
# For each count of busy processes (shell loops spinning beside the run),
# decode t/s at 1 and 2 threads, lorafold and llama-bench alternated,
# `rounds` times; prints medians, each run's share of its idle speed and the
# 2-thread / 1-thread ratio. Run it on an otherwise idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=5 n=64 busy="0 1 2"
while getopts "k:n:b:" o; do
  case $o in
    k) rounds=$OPTARG ;; n) n=$OPTARG ;; b) busy=$OPTARG ;;
    *) sed -n '2,7p' "$0" >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
file=${1:?give a GGUF file}
py=$(scripts/python-env.sh)
bench="${LLAMA_BENCH:-$(scripts/llama-tools.sh)/llama-bench}"
cargo build --release --quiet
ours="${CARGO_TARGET_DIR:-target}/release/lorafold"
spinners=()
stop_spinners() {
  for p in "${spinners[@]}"; do kill "$p" 2>/dev/null || true; done
  spinners=()
}
trap stop_spinners EXIT
{
for b in $busy; do
  stop_spinners
  for _ in $(seq "$b"); do
    # Not on the pipe to the summary, which would then never end.
    sh -c 'while :; do :; done' >/dev/null 2>&1 &
    spinners+=($!)
  done
  for _ in $(seq "$rounds"); do
    for t in 1 2; do
      o=$("$ours" bench "$file" -p 8 -n "$n" -r 1 --threads "$t" --json)
      echo "$b ours $t $("$py" -c 'import json,sys; print(json.load(sys.stdin)[0]["decode_tps"]["mean"])' <<<"$o")"
      l=$("$bench" -m "$file" -p 0 -n "$n" -r 1 -t "$t" -o json)
      echo "$b llama $t $("$py" -c 'import json,sys; print(json.load(sys.stdin)[0]["avg_ts"])' <<<"$l")"
    done
  done
done
stop_spinners
} | "$py" -c '
import sys, statistics
runs = {}
for line in sys.stdin:
    b, tool, t, v = line.split()
    runs.setdefault((int(b), tool, int(t)), []).append(float(v))
m = {k: statistics.median(v) for k, v in runs.items()}
print("%4s %-6s %9s %10s %6s %17s" % ("busy", "tool", "1 thread", "2 threads", "2t/1t", "2t share of idle"))
for (b, tool) in sorted({(b, tool) for b, tool, _ in m}):
    one, two = m.get((b, tool, 1)), m.get((b, tool, 2))
    idle = m.get((0, tool, 2))
    share = f"{two / idle:.0%}" if idle else "-"
    print(f"{b:>4} {tool:<6} {one:>9.1f} {two:>10.1f} {two / one:>6.2f} {share:>17}")
'
