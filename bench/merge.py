"""Merge benchmark: qlora-bridge's streaming merge beside the peft route and a plain copy, on synthetic shapes.

    python bench/merge.py --shape 1.1b            # TinyLlama-1.1B shape (2.2 GB bf16)
    python bench/merge.py --shape 7b --skip-peft  # Llama-2-7B shape (~13 GB bf16); the peft route needs ~2x RAM

Each route runs in its own process; wall time and peak RSS (from wait4) are printed side by side with ratios
against the copy, the physical floor. Checkpoints are random N(0, 0.02) bf16 weights in ~2 GB shards and a
rank-16 all-linear adapter with a training record, so the merge's nf4 mode proves its fingerprint as usual.
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
from synthetic import SHAPES, build, peak_rss_mib  # noqa: E402

def route(name: str, base: Path, adapter: Path, out: Path, dtype: str) -> None:
    """Run one route in this (child) process."""
    import torch

    if name == "qlora-bridge":
        from qlora_bridge.stages.merge import merge

        merge(base, adapter, out, dtype=dtype, check="layer", force=True, progress=False)
    elif name == "peft":  # what a peft user does: 4-bit load, dequantize, merge_and_unload, save_pretrained
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(base, quantization_config=q, dtype=torch.float32,
                                                     device_map={"": "cpu"})
        for m in model.modules():  # research README fact 1: never let the CPU packed path run
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = False
        model = model.dequantize()
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        model.to(getattr(torch, dtype)).save_pretrained(out)
    elif name == "copy":
        out.mkdir(parents=True, exist_ok=True)
        for f in base.glob("*.safetensors"):
            shutil.copyfile(f, out / f.name)
        os.sync()


def measure(name, base, adapter, out, dtype) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    t = time.time()
    proc = subprocess.run([sys.executable, __file__, "--child", name, str(base), str(adapter), str(out), dtype],
                          capture_output=True, text=True)
    wall = time.time() - t
    shutil.rmtree(out, ignore_errors=True)
    child = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {}
    if proc.returncode != 0:
        print(proc.stderr[-2000:], file=sys.stderr)
    return {"route": name, "ok": proc.returncode == 0, "wall_s": wall,
            "peak_rss_mib": child.get("peak_rss_mib", float("nan")), "cpu_s": child.get("cpu_s", float("nan"))}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _, _, name, base, adapter, out, dtype = sys.argv
        route(name, Path(base), Path(adapter), Path(out), dtype)
        cpu = os.times()
        print(json.dumps({"peak_rss_mib": peak_rss_mib(), "cpu_s": cpu.user + cpu.system}))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="1.1b")
    p.add_argument("--work", default="/tmp/qlora-bridge-bench", help="scratch folder (needs ~3x the model size)")
    p.add_argument("--dtype", default="float16", help="output dtype for every route (default: float16)")
    p.add_argument("--skip-peft", action="store_true", help="skip the peft route (it needs ~2x the model in RAM)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    work = Path(a.work)
    base, adapter = build(a.shape, work / "inputs")
    routes = ["copy", "qlora-bridge"] + ([] if a.skip_peft else ["peft"])
    rows = [measure(r, base, adapter, work / f"out-{r}", a.dtype) for r in routes]
    floor = rows[0]["wall_s"]
    size = sum(f.stat().st_size for f in base.glob("*.safetensors")) / 1e9
    if a.json:
        print(json.dumps({"shape": a.shape, "base_gb": size, "dtype": a.dtype, "rows": rows}))
        return
    print(f"shape {a.shape}: base {size:.2f} GB bf16 -> {a.dtype}, {os.cpu_count()} cores")
    print(f"{'route':<14}{'ok':<5}{'wall s':>9}{'x copy':>8}{'CPU s':>9}{'peak RSS MiB':>14}")
    for r in rows:
        print(f"{r['route']:<14}{str(r['ok']):<5}{r['wall_s']:>9.1f}{r['wall_s'] / floor:>8.1f}{r['cpu_s']:>9.1f}"
              f"{r['peak_rss_mib']:>14.0f}")


if __name__ == "__main__":
    main()
