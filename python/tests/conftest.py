"""Shared fixtures: the repository, SmolLM2 (fetched into the cache on first
use, as the Rust tests do), the pirate adapter, the CLI and the Rust
reference binary (built by `cargo test --workspace`, or here if missing)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

import lorafold

REPO = Path(__file__).resolve().parents[2]
PIRATE = REPO / "examples" / "adapters" / "pirate"
PROMPT = "Q: What is the capital of Portugal? A:"
THREADS = 2


def _target() -> Path:
    return Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))


def _cargo_binary(relative: str, build: list) -> Path:
    path = _target() / "debug" / relative
    if not path.exists():
        subprocess.run(["cargo", "build", "-q", *build], cwd=REPO, check=True)
    return path


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def smollm2() -> Path:
    out = subprocess.run(
        [str(REPO / "scripts" / "fetch-smollm2.sh")], capture_output=True, text=True, check=True
    )
    return Path(out.stdout.strip())


@pytest.fixture(scope="session")
def cli() -> Path:
    """The `lorafold` CLI (dev build)."""
    return _cargo_binary("lorafold", ["--bin", "lorafold"])


@pytest.fixture(scope="session")
def ref_logits() -> Path:
    """python/tests/ref_logits.rs: logits from the Rust API."""
    return _cargo_binary("examples/ref_logits", ["-p", "lorafold-py", "--example", "ref_logits"])


@pytest.fixture(scope="session")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lorafold")


@pytest.fixture(scope="session")
def pirate_gguf(smollm2: Path, work: Path) -> Path:
    """The pirate adapter as a llama.cpp LoRA GGUF for SmolLM2."""
    out = work / "pirate-set"
    report = lorafold.convert(smollm2, PIRATE, out=out, emit="adapter")
    assert report.adapter_gguf is not None and report.tensors == []
    return out / "adapter.gguf"


@pytest.fixture(scope="session")
def model(smollm2: Path) -> lorafold.Model:
    return lorafold.Model(smollm2, threads=THREADS)


def no_partials(folder: Path) -> list:
    """What a folder holds (a cancelled or failed conversion must leave nothing)."""
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


__all__ = ["PIRATE", "PROMPT", "REPO", "THREADS", "no_partials", "shutil"]
