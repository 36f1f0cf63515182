"""The 4-bit engines side by side on one fine-tune: what each keeps of it, what it costs.

    python bench/quant_quality.py MERGED [--out DIR] [--only NAME,...] [--slow]

Every case is a real `export` of MERGED (a merged fine-tune with held-out answers in its report) through the gptq
or awq target with one engine's settings, in its own process (export seconds and peak RSS are that process's),
on the same calibration, then judged by the smoke gate's instruments: KL to the merged model along its held-out
answers and on the reference text, same top-1 share, perplexity ratio, the paired task score. Where this machine
can serve 4-bit with vLLM (an AVX-512 CPU or a GPU) the export is served; elsewhere it is judged through the
exporter's logits hook (our dequantization, float32), which the table says. --slow adds GPTQModel's AWQ
(30+ minutes for the demo on 2 CPU cores). llm-compressor is not here: 0.13 and 0.14.0.1 pin
transformers<=5.17 and auto-round<=0.15.1, both below this project's pins.
"""

from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing
import resource
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gate import through_logits  # noqa: E402

# name, target, options (the rest are the target's defaults), slow
CASES = [
    ("round to nearest, sym (floor)", "gptq", {"engine": "autoround", "iters": "0"}, False),
    ("GPTQModel GPTQ (the gptq target's settings)", "gptq", {"engine": "gptqmodel"}, False),
    ("GPTQModel GPTQ + general text", "gptq", {"engine": "gptqmodel", "text_tokens": "16384"}, False),
    ("GPTQModel GPTQ g32", "gptq", {"engine": "gptqmodel", "group_size": "32"}, False),
    ("AutoRound SignRound", "gptq", {"engine": "autoround", "iters": "50"}, False),
    ("AutoRound AWQ + RTN", "awq", {"engine": "autoround", "algorithm": "awq"}, False),
    ("GPTQModel GPTQ asym repacked as AWQ", "awq", {"engine": "gptqmodel", "algorithm": "gptq", "text_tokens": "0"},
     False),
    ("GPTQModel GPTQ asym repacked as AWQ + 2048 tokens of general text (the awq target's settings)", "awq",
     {"engine": "gptqmodel"}, False),
    ("GPTQModel AWQ (clip search)", "awq", {"engine": "gptqmodel", "algorithm": "awq"}, True),
    # ours, one decoder layer in memory at a time, the targets' defaults: the same settings as the two above
    ("streamed GPTQ (the gptq target's default)", "gptq", {}, False),
    ("streamed GPTQ asym as AWQ (the awq target's default)", "awq", {}, False),
]


def exported(target: str, merged: str, out: str, options: dict, answer) -> None:
    from qlora_bridge.stages.export import export
    from qlora_bridge.host import load_plugins

    t0 = time.time()
    manifest = export(load_plugins(), target, Path(merged), Path(out), options=options, progress=False, force=True)
    answer.put({"export_seconds": round(time.time() - t0, 1),
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                "settings": manifest["export"]["settings"]})


def export_in_child(target: str, merged: Path, out: Path, options: dict) -> dict:
    ctx = multiprocessing.get_context("spawn")  # a fresh process: its peak RSS is this export's alone
    answer = ctx.Queue()
    child = ctx.Process(target=exported, args=(target, str(merged), str(out), options, answer))
    child.start()
    child.join()
    if child.exitcode:
        raise SystemExit(f"export {out} failed with exit code {child.exitcode}")
    return answer.get()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("merged", type=Path)
    ap.add_argument("--out", type=Path, default=Path("quant-bench"))
    ap.add_argument("--only", help="comma-separated case-name prefixes, or =NAME for that case alone")
    ap.add_argument("--slow", action="store_true", help="include GPTQModel's AWQ (30+ minutes on 2 CPU cores)")
    ap.add_argument("--vllm-python", default=".venv-vllm/bin/python")
    a = ap.parse_args()
    from qlora_bridge.host import load_plugins
    from qlora_bridge.stages.smoke import smoke

    registry = load_plugins()
    vllm = importlib.import_module("qlora_bridge_vllm")
    served = Path("/dev/nvidia0").exists() or not vllm.cpu_lacks_4bit_kernel()
    a.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, target, options, slow in CASES:
        wanted = a.only.split(",") if a.only else []
        if (wanted and not any(name == p[1:] if p.startswith("=") else name.startswith(p) for p in wanted)) \
                or (slow and not a.slow):
            continue
        folder = a.out / name.split(" (")[0].replace(" ", "-").replace(",", "").replace("+", "plus")
        shutil.rmtree(folder, ignore_errors=True)
        cost = export_in_child(target, a.merged, folder, options)
        if served:
            result = smoke(registry, folder, "vllm", options={"python": a.vllm_python})
            how = "vLLM"
        else:
            result, how = through_logits(registry, folder), "Exporter.logits (no 4-bit kernel here)"
        d, t = result["checks"]["divergence"], result["checks"]["task-score"]
        s = cost["settings"]
        row = {"case": name, "target": target, "options": options, "how": how, "engine": s["engine"],
               "engine_version": s["engine_version"], "group_size": s["group_size"],
               "calibration_tokens": s["calibration"]["tokens"], "export_seconds": cost["export_seconds"],
               "seconds_quantize": s["seconds_quantize"], "peak_rss_mb": cost["peak_rss_mb"],
               "kl_answers": d.get("kl_answers"), "kl_text": d.get("kl_text"), "top1_text": d.get("top1_text"),
               "ppl_ratio": d.get("ppl_ratio"), "task": t.get("task_score"), "task_ref": t.get("task_score_reference"),
               "interval": t.get("interval_95"), "verdict": "PASSED" if result["passed"] else "FAILED"}
        rows.append(row)
        print(json.dumps(row), flush=True)
    (a.out / "quant-bench.json").write_text(json.dumps(rows, indent=1))
    print("\n| engine, settings | target | group | calibration tokens | export s (quantizer s) | peak RSS MB | "
          "KL answers | KL text | top-1 text | ppl ratio | task (ref) [95% diff] | gate |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['target']} | {r['group_size']} | {r['calibration_tokens']} | {r['export_seconds']} "
              f"({r['seconds_quantize']}) | {r['peak_rss_mb']} | {r['kl_answers']} | {r['kl_text']} | "
              f"{r['top1_text']} | {r['ppl_ratio']} | {r['task']} ({r['task_ref']}) {r['interval']} | {r['verdict']} |")
    print(f"\nmeasured through: {rows[0]['how'] if rows else '-'}")


if __name__ == "__main__":
    main()
