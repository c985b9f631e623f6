#!/usr/bin/env bash
# Build (once) llama.cpp's llama-quantize, llama-imatrix, llama-export-lora and llama-bench from the
# llama-cpp-python 0.3.36 source the tests use (GGML_NATIVE, static, cached)
# and print the directory holding the binaries:
#   tools=$(scripts/llama-tools.sh) && "$tools/llama-imatrix" ... && "$tools/llama-quantize" ...
# Logs go to stderr; stdout is only the directory. Set LLAMA_TOOLS_JOBS to
# change the build parallelism (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."

cache="${LORAFOLD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lorafold}"
dir="$cache/llama-tools-0.3.36"
tools="llama-quantize llama-imatrix llama-export-lora llama-bench"

have_all() {
  local t
  for t in $tools; do [ -x "$dir/$t" ] || return 1; done
}

if ! have_all; then
  mkdir -p "$cache"
  exec 9>"$cache/llama-tools.lock"
  flock 9
  if ! have_all; then
    py=$(scripts/python-env.sh)
    work=$(mktemp -d "$cache/llama-src.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    start=$(date +%s)
    "$py" -m pip install --quiet --disable-pip-version-check cmake ninja >&2
    "$py" -m pip download --quiet --no-deps --no-binary llama-cpp-python --dest "$work" llama-cpp-python==0.3.36 >&2
    tar -xzf "$work"/llama_cpp_python-0.3.36.tar.gz -C "$work"
    bin=$(dirname "$py")
    "$bin/cmake" -S "$work/llama_cpp_python-0.3.36/vendor/llama.cpp" -B "$work/build" -G Ninja \
      -DCMAKE_MAKE_PROGRAM="$bin/ninja" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
      -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
      -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=ON >&2
    # shellcheck disable=SC2086
    "$bin/cmake" --build "$work/build" --target $tools -j "${LLAMA_TOOLS_JOBS:-2}" >&2
    mkdir -p "$dir"
    for t in $tools; do
      cp "$work/build/bin/$t" "$dir/$t.tmp" && mv "$dir/$t.tmp" "$dir/$t"
    done
    echo "llama-tools: built $tools in $(( $(date +%s) - start ))s into $dir" >&2
  fi
fi
echo "$dir"
