"""The README's Python example runs as written (from a copy of the repository
root's layout), and the release gate passes and fails as it should."""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys

import lorafold
from conftest import PIRATE, REPO

GATE = REPO / "python" / "examples" / "release_gate.py"


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("\n## Python\n") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_runs_as_written(tmp_path):
    code = readme_example()
    assert len(code.strip().splitlines()) <= 10
    # The example runs from the repository root; its outputs go here.
    for name in ("scripts", "examples"):
        (tmp_path / name).symlink_to(REPO / name)
    out = io.StringIO()
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code, "README.md", "exec"), {})
    finally:
        os.chdir(cwd)
    lines = out.getvalue().splitlines()
    assert re.match(r"\d+ bytes, adapter retention [01]\.\d{3}$", lines[0]), lines
    assert "Lisbon, matey" in lines[1], lines
    assert "Portugal" in lines[2] and "matey" not in lines[2], lines
    assert sorted(p.name for p in (tmp_path / "pirate-py").iterdir()) == [
        "adapter.gguf",
        "merged.gguf",
        "report.json",
    ]


def gate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(GATE), *args], capture_output=True, text=True
    )


def few_lines(tmp_path, n: int = 4):
    """The adapter's first held-out lines: drift runs every model over every
    position's whole vocabulary, so the tests keep the text short."""
    text = tmp_path / "eval-few.txt"
    text.write_text("".join((PIRATE / "eval.txt").read_text().splitlines(True)[:n]))
    return text


def test_the_release_gate_passes_and_fails(smollm2, tmp_path):
    common = [str(smollm2), str(PIRATE), str(few_lines(tmp_path)), "--quant", "q8_0"]
    ok = gate(*common, "--min-gain", "0.9", "--out", str(tmp_path / "ok"))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.strip().endswith("PASS"), ok.stdout
    kept = float(re.search(r"gain kept ([\d.]+)%", ok.stdout).group(1))
    assert 90.0 <= kept <= 110.0, ok.stdout
    # A bar no file can reach: exit 1, with the reason.
    bad = gate(*common, "--min-gain", "1.5", "--out", str(tmp_path / "bad"))
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "FAIL: gain kept" in bad.stdout
    # A KL from the base no adapter reaches: reported as not applied.
    same = gate(*common, "--min-kl", "1e9", "--out", str(tmp_path / "same"))
    assert same.returncode == 1 and "FAIL: the adapter is not applied" in same.stdout, same.stdout


def test_drift_and_bench_equal_the_clis_json(smollm2, cli, pirate_gguf, tmp_path):
    text = few_lines(tmp_path)
    full = (smollm2, pirate_gguf)
    rows = lorafold.drift(full, {"half": (smollm2, pirate_gguf, 0.5)}, text, base=smollm2, lines=True)
    out = tmp_path / "drift.json"
    subprocess.run(
        [str(cli), "drift", "--ref", f"{smollm2}+{pirate_gguf}", "--cand", f"half={smollm2}+{pirate_gguf}:0.5",
         "--text", str(text), "--base", str(smollm2), "--lines", "--json", str(out)],
        check=True,
        capture_output=True,
    )
    import json

    theirs = json.loads(out.read_text())
    assert [r.to_dict() for r in rows] == theirs
    assert rows[0].kl_mean > 0.01 and 0.0 < rows[0].gain_retained < 1.0, rows
    b = lorafold.bench(smollm2, prompt=8, n=4, reps=1)
    assert len(b) == 1 and b[0].path == str(smollm2)
    assert b[0].decode_tps.mean > 0 and b[0].mapped_bytes == os.path.getsize(smollm2)
