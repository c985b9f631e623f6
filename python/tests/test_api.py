"""The package's surface: every public name documented, the stubs covering
the native module, signatures readable by help()."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import lorafold
from lorafold import _lorafold

STUB = Path(lorafold.__file__).with_name("_lorafold.pyi")


def test_every_public_name_has_a_docstring():
    for name in lorafold.__all__:
        obj = getattr(lorafold, name)
        assert (obj.__doc__ or "").strip(), name
    for cls in (lorafold.Model, lorafold.Session, lorafold.Adapter, lorafold.Generation):
        for attr, value in vars(cls).items():
            if not attr.startswith("_"):
                assert (value.__doc__ or "").strip(), f"{cls.__name__}.{attr}"


def test_the_stubs_cover_the_native_module():
    tree = ast.parse(STUB.read_text())
    stubbed = {n.name: n for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
    native = {n for n in dir(_lorafold) if not n.startswith("_")}
    assert native == set(stubbed), native ^ set(stubbed)
    for cls_name in ("Model", "Session", "Adapter", "Generation"):
        methods = {n.name for n in stubbed[cls_name].body if isinstance(n, ast.FunctionDef)}
        public = {a for a in vars(getattr(_lorafold, cls_name)) if not a.startswith("_")}
        assert public <= methods, public - methods
    assert (STUB.parent / "py.typed").exists()


def test_signatures_read_well():
    sig = inspect.signature(lorafold.Session.generate)
    assert list(sig.parameters)[:3] == ["self", "prompt", "max_tokens"]
    assert sig.parameters["temperature"].kind is inspect.Parameter.KEYWORD_ONLY
    assert "quant" in inspect.signature(lorafold.convert).parameters
    assert "Ctrl-C" in lorafold.convert.__doc__
