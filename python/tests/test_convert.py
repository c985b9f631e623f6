"""lorafold.convert: the report equals the CLI's JSON, progress, gates, and
Ctrl-C or a failing callback leave no file behind; other Python threads
run while it converts."""

from __future__ import annotations

import _thread
import json
import subprocess
import threading
import time
from pathlib import Path

import pytest

import lorafold
from conftest import PIRATE, no_partials

# Timing and memory differ run to run; everything else must be equal.
UNTIMED = ("wall_seconds", "peak_rss_bytes")


def untimed(report: dict) -> dict:
    report = json.loads(json.dumps(report))
    for k in UNTIMED:
        report["totals"].pop(k)
    report.pop("output")
    return report


def test_report_equals_the_clis_json(smollm2, cli, tmp_path):
    steps = []
    ours = lorafold.convert(
        smollm2, PIRATE, quant="q8_0", out=tmp_path / "py.gguf", progress=steps.append
    )
    theirs_path = tmp_path / "cli.json"
    subprocess.run(
        [str(cli), "convert", "--base", str(smollm2), "--adapter", str(PIRATE), "--quant", "q8_0",
         "-o", str(tmp_path / "cli.gguf"), "--report", str(theirs_path), "-q"],
        check=True,
        capture_output=True,
    )
    theirs = json.loads(theirs_path.read_text())
    assert untimed(ours.to_dict()) == untimed(theirs)
    assert list(ours.to_dict()) == list(theirs)  # same keys, same order
    # Fields, not only the dict: a row per tensor, with the CLI's values.
    assert len(ours.tensors) == ours.totals.n_tensors == len(theirs["tensors"])
    q = next(t for t in ours.tensors if t.name == "blk.0.attn_q.weight")
    cq = next(t for t in theirs["tensors"] if t["name"] == "blk.0.attn_q.weight")
    assert (q.ggml_type, q.rel_error, q.retention) == ("Q8_0", cq["rel_error"], cq["retention"])
    assert 0.9 < q.retention < 1.1  # q8_0 keeps the delta, give or take rounding
    assert ours.output == str(tmp_path / "py.gguf")
    # The same bytes as the CLI's file, and a progress step per tensor.
    assert (tmp_path / "py.gguf").read_bytes() == (tmp_path / "cli.gguf").read_bytes()
    assert [s.done for s in steps] == list(range(1, len(ours.tensors) + 1))
    assert {s.total for s in steps} == {len(ours.tensors)}
    assert [s.tensor for s in steps] == [t.name for t in ours.tensors]


def test_emit_publishes_a_set_with_its_report(smollm2, tmp_path):
    out = tmp_path / "set"
    r = lorafold.convert(smollm2, PIRATE, quant="q8_0", out=out, emit=["merged", "adapter"])
    assert no_partials(out) == ["adapter.gguf", "merged.gguf", "report.json"]
    assert r.output == str(out / "merged.gguf")
    assert r.adapter_gguf["path"] == str(out / "adapter.gguf")
    assert json.loads((out / "report.json").read_text())["totals"]["n_tensors"] == r.totals.n_tensors
    assert no_partials(tmp_path) == ["set"]


def test_a_broken_gate_raises_with_the_report_and_writes_nothing(smollm2, tmp_path):
    with pytest.raises(lorafold.GateError) as e:
        lorafold.convert(smollm2, PIRATE, quant="q4_0", out=tmp_path / "m.gguf", max_rel_error=1e-6)
    assert "exceeds the maximum" in str(e.value) and "no output written" in str(e.value)
    report = e.value.report
    assert report.totals.max_rel_error > 1e-6 and len(report.tensors) == report.totals.n_tensors
    assert no_partials(tmp_path) == []


def test_ctrl_c_stops_the_conversion_and_leaves_no_file(smollm2, tmp_path):
    out = tmp_path / "set"
    seen = []

    def interrupt(step):
        seen.append(step.done)
        if step.done == 3:
            _thread.interrupt_main()  # what Ctrl-C does: SIGINT's flag for the main thread

    with pytest.raises(KeyboardInterrupt):
        lorafold.convert(smollm2, PIRATE, quant="q8_0", out=out, emit="merged", progress=interrupt)
    assert 3 <= len(seen) < 100, seen  # stopped long before SmolLM2's 272 tensors
    assert no_partials(tmp_path) == []


def test_an_exception_in_the_progress_callback_stops_it(smollm2, tmp_path):
    def fail(step):
        raise RuntimeError(f"stop at {step.tensor}")

    with pytest.raises(RuntimeError, match="stop at token_embd.weight"):
        lorafold.convert(smollm2, PIRATE, quant="q8_0", out=tmp_path / "m.gguf", progress=fail)
    assert no_partials(tmp_path) == []


def test_other_threads_run_while_it_converts(smollm2, tmp_path):
    # A thread that must take the GIL back after every sleep: it gets
    # through many loops only if convert releases the GIL while it works
    # (holding it, the thread would be stuck at its first wake-up).
    laps = [0]
    stop = threading.Event()

    def lap():
        while not stop.is_set():
            time.sleep(0.001)
            laps[0] += 1

    t = threading.Thread(target=lap)
    t.start()
    try:
        before = laps[0]
        # With a tqdm bar (progress=True) on the way.
        lorafold.convert(smollm2, PIRATE, quant="q8_0", out=tmp_path / "m.gguf", progress=True)
        during = laps[0] - before
    finally:
        stop.set()
        t.join()
    assert during >= 20, during
