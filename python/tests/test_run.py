"""Model, Adapter, Session and the generation iterator on SmolLM2 with the
pirate adapter: the same answers as the CLI's tests (tests/all/run_cli.rs),
and logits equal to the Rust API's."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

import lorafold
from conftest import PROMPT, THREADS


def answer(model: lorafold.Model, prompt: str = PROMPT, n: int = 8) -> str:
    pieces = list(model.generate(prompt, n))
    # An iterator of pieces, not one string at the end.
    assert len(pieces) > 1, pieces
    return "".join(pieces)


def test_pirate_answers_with_the_adapter_and_the_base_without(model, pirate_gguf):
    adapter = lorafold.Adapter(pirate_gguf)
    assert adapter.arch == "llama"
    assert "blk.0.attn_q.weight" in adapter.targets
    base = answer(model)
    assert "Portugal" in base and "matey" not in base, base
    slot = model.attach(adapter, 1.0)
    try:
        assert model.scale(slot) == 1.0
        # The reference's merged fp32 model says " Lisbon, matey, ..." here.
        with_adapter = answer(model)
        assert "Lisbon, matey" in with_adapter, with_adapter
        model.set_scale(slot, 0.0)
        assert answer(model) == base
        model.set_scale(slot, 1.0)
        with model.session() as s:
            assert "".join(s.generate(PROMPT, 8)) == with_adapter
    finally:
        model.detach(slot)
    assert model.scale(slot) is None
    assert answer(model) == base


def test_session_continues_the_conversation_and_reports_stats(model):
    with model.session() as s:
        g = s.generate("The capital of France is", 4)
        text = "".join(g)
        assert text.startswith(" Paris"), text
        st = g.stats
        assert st["prompt_tokens"] == len(model.tokenize("The capital of France is"))
        assert st["generated"] == 4 == len(g.tokens)
        assert model.detokenize(g.tokens) == text
        # The last sampled token is not run: a generation left there costs no step.
        assert s.position == st["prompt_tokens"] + 3
        s.reset()
        assert s.position == 0


def test_chat_turns_follow_the_template(model):
    with model.session() as s:
        first = "".join(s.generate("What is the capital of France?", 20, chat=True))
        second = "".join(s.generate("And of Italy?", 20, chat=True))
    assert "Paris" in first, first
    # "And of Italy?" only makes sense with the first turn in the cache.
    assert "Rome" in second, second


def test_tokenize_round_trips(model):
    ids = model.tokenize("Hello, pirate world!")
    assert all(isinstance(i, int) for i in ids)
    assert model.detokenize(ids) == "Hello, pirate world!"


def rust_logits(ref_logits: Path, spec: str, ids: list, vocab: int) -> np.ndarray:
    out = subprocess.run(
        [str(ref_logits), spec, str(THREADS), ",".join(map(str, ids))],
        capture_output=True,
        check=True,
    ).stdout
    return np.frombuffer(out, dtype="<f4").reshape(len(ids), vocab)


def test_logits_equal_the_rust_apis(model, smollm2, pirate_gguf, ref_logits):
    ids = model.tokenize(PROMPT)
    vocab = model.vocab_size
    wants = []
    for spec, scale in [(str(smollm2), None), (f"{smollm2}+{pirate_gguf}:0.5", 0.5)]:
        slot = None if scale is None else model.attach(lorafold.Adapter(pirate_gguf), scale)
        try:
            with model.session(ctx=len(ids)) as s:
                got = s.logits(ids, all=True)
                assert got.shape == (len(ids), vocab) and got.dtype == np.float32
                assert s.position == len(ids)
            with model.session() as s:
                last = s.logits(ids)
        finally:
            if slot is not None:
                model.detach(slot)
        want = rust_logits(ref_logits, spec, ids, vocab)
        wants.append(want)
        # The same engine, threads and KV type: the same bits (tolerance 0).
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(last, want[-1])
    # The adapter changes them (so the comparison above compared something).
    assert np.abs(wants[0] - wants[1]).max() > 0.1


def test_logits_arrays_own_their_memory(model):
    with model.session() as s:
        a = s.logits(model.tokenize("Hello"))
        b = s.logits(model.tokenize(" world"))
    # Each call's array is its own (the engine's buffer is reused).
    assert not np.shares_memory(a, b)
    assert a.flags["C_CONTIGUOUS"] and a.flags["WRITEABLE"]
