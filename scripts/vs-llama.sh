#!/usr/bin/env bash
# lorafold's runtime against llama.cpp on the same files and threads:
#   scripts/vs-llama.sh [-p 128] [-n 64] [-r 3] [-t "1 2"] FILE.gguf...
# Builds llama.cpp's llama-bench once (scripts/llama-tools.sh: the
# llama-cpp-python 0.3.36 source the tests use, GGML_NATIVE, cached), builds `lorafold` in release, then for
# each file and thread count runs ours and theirs alternately, `rounds` times,
# and prints the medians and the ratio ours/llama.cpp for prefill and decode.
# LLAMA_BENCH=PATH uses another llama-bench (e.g. built without AVX-512);
# LORAFOLD_ISA=avx2 caps ours to match.
set -euo pipefail
cd "$(dirname "$0")/.."
p=128 n=64 r=3 threads="1 2" rounds=3
while getopts "p:n:r:t:k:" o; do
  case $o in
    p) p=$OPTARG ;; n) n=$OPTARG ;; r) r=$OPTARG ;; t) threads=$OPTARG ;; k) rounds=$OPTARG ;;
    *) echo "usage: $0 [-p N] [-n N] [-r reps] [-t 'THREADS...'] [-k rounds] FILE.gguf..." >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[ $# -gt 0 ] || { echo "give at least one GGUF file" >&2; exit 2; }

py=$(scripts/python-env.sh)
# LLAMA_BENCH: another llama-bench build to compare with (an AVX2-only
# one, say); LORAFOLD_ISA caps ours the same way.
bench="${LLAMA_BENCH:-$(scripts/llama-tools.sh)/llama-bench}"
cargo build --release --quiet
# Where cargo put it: a CARGO_TARGET_DIR outside the repository is honoured.
ours="${CARGO_TARGET_DIR:-target}/release/lorafold"

"$py" - "$ours" "$bench" "$p" "$n" "$r" "$rounds" "$threads" "$@" <<'PY'
import json, os, statistics, subprocess, sys
ours, bench, p, n, r, rounds, threads, *files = sys.argv[1:]
rows = []
for f in files:
    size = os.path.getsize(f)
    for t in threads.split():
        got = {"ours_pp": [], "ours_tg": [], "llama_pp": [], "llama_tg": [], "rss": []}
        for _ in range(int(rounds)):
            o = json.loads(subprocess.run([ours, "bench", f, "-p", p, "-n", n, "-r", r,
                "--threads", t, "--json"], check=True, capture_output=True, text=True).stdout)[0]
            got["ours_pp"].append(o["prefill_tps"]["mean"]); got["ours_tg"].append(o["decode_tps"]["mean"])
            got["rss"].append(o["rss_bytes"])
            l = json.loads(subprocess.run([bench, "-m", f, "-p", p, "-n", n, "-r", r, "-t", t,
                "-o", "json"], check=True, capture_output=True, text=True).stdout)
            for e in l:
                key = "llama_pp" if e["n_prompt"] > 0 else "llama_tg"
                got[key].append(e["avg_ts"])
        m = {k: statistics.median(v) for k, v in got.items()}
        rows.append((os.path.basename(f), t, m, size))
print(f"{'file':<34} {'thr':>3} {'prefill ours/llama t/s':>24} {'ratio':>6} {'decode ours/llama t/s':>23} {'ratio':>6} {'RSS MiB':>8} {'file MiB':>8}")
for name, t, m, size in rows:
    print(f"{name:<34} {t:>3} {m['ours_pp']:>11.1f} / {m['llama_pp']:<10.1f} {m['ours_pp']/m['llama_pp']:>6.2f} "
          f"{m['ours_tg']:>10.1f} / {m['llama_tg']:<10.1f} {m['ours_tg']/m['llama_tg']:>6.2f} {m['rss']/2**20:>8.1f} {size/2**20:>8.1f}")
PY
