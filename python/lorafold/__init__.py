"""lorafold: convert LoRA-fine-tuned LLMs (a base plus a PEFT adapter) into
GGUF, run them on the CPU with adapters attached at run time, and measure
what each path costs in drift and latency.

>>> import lorafold
>>> report = lorafold.convert("base.gguf", "adapter/", quant="q8_0", out="merged.gguf")
>>> model = lorafold.Model("merged.gguf")
>>> print("".join(model.generate("Q: What is the capital of Portugal? A:", 8)))

Long calls (convert, generation, drift, bench) release the GIL, so other
Python threads run meanwhile; Ctrl-C stops a conversion between tensors
and leaves no partial file. Errors are ``lorafold.errors`` exceptions.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from . import _lorafold
from ._lorafold import Adapter, Generation, Model, Session, set_threads
from ._reports import BenchRow, ConvertReport, DriftRow, ProgressStep, Stat, TensorRow, Totals, _build
from .errors import (
    AdapterMismatchError,
    ContextOverflowError,
    FileError,
    GateError,
    LorafoldError,
    OutOfRangeError,
    UsageError,
)

__version__: str = _lorafold.version()

PathLike = Union[str, "os.PathLike[str]"]
Progress = Union[Callable[[ProgressStep], object], bool, None]


def _tqdm_progress() -> Callable[[ProgressStep], object]:
    """A tqdm bar over tensors (``progress=True``)."""
    try:
        from tqdm import tqdm  # type: ignore[import-not-found,import-untyped]
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise UsageError("progress=True draws a tqdm bar: pip install tqdm") from e
    bar = None

    def step(s: ProgressStep) -> None:
        nonlocal bar
        if bar is None or s.done == 1:  # a drift budget converts once per round
            if bar is not None:
                bar.close()
            bar = tqdm(total=s.total, unit="tensor", desc="convert")
        bar.update(1)
        bar.set_postfix_str(s.tensor, refresh=False)
        if s.done == s.total:
            bar.close()

    return step


def convert(
    base: PathLike,
    adapter: Optional[PathLike] = None,
    quant: str = "q4_k_m",
    out: Optional[PathLike] = None,
    emit: Union[str, Sequence[str], None] = None,
    calib_text: Optional[PathLike] = None,
    rounding: Optional[str] = None,
    budget_kl: Optional[float] = None,
    min_gain: Optional[float] = None,
    compensate: Optional[int] = None,
    progress: Progress = None,
    *,
    tensor_type: Sequence[str] = (),
    adapter_type: str = "f16",
    max_rel_error: Optional[float] = None,
    min_retention: Optional[float] = None,
    force: bool = False,
    threads: Optional[int] = None,
    report: Optional[PathLike] = None,
) -> ConvertReport:
    """Merge a PEFT adapter into a base and quantize, as ``lorafold convert``.

    base: a GGUF file or a Hugging Face model folder. adapter: a PEFT
    adapter folder (None: quantize the base alone). quant: a type or preset
    (f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q2_k..q6_k, q4_k_m,
    q5_k_m, q4_k_s, q5_k_s). out: the merged GGUF; with ``emit``, the folder
    that receives ``merged.gguf`` ("merged") and/or ``base.gguf`` +
    ``adapter.gguf`` ("separate"; "adapter": ``adapter.gguf`` alone, for
    ``Adapter``), with ``report.json``, published whole.
    calib_text: the adapter's training text, one window per line, to
    calibrate on (GPTQ rounding by default). rounding: "nearest",
    "imatrix" or "gptq". budget_kl / min_gain: spend bytes until the mean KL
    from the f32 merged model is at most this, or the share of the
    adapter's gain kept is at least this (needs calib_text). compensate: also
    write a rank-R LoRA of the rounding error beside the merged file.
    progress: a callable given a ``ProgressStep`` after each tensor, or True
    for a tqdm bar. tensor_type: REGEX=TYPE overrides. max_rel_error /
    min_retention: gates; broken, nothing is written and ``GateError`` is
    raised with the report. threads: worker threads (default: all cores).
    report: also write the JSON report here.

    Returns the report, whose fields are the keys of the CLI's JSON. The GIL
    is released while converting; Ctrl-C (KeyboardInterrupt) stops it
    between tensors and removes the partial outputs.
    """
    if out is None:
        raise UsageError("give out: the merged GGUF, or the folder for emit")
    emits: List[str] = [] if emit is None else [emit] if isinstance(emit, str) else list(emit)
    step: Optional[Callable[[ProgressStep], object]] = None
    if progress is True:
        step = _tqdm_progress()
    elif callable(progress):
        step = progress
    native = None if step is None else (lambda d, t, n, b: step(ProgressStep(d, t, n, b)))
    fs = lambda p: None if p is None else os.fspath(p)  # noqa: E731
    request = dict(
        base=os.fspath(base),
        adapter=fs(adapter),
        quant=quant,
        out=os.fspath(out),
        emit=emits,
        calib_text=fs(calib_text),
        rounding=rounding,
        budget_kl=budget_kl,
        min_gain=min_gain,
        compensate=compensate,
        tensor_type=list(tensor_type),
        adapter_type=adapter_type,
        max_rel_error=max_rel_error,
        min_retention=min_retention,
        force=force,
        report=fs(report),
    )
    text = _lorafold.convert(request, threads, native)
    return ConvertReport.from_dict(json.loads(text))


Spec = Union[str, "os.PathLike[str]", Tuple[PathLike, PathLike], Tuple[PathLike, PathLike, float]]


def _spec(p: Spec) -> str:
    """A path to run, as the CLI's MODEL[+ADAPTER[:SCALE]]: a string or
    path, or (model, adapter) / (model, adapter, scale)."""
    if isinstance(p, tuple):
        model, adapter, *scale = p
        return f"{os.fspath(model)}+{os.fspath(adapter)}:{scale[0] if scale else 1.0}"
    return os.fspath(p)


def drift(
    ref: Spec,
    candidates: Union[Mapping[str, Spec], Iterable[Spec]],
    text: Union[str, "os.PathLike[str]"],
    base: Optional[Spec] = None,
    *,
    lines: bool = False,
    ctx: int = 128,
) -> List[DriftRow]:
    """How far each candidate drifts from the reference over the same
    tokens, as ``lorafold drift --json``: KL (mean, median, p99, max), top-1
    agreement, perplexity, and with the un-adapted ``base`` the share of the
    adapter's gain each keeps.

    ref, candidates, base: paths as ``"MODEL.gguf[+ADAPTER.gguf[:SCALE]]"``,
    or (model, adapter[, scale]) tuples; candidates a {name: path} mapping
    or a list (named by their paths). text: the text itself (str), or a
    ``pathlib.Path`` to read it from. lines: score each non-empty line
    alone; else windows of ``ctx`` tokens.
    """
    if isinstance(candidates, Mapping):
        named = [(name, _spec(p)) for name, p in candidates.items()]
    else:
        named = [(_spec(p), _spec(p)) for p in candidates]
    if not isinstance(text, str):
        with open(os.fspath(text), encoding="utf-8") as f:
            text = f.read()
    rows = json.loads(
        _lorafold.drift(_spec(ref), named, text, None if base is None else _spec(base), lines, ctx)
    )
    return [_build(DriftRow, r) for r in rows]


def bench(
    paths: Union[Spec, Sequence[Spec]],
    prompt: int = 128,
    n: int = 64,
    reps: int = 5,
    *,
    kv: str = "f16",
) -> List[BenchRow]:
    """Load time, time to first token, prefill and decode tokens/s and
    memory for each path, as ``lorafold bench --json``: ``prompt`` tokens
    of prefill, ``n`` decoded, ``reps`` repetitions (mean and sd)."""
    if isinstance(paths, (str, os.PathLike, tuple)):
        paths = [paths]  # type: ignore[list-item]
    rows = json.loads(_lorafold.bench([_spec(p) for p in paths], prompt, n, reps, kv))  # type: ignore[union-attr]
    return [BenchRow.from_dict(r) for r in rows]


__all__ = [
    "Adapter",
    "AdapterMismatchError",
    "BenchRow",
    "ContextOverflowError",
    "ConvertReport",
    "DriftRow",
    "FileError",
    "GateError",
    "Generation",
    "LorafoldError",
    "Model",
    "OutOfRangeError",
    "ProgressStep",
    "Session",
    "Stat",
    "TensorRow",
    "Totals",
    "UsageError",
    "bench",
    "convert",
    "drift",
    "set_threads",
]
