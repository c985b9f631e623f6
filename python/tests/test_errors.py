"""Every exception class, reached by a bad input, with the library's
one-line message naming the file; never a panic."""

from __future__ import annotations

from pathlib import Path

import pytest

import lorafold
from conftest import PIRATE, REPO, no_partials


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg, msg
    return msg


def test_hierarchy():
    for cls in (
        lorafold.FileError,
        lorafold.AdapterMismatchError,
        lorafold.OutOfRangeError,
        lorafold.ContextOverflowError,
        lorafold.UsageError,
        lorafold.GateError,
    ):
        assert issubclass(cls, lorafold.LorafoldError)
    assert issubclass(lorafold.OutOfRangeError, ValueError)
    assert issubclass(lorafold.UsageError, ValueError)


def test_file_errors(smollm2, tmp_path):
    with pytest.raises(lorafold.FileError) as e:
        lorafold.Model(tmp_path / "missing.gguf")
    assert one_line(e) == f"{tmp_path / 'missing.gguf'}: No such file or directory (os error 2)"
    with pytest.raises(lorafold.FileError) as e:
        lorafold.Adapter(smollm2)
    assert "not a LoRA adapter" in one_line(e) and str(smollm2) in str(e.value)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(Path(smollm2).read_bytes()[:2_000_000])
    with pytest.raises(lorafold.FileError) as e:
        lorafold.Model(cut)
    assert "runs past the end of the file" in one_line(e) and "tensor '" in str(e.value)
    with pytest.raises(lorafold.FileError) as e:
        lorafold.convert(smollm2, tmp_path, out=tmp_path / "m.gguf")
    assert one_line(e).startswith(f"{tmp_path / 'adapter_config.json'}: No such file")


def test_adapter_mismatch(smollm2, tmp_path):
    tiny = Path(__file__).resolve().parents[3] / "shared" / "data" / "tiny-llama" / "lora_all"
    if not tiny.exists():
        tiny = REPO.parent / "shared" / "data" / "tiny-llama" / "lora_all"
    with pytest.raises(lorafold.AdapterMismatchError) as e:
        lorafold.convert(smollm2, tiny, quant="q8_0", out=tmp_path / "m.gguf")
    assert "tensor '" in one_line(e)
    assert no_partials(tmp_path) == []


def test_out_of_range(model, pirate_gguf, smollm2, tmp_path):
    adapter = lorafold.Adapter(pirate_gguf)
    with pytest.raises(lorafold.OutOfRangeError) as e:
        model.attach(adapter, 1e9)
    assert one_line(e).startswith("adapter scale 1e9 is out of range")
    with pytest.raises(lorafold.OutOfRangeError):
        model.set_scale(99, 1.0)
    with pytest.raises(lorafold.OutOfRangeError):
        lorafold.Model(smollm2, threads=100_000)
    with pytest.raises(lorafold.OutOfRangeError):
        model.session(ctx=10**9)
    with pytest.raises(lorafold.OutOfRangeError) as e:
        lorafold.convert(smollm2, PIRATE, quant="q9_9", out=tmp_path / "m.gguf")
    assert "unknown quantization 'q9_9'" in one_line(e)
    with pytest.raises(lorafold.OutOfRangeError):
        lorafold.convert(smollm2, PIRATE, out=tmp_path / "m.gguf", calib_text=PIRATE / "eval.txt", min_gain=1.5)
    with pytest.raises(lorafold.OutOfRangeError):
        model.generate("x", temperature=float("nan"))
    with model.session() as s:
        with pytest.raises(lorafold.OutOfRangeError) as e:
            s.logits([model.vocab_size])
        assert "token id 49152 is out of range" in one_line(e)
    with pytest.raises(lorafold.OutOfRangeError):
        model.detokenize([10**6])
    assert no_partials(tmp_path) == []


def test_context_overflow(smollm2):
    small = lorafold.Model(smollm2, threads=2, ctx=8)
    with small.session() as s:
        with pytest.raises(lorafold.ContextOverflowError) as e:
            s.generate("one two three four five six seven eight nine ten eleven")
        assert "the context has room for 8 of its 8" in one_line(e)
        with pytest.raises(lorafold.ContextOverflowError):
            s.logits(list(range(9)))
        s.logits(list(range(8)))
        with pytest.raises(lorafold.ContextOverflowError):
            s.logits([1])


def test_usage_errors(model, pirate_gguf, smollm2, tmp_path):
    with pytest.raises(lorafold.UsageError) as e:
        lorafold.convert(smollm2, PIRATE, out=smollm2)
    assert "refusing to replace an input" in one_line(e)
    with pytest.raises(lorafold.UsageError):
        lorafold.convert(smollm2, PIRATE, out=tmp_path / "s", emit="everything")
    with pytest.raises(lorafold.UsageError):
        lorafold.convert(smollm2, PIRATE, out=tmp_path / "m.gguf", budget_kl=0.1)
    s = model.session()
    with pytest.raises(lorafold.UsageError) as e:
        model.attach(lorafold.Adapter(pirate_gguf))
    assert "session(s) of this model are open" in one_line(e)
    s.close()
    s.close()
    with pytest.raises(lorafold.UsageError, match="the session is closed"):
        s.logits([1])
    slot = model.attach(lorafold.Adapter(pirate_gguf))
    model.detach(slot)
    with model.session() as s:
        g = s.generate("The capital of France is", 8)
        next(g)
        s.logits([1])
        with pytest.raises(lorafold.UsageError, match="another call on this session"):
            next(g)
    assert no_partials(tmp_path) == []
