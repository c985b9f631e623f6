#!/usr/bin/env bash
# Create (once) a Python venv in the lorafold cache with llama.cpp's own GGUF
# reader (PyPI `gguf`), used by the compatibility tests; print its python.
set -euo pipefail
cache="${LORAFOLD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lorafold}"
venv="$cache/venv"
stamp="$venv/.lorafold-ready-gguf-0.19.0"
mkdir -p "$cache"
exec 9>"$cache/venv.lock"
flock 9
if [ ! -f "$stamp" ]; then
  python3 -m venv "$venv" >&2
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "gguf==0.19.0" >&2
  touch "$stamp"
fi
echo "$venv/bin/python"
