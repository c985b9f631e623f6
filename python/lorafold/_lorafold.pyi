"""Type stubs of lorafold's native module (lorafold._lorafold)."""

import os
import pathlib
from types import TracebackType
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Type, Union

import numpy as np
import numpy.typing as npt

_Path = Union[str, "os.PathLike[str]"]

class Adapter:
    """A GGUF LoRA adapter (llama.cpp's layout), attachable to any model it fits."""

    def __init__(self, path: _Path) -> None: ...
    @property
    def path(self) -> pathlib.Path: ...
    @property
    def arch(self) -> str: ...
    @property
    def alpha(self) -> float: ...
    @property
    def targets(self) -> List[str]: ...

class Generation(Iterator[str]):
    """An iterator of text pieces; ``stats`` and ``tokens`` so far."""

    def __iter__(self) -> "Generation": ...
    def __next__(self) -> str: ...
    @property
    def stats(self) -> dict: ...
    @property
    def tokens(self) -> List[int]: ...

class Session:
    """A conversation: a KV cache of ``max_tokens`` positions each call continues."""

    @property
    def position(self) -> int: ...
    @property
    def max_tokens(self) -> int: ...
    def reset(self) -> None: ...
    def close(self) -> None: ...
    def __enter__(self) -> "Session": ...
    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> bool: ...
    def logits(self, tokens: Sequence[int], all: bool = False) -> npt.NDArray[np.float32]: ...
    def generate(
        self,
        prompt: str,
        max_tokens: int = 64,
        *,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repeat_penalty: float = 1.0,
        seed: int = 299792458,
        stop: Optional[Sequence[str]] = None,
        chat: bool = False,
    ) -> Generation: ...

class Model:
    """A GGUF model on the CPU, weights memory-mapped; adapters attach by slot."""

    def __init__(
        self,
        path: _Path,
        threads: Optional[int] = None,
        ctx: Optional[int] = None,
        kv: str = "f16",
    ) -> None: ...
    @property
    def path(self) -> pathlib.Path: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def context_length(self) -> int: ...
    @property
    def ctx(self) -> int: ...
    @property
    def arch(self) -> str: ...
    def attach(self, adapter: Adapter, scale: float = 1.0) -> int: ...
    def set_scale(self, slot: int, scale: float) -> None: ...
    def scale(self, slot: int) -> Optional[float]: ...
    def detach(self, slot: int) -> None: ...
    def session(self, ctx: Optional[int] = None, kv: Optional[str] = None) -> Session: ...
    def generate(
        self,
        prompt: str,
        max_tokens: int = 64,
        *,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repeat_penalty: float = 1.0,
        seed: int = 299792458,
        stop: Optional[Sequence[str]] = None,
        chat: bool = False,
    ) -> Generation: ...
    def tokenize(self, text: str) -> List[int]: ...
    def detokenize(self, tokens: Sequence[int]) -> str: ...

def convert(
    request: Dict[str, Any],
    threads: Optional[int],
    progress: Optional[Callable[[int, int, str, int], object]],
) -> str: ...
def drift(
    reference: str,
    candidates: List[Tuple[str, str]],
    text: str,
    base: Optional[str] = None,
    lines: bool = False,
    ctx: int = 128,
) -> str: ...
def bench(paths: List[str], prompt: int = 128, n: int = 64, reps: int = 5, kv: str = "f16") -> str: ...
def set_threads(threads: int) -> None: ...
def version() -> str: ...
