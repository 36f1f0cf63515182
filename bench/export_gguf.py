"""GGUF export benchmark: conversion + quantization time and peak RSS on a synthetic 1.1B-shaped model.

    python bench/export_gguf.py            # F16, Q8_0 and Q4_K_M, plus a plain copy of the shards as the floor

For comparison, llama.cpp's own converter and llama-quantize on the same shape (shared/research/
gguf-and-llamacpp.md, quiet machine): F16 conversion 13.1 s at 760-804 MB peak RSS; Q8_0 quantization 4.1 s,
Q4_K_M 28.5 s, at ~500 MB.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export_runner import run  # noqa: E402
from synthetic import build  # noqa: E402

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="/tmp/qlora-bridge-bench", help="scratch folder")
    p.add_argument("--quants", default="F16,Q8_0,Q4_K_M")
    a, _ = p.parse_known_args()
    base, _ = build("1.1b", Path(a.work) / "inputs")
    run(__file__, base, Path(a.work), [("gguf", q) for q in a.quants.split(",")], {},
        {"parity s": "seconds_parity", "convert s": "seconds_convert", "quantize s": "seconds_quantize"})
