#!/usr/bin/env bash
# Issue 11's measurement: for each shared SmolLM2 adapter, calibrate on its
# train.txt, convert at each type with each rounding (gptq: the defaults, act
# order and damping 0.05; gptq-natural: --act-order false --damp 0.01, the
# reference code's defaults), and measure on its
# held-out eval.txt against the f32 merged model (KL, top-1, gain retained)
# and on the other adapter's eval.txt (text it never saw).
#   scripts/rounding-table.sh OUTDIR [TYPES...]     (default: q4_0 q4_1 q4_k_m)
# With LLAMA_QUANTIZE set (scripts/llama-tools.sh prints its directory), adds
# llama.cpp's `llama-quantize --imatrix` on our merged f32 file with our
# statistics in llama.cpp's imatrix layout.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?give an output directory}; shift
types=${*:-q4_0 q4_1 q4_k_m}
data=${LORAFOLD_SHARED:-../shared/data}/smollm2-adapters
mkdir -p "$out"
cargo build --release --quiet
lf=target/release/lorafold
base=$(scripts/fetch-smollm2.sh)
other() { [ "$1" = pirate ] && echo chef || echo pirate; }
for a in pirate chef; do
  f32="$out/$a-f32.gguf"
  [ -f "$f32" ] || $lf convert --base "$base" --adapter "$data/$a/adapter" --quant f32 -q -o "$f32" >&2
  stats="$out/$a-stats.gguf"
  [ -f "$stats" ] || $lf calibrate "$f32" --text "$data/$a/train.txt" --lines -o "$stats" --imatrix "$out/$a-imatrix.gguf" >&2
  for t in $types; do
    cands=()
    for r in nearest imatrix gptq gptq-natural; do
      o="$out/$a-$t-$r.gguf"
      calib=(); [ $r = nearest ] || calib=(--calib "$stats")
      how=(--rounding "$r"); [ $r = gptq-natural ] && how=(--rounding gptq --act-order false --damp 0.01)
      [ -f "$o" ] || /usr/bin/time -f "$a $t $r: %e s, %M KiB" $lf convert --base "$base" \
        --adapter "$data/$a/adapter" --quant "$t" "${calib[@]}" "${how[@]}" -q -o "$o" 2>>"$out/times.txt" >/dev/null
      cands+=(--cand "$r=$o")
    done
    if [ -n "${LLAMA_QUANTIZE:-}" ]; then
      o="$out/$a-$t-llama-imatrix.gguf"
      T=$(echo "$t" | tr a-z A-Z)
      [ -f "$o" ] || "$LLAMA_QUANTIZE/llama-quantize" --imatrix "$out/$a-imatrix.gguf" "$f32" "$o" "$T" >/dev/null 2>&1
      cands+=(--cand "llama.cpp-imatrix=$o")
    fi
    $lf drift --ref "$f32" --base "$base" --text "$data/$a/eval.txt" --lines "${cands[@]}" --json "$out/$a-$t-own.json" >/dev/null
    $lf drift --ref "$f32" --text "$data/$(other $a)/eval.txt" --lines "${cands[@]}" --json "$out/$a-$t-other.json" >/dev/null
  done
done
python3 - "$out" $types <<'PY'
import json, sys
out, *types = sys.argv[1:]
print("| adapter | type | rounding | KL mean | top-1 | gain retained | KL on the other adapter's text |")
print("|---|---|---|---:|---:|---:|---:|")
for a in ["pirate", "chef"]:
    for t in types:
        own = json.load(open(f"{out}/{a}-{t}-own.json"))
        oth = {c["name"]: c for c in json.load(open(f"{out}/{a}-{t}-other.json"))}
        for c in own:
            print(f"| {a} | {t} | {c['name']} | {c['kl_mean']:.3f} | {100*c['top1_agreement']:.1f}% | "
                  f"{100*c['gain_retained']:.1f}% | {oth[c['name']]['kl_mean']:.3f} |")
PY
