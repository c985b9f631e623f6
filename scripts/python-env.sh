#!/usr/bin/env bash
# Create (once) a Python venv in the lorafold cache with llama.cpp's own GGUF
# reader (PyPI `gguf`), and with --llama also llama.cpp itself (PyPI
# `llama-cpp-python`, which pip builds from source: minutes, once); print its
# python. Used by the compatibility tests.
set -euo pipefail
cache="${LORAFOLD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lorafold}"
venv="$cache/venv"
mkdir -p "$cache"
exec 9>"$cache/venv.lock"
flock 9
pip() { "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$@" >&2; }
if [ ! -f "$venv/.lorafold-ready-gguf-0.19.0" ]; then
  python3 -m venv "$venv" >&2
  pip "gguf==0.19.0"
  touch "$venv/.lorafold-ready-gguf-0.19.0"
fi
if [ "${1:-}" = "--llama" ] && [ ! -f "$venv/.lorafold-ready-llama-cpp-python-0.3.36" ]; then
  # The tests need only libllama: skipping llava/mtmd, the tools, the HTTP
  # library and common cut the from-source build from ~10.7 to ~4 minutes on
  # 2 cores. Flags given by the caller come last and win.
  CMAKE_ARGS="-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_COMMON=OFF -DLLAMA_CURL=OFF -DLLAMA_HTTPLIB=OFF ${CMAKE_ARGS:-}" \
    pip "llama-cpp-python==0.3.36"
  touch "$venv/.lorafold-ready-llama-cpp-python-0.3.36"
fi
echo "$venv/bin/python"
