#!/usr/bin/env python3
"""A release gate: convert an adapter merged into its base, check that the
adapter is actually applied (the merged model's outputs differ from the
base's on the adapter's own text) and that the merged file keeps enough of
the adapter's gain; exit 1 otherwise.

    python release_gate.py BASE ADAPTER_DIR TEXT --quant q4_0 --min-gain 0.9 --out release/

The gain is measured against the adapter attached at run time to the base
(base + adapter.gguf, no rounding of the adapter's product): (L_base - L_merged) /
(L_base - L_adapter) over TEXT, one line at a time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lorafold


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("base", help="GGUF file or Hugging Face model folder")
    p.add_argument("adapter", help="PEFT adapter folder")
    p.add_argument("text", help="the adapter's own text (training or held-out lines)")
    p.add_argument("--quant", default="q4_k_m")
    p.add_argument("--min-gain", type=float, default=0.9, help="least share of the gain kept")
    p.add_argument("--min-kl", type=float, default=1e-3, help="least KL from the base: applied")
    p.add_argument("--out", default="release", help="folder for merged.gguf, adapter.gguf, report.json")
    a = p.parse_args(argv)

    out = Path(a.out)
    report = lorafold.convert(a.base, a.adapter, quant=a.quant, out=out, emit=["merged", "adapter"])
    merged, adapter = out / "merged.gguf", out / "adapter.gguf"
    print(f"{merged}: {report.totals.file_size} bytes, retention {report.totals.retention:.3f}")

    text = Path(a.text)
    applied = lorafold.drift(a.base, {"merged": merged}, text, lines=True)[0]
    kept = lorafold.drift((a.base, adapter), {"merged": merged}, text, base=a.base, lines=True)[0]
    print(f"KL from the base {applied.kl_mean:.4f}, gain kept {kept.gain_retained:.1%}")
    if applied.kl_mean < a.min_kl:
        print(f"FAIL: the adapter is not applied (KL from the base {applied.kl_mean:.2e} < {a.min_kl:g})")
        return 1
    if kept.gain_retained is None or kept.gain_retained < a.min_gain:
        print(f"FAIL: gain kept {kept.gain_retained} is below {a.min_gain:g}")
        return 1
    print("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
