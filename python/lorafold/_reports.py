"""The reports lorafold returns, as dataclasses whose fields are the keys of
the CLI's JSON (``lorafold convert --report``, ``drift --json``,
``bench --json``); ``to_dict()`` gives that JSON back."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Type, TypeVar

T = TypeVar("T")


def _build(cls: Type[T], d: Dict[str, Any]) -> T:
    """``cls`` from a JSON object: its own fields by name, nested reports
    through their own ``from_dict``; keys the class does not know (a newer
    library) are kept in ``extra``."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    known = {k: v for k, v in d.items() if k in names}
    extra = {k: v for k, v in d.items() if k not in names}
    obj = cls(**known)
    if extra and "extra" in names:
        obj.extra = extra  # type: ignore[attr-defined]
    return obj


def _plain(obj: Any) -> Any:
    """A report back as the JSON value it came from."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out: Dict[str, Any] = {}
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if f.name == "extra":
                out.update(v)
            elif f.metadata.get("skip_none") and v is None:
                continue  # serde's skip_serializing_if = "Option::is_none"
            else:
                out[f.name] = _plain(v)
        return out
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj


@dataclass
class TensorRow:
    """One output tensor of a conversion."""

    name: str
    ggml_type: str
    fallback: Optional[str]
    n_elements: int
    n_bytes: int
    copied: bool
    rel_error: float
    retention: Optional[float]
    delta_rel_norm: Optional[float]
    output_error: Optional[float]
    output_error_nearest: Optional[float]
    output_error_compensated: Optional[float] = field(default=None, metadata={"skip_none": True})
    extra: Dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class Totals:
    """A conversion's totals: sizes, errors, retention, time and memory."""

    n_tensors: int
    n_elements: int
    tensor_bytes: int
    file_size: int
    bits_per_weight: float
    max_rel_error: float
    max_rel_error_tensor: str
    mean_rel_error: float
    retention: Optional[float]
    mean_retention: Optional[float]
    min_retention: Optional[float]
    changed_tensors: int
    fallbacks: int
    copied_tensors: int
    wall_seconds: float
    peak_rss_bytes: Optional[int]
    extra: Dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class ConvertReport:
    """What a conversion wrote and measured (the CLI's ``--report`` JSON):
    ``tensors`` has a row per output tensor, ``totals`` the sums."""

    output: Optional[str]
    base_output: Optional[str]
    base_file_size: Optional[int]
    adapter_gguf: Optional[Dict[str, Any]]
    base: str
    adapter: Optional[str]
    quant: str
    tensors: List[TensorRow]
    totals: Totals
    notes: List[str]
    budget: Optional[Dict[str, Any]] = field(default=None, metadata={"skip_none": True})
    compensation: Optional[Dict[str, Any]] = field(default=None, metadata={"skip_none": True})
    extra: Dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ConvertReport":
        """The report from the CLI's JSON."""
        d = dict(d)
        d["tensors"] = [_build(TensorRow, t) for t in d.get("tensors", [])]
        d["totals"] = _build(Totals, d["totals"])
        return _build(cls, d)

    def to_dict(self) -> Dict[str, Any]:
        """The report as the CLI's JSON (same keys, same order)."""
        return _plain(self)

    def __repr__(self) -> str:
        t = self.totals
        return (
            f"ConvertReport(output={self.output!r}, quant={self.quant!r}, "
            f"{t.n_tensors} tensors, {t.file_size} bytes, max_rel_error={t.max_rel_error:.3e}, "
            f"retention={t.retention})"
        )


@dataclass
class ProgressStep:
    """One tensor written: ``done`` of ``total``, its name and its bytes."""

    done: int
    total: int
    tensor: str
    bytes: int


@dataclass
class DriftRow:
    """One candidate's drift from the reference (the CLI's ``drift --json`` row)."""

    name: str
    path: str
    tokens: int
    kl_mean: float
    kl_median: float
    kl_p99: float
    kl_max: float
    top1_agreement: float
    rms_delta_p_top: float
    perplexity_reference: Optional[float]
    perplexity: Optional[float]
    nll_reference: Optional[float]
    nll: Optional[float]
    gain_retained: Optional[float]
    extra: Dict[str, Any] = field(default_factory=dict, repr=False)

    def to_dict(self) -> Dict[str, Any]:
        """The row as the CLI's JSON."""
        return _plain(self)


@dataclass
class Stat:
    """Mean and sample standard deviation over the repetitions."""

    mean: float
    sd: float


@dataclass
class BenchRow:
    """One path's latency and memory (the CLI's ``bench --json`` row)."""

    path: str
    load_ms: Stat
    ttft_ms: Stat
    prefill_tps: Stat
    decode_tps: Stat
    rss_bytes: int
    peak_rss_bytes: int
    mapped_bytes: int
    extra: Dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "BenchRow":
        """The row from the CLI's JSON."""
        d = dict(d)
        for k in ("load_ms", "ttft_ms", "prefill_tps", "decode_tps"):
            d[k] = Stat(**d[k])
        return _build(cls, d)

    def to_dict(self) -> Dict[str, Any]:
        """The row as the CLI's JSON."""
        return _plain(self)
