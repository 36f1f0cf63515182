"""The 4-bit exports' whole-model read-back, streamed layer by layer, beside the whole-model way it replaced.

    python bench/readback.py --shape 1.1b

The read-back runs the export (dequantized) and the merged model over the reference text and compares the
logits. Until issue 32 it loaded both as whole float32 models; now each is streamed one module at a time
(qlora_bridge.api.streamed_logits). Each route runs in its own process over the same synthetic checkpoint on both
sides (the arithmetic is the same for a dequantized export), and prints wall time, CPU time and peak RSS with
ratios against the whole-model route, and how far the two routes' logits differ.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import SHAPES, build, peak_rss_mib  # noqa: E402


def route(name: str, folder: Path, out: Path) -> None:
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_bridge.api import REFERENCE_TEXT, streamed_logits

    ids = AutoTokenizer.from_pretrained(folder)(REFERENCE_TEXT, return_tensors="pt")["input_ids"]
    start, cpu = time.time(), time.process_time()
    if name == "whole":  # the replaced check: the merged model and the export, whole, side by side
        with torch.no_grad():
            ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()(ids).logits[0]
            got = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()(ids).logits[0]
    else:
        index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
        read = lambda n: safe_open(folder / index[n], "pt").get_tensor(n)  # noqa: E731
        ref = streamed_logits(folder, read, ids[0])
        got = streamed_logits(folder, read, ids[0])
    from safetensors.torch import save_file

    save_file({"logits": got.contiguous()}, out.with_suffix(".safetensors"))
    out.write_text(json.dumps({"seconds": time.time() - start, "cpu": time.process_time() - cpu,
                               "peak_mib": peak_rss_mib(), "tokens": ids.shape[1],
                               "both_sides_equal": torch.equal(ref, got)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=SHAPES, default="1.1b")
    p.add_argument("--work", default="/tmp/qlora-bridge-bench")
    a = p.parse_args()
    base, _ = build(a.shape, Path(a.work) / a.shape)
    import torch
    from safetensors.torch import load_file

    results = {}
    for name in ("whole", "streamed"):
        out = Path(a.work) / f"readback-{name}.json"
        subprocess.run([sys.executable, __file__, "--route", name, str(base), str(out)], check=True)
        results[name] = {**json.loads(out.read_text()), **load_file(out.with_suffix(".safetensors"))}
    w, s = results["whole"], results["streamed"]
    err = (torch.linalg.vector_norm(s["logits"] - w["logits"]) / torch.linalg.vector_norm(w["logits"])).item()
    print(f"{a.shape} shape, {w['tokens']} tokens of the reference text, relative logits difference {err:.2g}")
    print("| route | wall s | CPU s | peak RSS MiB | memory vs whole | time vs whole |\n|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['seconds']:.1f} | {r['cpu']:.1f} | {r['peak_mib']:,.0f} | "
              f"{r['peak_mib'] / w['peak_mib']:.2f} | {r['seconds'] / w['seconds']:.2f} |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--route"]:
        route(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]))
    else:
        main()
