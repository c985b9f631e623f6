#!/usr/bin/env bash
# aarch64 from an x86_64 Debian 12 machine: Debian's rustc-web (1.96, with its
# arm64 standard library) cross-builds, qemu-user runs. Usage, from anywhere:
#
#   scripts/aarch64.sh setup                 install the toolchain (root, apt)
#   scripts/aarch64.sh test TIER [ARGS...]   cargo test ARGS (default: -p lorafold-kernels)
#                                            under qemu's CPU model for TIER
#   scripts/aarch64.sh run TIER PROG [ARGS]  run an aarch64 binary at TIER
#   scripts/aarch64.sh dist                  release CLI + liblorafold.{a,so} + lorafold.h
#                                            in dist/aarch64-unknown-linux-gnu/
#
# TIER is neon | neon-dotprod | neon-i8mm, emulated by qemu's cortex-a53 (NEON
# only: a dotprod instruction there is SIGILL), neoverse-n1 (dotprod, no i8mm)
# and max (both). `test` sets LORAFOLD_EXPECT_ISA to TIER, so the kernels'
# detection test fails unless the dispatch picked exactly that tier.
# qemu's timings are not a phone's: it runs some vector instructions through
# helper calls. Builds go to $CARGO_TARGET_DIR or else target/aarch64/, apart from the host's, so that
# both can build at once (cargo locks a target folder) and a second rustc's
# fingerprints never invalidate the host's.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=aarch64-unknown-linux-gnu

setup() {
  if ! dpkg -s rustc-web cargo-web libstd-rust-web-dev:arm64 gcc-aarch64-linux-gnu \
    libc6-dev-arm64-cross qemu-user >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    dpkg --add-architecture arm64
    apt-get update -q
    apt-get install -y -q --no-install-recommends rustc-web cargo-web \
      libstd-rust-web-dev:arm64 gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user
  fi
  # Debian's 1.96 beside rustup's toolchain, as "debweb".
  rustup toolchain list | grep -q '^debweb' || rustup toolchain link debweb /usr
}

cpu_of() {
  case "$1" in
    neon) echo cortex-a53 ;;
    neon-dotprod) echo neoverse-n1 ;;
    neon-i8mm) echo max ;;
    *) echo "unknown tier $1 (neon | neon-dotprod | neon-i8mm)" >&2; exit 2 ;;
  esac
}

cargo_arm() {
  # Plain qemu-aarch64 finds /lib/ld-linux-aarch64.so.1 from libc6:arm64; do
  # not add -L /usr/aarch64-linux-gnu (mixing the two libcs hangs on the
  # first thread spawn).
  CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/aarch64} \
    CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
    CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -cpu ${QEMU_CPU:-max}" \
    cargo +debweb "$@"
}

cmd=${1:-}
shift || true
case "$cmd" in
  setup) setup ;;
  test)
    tier=${1:?tier}
    shift
    [ $# -gt 0 ] || set -- -p lorafold-kernels
    QEMU_CPU=$(cpu_of "$tier") LORAFOLD_EXPECT_ISA=$tier cargo_arm test --target $TARGET "$@"
    ;;
  run)
    tier=${1:?tier}
    shift
    exec qemu-aarch64 -cpu "$(cpu_of "$tier")" "$@"
    ;;
  dist)
    cargo_arm build --release --target $TARGET -p lorafold -p lorafold-ffi
    out=dist/$TARGET
    mkdir -p "$out"
    rel=${CARGO_TARGET_DIR:-target/aarch64}/$TARGET/release
    cp "$rel/lorafold" "$rel/liblorafold.a" "$rel/liblorafold.so" "$out/"
    aarch64-linux-gnu-strip "$out/lorafold" "$out/liblorafold.so"
    aarch64-linux-gnu-strip --strip-debug "$out/liblorafold.a"
    cp ffi/include/lorafold.h "$out/" 2>/dev/null || true
    ls -l "$out"
    ;;
  *)
    sed -n '2,18p' "$0" >&2
    exit 2
    ;;
esac
