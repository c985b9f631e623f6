"""lorafold's exceptions: one class per kind of mistake a caller can fix.

Every message is the library's one line, naming the file and the tensor
where there is one, as the CLI prints it after ``error:``.
"""

from __future__ import annotations

import json
from typing import Any, Optional


class LorafoldError(Exception):
    """Any error lorafold raises (also I/O on an output, or a bug)."""


class FileError(LorafoldError):
    """An input file cannot be read, or is not what it should be (GGUF,
    PEFT adapter folder, Hugging Face model, text)."""


class AdapterMismatchError(LorafoldError):
    """An adapter does not fit its model (shapes, architecture,
    vocabulary), or assumes a modified base."""


class OutOfRangeError(LorafoldError, ValueError):
    """A value outside what it may be: an adapter scale, threads, a context
    size, a sampling option, a token id, a quantization name."""


class ContextOverflowError(LorafoldError):
    """More tokens than the session's context has room for."""


class UsageError(LorafoldError, ValueError):
    """Arguments that contradict each other or name nothing (an output that
    is an input, a budget without calibration text, a busy model)."""


class GateError(LorafoldError):
    """A conversion's gate (max_rel_error, min_retention, budget_kl,
    min_gain) was broken; nothing was written. ``report`` holds what was
    measured."""

    report_json: Optional[str] = None

    @property
    def report(self) -> Any:
        """The conversion report (a ``ConvertReport``), or None."""
        if self.report_json is None:
            return None
        from ._reports import ConvertReport

        return ConvertReport.from_dict(json.loads(self.report_json))


__all__ = [
    "LorafoldError",
    "FileError",
    "AdapterMismatchError",
    "OutOfRangeError",
    "ContextOverflowError",
    "UsageError",
    "GateError",
]
