#!/usr/bin/env python3
"""What a Python caller pays per generated token: decode tokens/s of
`lorafold run` (the Rust loop, its own timing) against the Python iterator
(`Model.generate`, timed in Python from the first piece to the last), same
model, prompt, threads and greedy tokens, alternated RUNS times; medians.

    python scripts/python-overhead.py CLI MODEL.gguf [THREADS] [N] [RUNS]
"""

import re
import statistics
import subprocess
import sys
import time

import lorafold

cli, model_path = sys.argv[1], sys.argv[2]
threads, n, runs = (int(a) for a in (sys.argv[3:] + ["2", "64", "3"][len(sys.argv) - 3 :])[:3])
prompt = "Once upon a time, in a village by the sea,"

model = lorafold.Model(model_path, threads=threads)
cli_tps, py_tps = [], []
for _ in range(runs):
    out = subprocess.run(
        [cli, "run", model_path, "-p", prompt, "-n", str(n), "--threads", str(threads)],
        capture_output=True, text=True, check=True,
    )
    cli_tps.append(float(re.search(r"decode (\d+) tok at ([\d.]+) tok/s", out.stderr).group(2)))
    g = model.generate(prompt, n)
    stamps = [time.perf_counter() for _ in g]
    py_tps.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    assert len(g.tokens) == int(re.search(r"decode (\d+) tok", out.stderr).group(1))
c, p = statistics.median(cli_tps), statistics.median(py_tps)
print(f"decode tok/s, {threads} threads, {n} tokens, {runs} alternating runs")
print(f"  lorafold run (Rust loop): {', '.join(f'{x:.1f}' for x in cli_tps)}  median {c:.1f}")
print(f"  Python iterator:          {', '.join(f'{x:.1f}' for x in py_tps)}  median {p:.1f}")
print(f"  Python / Rust: {p / c:.3f}")
