#!/usr/bin/env bash
# lorafold against llama.cpp at 7B, on the stand-in scripts/make-standin.sh
# builds (real Qwen2 7B header, seeded Q4_K_M weights), same files and threads:
#   scripts/scale-7b.sh convert [-k rounds] [QUANT...]   # default q4_0 q8_0 q4_k_m
#   scripts/scale-7b.sh run [-k rounds] [-t threads] [-p N] [-n N]
# convert: `lorafold convert` and `llama-quantize --allow-requantize`,
# alternated, each timed by /usr/bin/time: wall, CPU, peak RSS, minor faults.
# run: load, first token, prefill and decode t/s and RSS; ours from
# `lorafold bench --json`, llama.cpp's from llama-cpp-python (load and RSS)
# and llama-bench (t/s). Medians over the rounds. Needs ~15 GB free disk
# beside the model for conversion outputs, removed after each run.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:?convert or run}; shift
rounds=2 threads=2 p=32 n=8
while getopts "k:t:p:n:" o; do
  case $o in
    k) rounds=$OPTARG ;; t) threads=$OPTARG ;; p) p=$OPTARG ;; n) n=$OPTARG ;;
    *) sed -n '2,12p' "$0" >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
model=$(scripts/make-standin.sh)
tools=$(scripts/llama-tools.sh)
py=$(scripts/python-env.sh --llama)
cargo build --release --quiet
ours=${CARGO_TARGET_DIR:-target}/release/lorafold
out=$(dirname "$model")/scale-7b-out.gguf
trap 'rm -f "$out"' EXIT

# /usr/bin/time's figures for one command: wall user sys maxrss_kb minflt.
timed() {
  /usr/bin/time -f "%e %U %S %M %R" -o /tmp/scale-7b.time "$@" >/dev/null 2>&1
  cat /tmp/scale-7b.time
}

case $mode in
convert)
  quants=${*:-q4_0 q8_0 q4_k_m}
  printf '%-8s %-6s %8s %8s %8s %9s %9s\n' quant tool wall_s user_s sys_s rss_MiB minflt
  for q in $quants; do
    Q=$(echo "$q" | tr a-z A-Z)
    for _ in $(seq "$rounds"); do
      echo "ours $(timed "$ours" convert --base "$model" --quant "$q" -o "$out" -q)"; rm -f "$out"
      echo "llama $(timed "$tools/llama-quantize" --allow-requantize "$model" "$out" "$Q" "$threads")"; rm -f "$out"
    done | "$py" -c '
import sys, statistics
rows = {}
for line in sys.stdin:
    tool, *v = line.split()
    rows.setdefault(tool, []).append([float(x) for x in v])
for tool, vs in rows.items():
    m = [statistics.median(c) for c in zip(*vs)]
    print(f"{sys.argv[1]:<8} {tool:<6} {m[0]:8.1f} {m[1]:8.1f} {m[2]:8.1f} {m[3]/1024:9.0f} {m[4]:9.0f}")
' "$q"
  done
  ;;
run)
  for _ in $(seq "$rounds"); do
    "$ours" bench "$model" -p "$p" -n "$n" -r 1 --threads "$threads" --json
    "$py" - "$model" "$threads" <<'PY'
import json, resource, sys, time
from llama_cpp import Llama
t0 = time.perf_counter()
m = Llama(model_path=sys.argv[1], n_ctx=256, n_threads=int(sys.argv[2]), verbose=False)
load = time.perf_counter() - t0
m.eval([1, 2])
print(json.dumps({"llama_load_ms": load * 1e3, "llama_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
PY
    "$tools/llama-bench" -m "$model" -p "$p" -n "$n" -r 1 -t "$threads" -o json
  done | tee /tmp/scale-7b-run.json | "$py" -c '
import json, statistics, sys
ours, llama = {"load": [], "ttft": [], "pp": [], "tg": [], "rss": []}, {"load": [], "pp": [], "tg": [], "rss": []}
dec = json.JSONDecoder(); text = sys.stdin.read(); i = 0
while i < len(text):
    if text[i].isspace(): i += 1; continue
    v, i = dec.raw_decode(text, i)
    for e in (v if isinstance(v, list) else [v]):
        if "load_ms" in e:
            ours["load"].append(e["load_ms"]["mean"]); ours["ttft"].append(e["ttft_ms"]["mean"])
            ours["pp"].append(e["prefill_tps"]["mean"]); ours["tg"].append(e["decode_tps"]["mean"])
            ours["rss"].append(e["peak_rss_bytes"])
        elif "llama_load_ms" in e:
            llama["load"].append(e["llama_load_ms"]); llama["rss"].append(e["llama_rss_bytes"])
        elif "n_prompt" in e:
            llama["pp" if e["n_prompt"] > 0 else "tg"].append(e["avg_ts"])
md = lambda d: {k: statistics.median(v) for k, v in d.items() if v}
o, l = md(ours), md(llama)
g = lambda d, k: d.get(k, float("nan"))
ol, ot, op, og, orss = (g(o, k) for k in ("load", "ttft", "pp", "tg", "rss"))
ll, lp, lg, lrss = (g(l, k) for k in ("load", "pp", "tg", "rss"))
print(f"threads {sys.argv[1]}   ours / llama.cpp (ratio)")
print(f"load ms      {ol:8.0f} / {ll:8.0f}")
print(f"ttft ms      {ot:8.0f}")
print(f"prefill t/s  {op:8.2f} / {lp:8.2f}  ({op/lp:.2f})")
print(f"decode t/s   {og:8.2f} / {lg:8.2f}  ({og/lg:.2f})")
print(f"peak RSS MiB {orss/2**20:8.0f} / {lrss/2**20:8.0f}")
' "$threads"
  ;;
*) sed -n '2,12p' "$0" >&2; exit 2 ;;
esac
