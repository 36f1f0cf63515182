"""GGUF export benchmark: conversion + quantization time and peak RSS on a synthetic 1.1B-shaped model.

    python bench/export_gguf.py            # F16, Q8_0 and Q4_K_M, plus a plain copy of the shards as the floor

Each export runs in its own process (peak RSS is the child's own high-water mark). The manifest's own timings
split each export into parity search, conversion and quantization. For comparison, llama.cpp's own converter and
llama-quantize on the same shape (shared/research/gguf-and-llamacpp.md, quiet machine): F16 conversion 13.1 s at
760-804 MB peak RSS; Q8_0 quantization 4.1 s, Q4_K_M 28.5 s, at ~500 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import build, peak_rss_mib  # noqa: E402


def child(base: Path, out: Path, quant: str) -> None:
    if quant == "copy":
        out.mkdir(parents=True)
        for f in base.glob("*.safetensors"):
            shutil.copyfile(f, out / f.name)
        os.sync()
        settings = {}
    else:
        from qlora_bridge.export import export
        from qlora_bridge.plugins import load_plugins

        settings = export(load_plugins(), "gguf", base, out, quant=quant, progress=False)["export"]["settings"]
    cpu = os.times()
    print(json.dumps({"peak_rss_mib": peak_rss_mib(), "cpu_s": cpu.user + cpu.system, "settings": settings}))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="/tmp/qlora-bridge-bench", help="scratch folder")
    p.add_argument("--quants", default="F16,Q8_0,Q4_K_M")
    a = p.parse_args()
    base, _ = build("1.1b", Path(a.work) / "inputs")
    rows = []
    for quant in ["copy", *a.quants.split(",")]:
        out = Path(a.work) / f"gguf-{quant}"
        shutil.rmtree(out, ignore_errors=True)
        t = time.time()
        proc = subprocess.run([sys.executable, __file__, "--child", str(base), str(out), quant],
                              capture_output=True, text=True)
        wall = time.time() - t
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
            rows.append({"quant": quant, "ok": False, "wall_s": wall})
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        size = sum(f.stat().st_size for f in out.iterdir() if f.is_file()) / 1e9
        s = r["settings"]
        rows.append({"quant": quant, "ok": True, "wall_s": wall, "size_gb": size, **r,
                     "parity_s": s.get("seconds_parity"), "convert_s": s.get("seconds_convert"),
                     "quantize_s": s.get("seconds_quantize")})
        shutil.rmtree(out, ignore_errors=True)
    floor = rows[0]["wall_s"]
    print(f"1.1B shape (2.2 GB bf16), {os.cpu_count()} cores")
    print(f"{'export':<8}{'wall s':>8}{'x copy':>8}{'parity s':>10}{'convert s':>11}{'quant s':>9}{'CPU s':>8}"
          f"{'peak RSS MiB':>14}{'size GB':>9}")
    for r in rows:
        if not r["ok"]:
            print(f"{r['quant']:<8} failed")
            continue
        fmt = lambda v, w: f"{v:>{w}.1f}" if isinstance(v, (int, float)) else f"{'-':>{w}}"
        print(f"{r['quant']:<8}{r['wall_s']:>8.1f}{r['wall_s'] / floor:>8.1f}{fmt(r['parity_s'], 10)}"
              f"{fmt(r['convert_s'], 11)}{fmt(r['quantize_s'], 9)}{r['cpu_s']:>8.1f}{r['peak_rss_mib']:>14.0f}"
              f"{r['size_gb']:>9.2f}")


if __name__ == "__main__":
    main()
