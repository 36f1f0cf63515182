"""The smoke gate's power on a real fine-tune: faithful exports must pass, damaged ones must fail, and each verdict
names the instrument and the figure.

    python bench/gate.py MERGED [--out DIR] [--only NAME,...] [--estimator]

MERGED is a merged fine-tune with held-out answers in its report (`qlora-bridge merge --heldout ...`), its base
and adapter where its lineage says. Each case is exported afresh under --out, damaged where the case says, and
smoke-tested on its real server; time to verdict includes the server's start. GPTQ/AWQ go to vLLM where this
machine can serve 4-bit (an AVX-512 CPU or a GPU); elsewhere they are judged through the exporter's logits hook
(our dequantization, float32), which the table says. --estimator also measures every case through its
exporter's logits hook three ways: exact over the full vocabulary, against the cached top-128 reference, and with
the export cut to the 20 tokens vLLM lists (function estimators).
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from damage import permute_layer, scale_rope, with_base_weights  # noqa: E402

from qlora_bridge import manifest as mf  # noqa: E402
from qlora_bridge.stages.export import export  # noqa: E402
from qlora_bridge.host import load_plugins  # noqa: E402
from qlora_bridge.records import read_merge_report  # noqa: E402
from qlora_bridge.measure.fidelity import measure_against  # noqa: E402
from qlora_bridge.stages.smoke import gate_bounds, merged_folder, reference_for, smoke  # noqa: E402

# name, target, quant, damage, expected verdict
CASES = [
    ("gguf F16", "gguf", "F16", None, "pass"),
    ("gguf Q8_0", "gguf", "Q8_0", None, "pass"),
    ("gguf Q6_K", "gguf", "Q6_K", None, "pass"),
    ("gguf Q5_K_M", "gguf", "Q5_K_M", None, "pass"),
    ("gguf Q4_K_M", "gguf", "Q4_K_M", None, "pass"),
    ("gguf Q4_0", "gguf", "Q4_0", None, "pass"),
    ("safetensors float32", "safetensors", "float32", None, "pass"),
    ("safetensors bfloat16", "safetensors", "bfloat16", None, "pass"),
    ("base model in the fine-tune's lineage (gguf F16)", "gguf", "F16", "base", "fail"),
    ("original-weights merge (safetensors float32)", "safetensors", "float32", "original", "fail"),
    ("layer 15 o_proj/down_proj rows permuted (gguf F16)", "gguf", "F16", "permute", "fail"),
    ("rope base x0.5 (gguf F16)", "gguf", "F16", "rope", "fail"),
    ("gptq int4", "gptq", "int4", None, "?"),
    ("awq int4", "awq", "int4", None, "?"),
]


def build(registry, case, merged: Path, out: Path) -> Path:
    name, target, quant, damage, _ = case
    folder = out / name.split(" (")[0].replace(" ", "-").replace("'", "").replace("/", "-")
    shutil.rmtree(folder, ignore_errors=True)
    source = merged
    if damage == "original":  # the adapter added to the original weights; its merge check fails, kept anyway
        from qlora_bridge.stages.merge import merge

        report = read_merge_report(merged)
        source = out / "merged-original"
        if not source.exists():
            merge(Path(report.base["path"]), Path(report.adapter["path"]), source, base_weights="original",
                  heldout_file=Path(report.heldout["path"]), gate=False, progress=False)
    export(registry, target, source, folder, quant=quant, progress=False)  # each target's defaults
    if damage == "base":
        base_export = out / "base-export"
        if not base_export.exists():
            export(registry, target, Path(read_merge_report(merged).base["path"]), base_export, quant=quant,
                   progress=False)
        with_base_weights(folder, base_export)
    elif damage == "permute":
        permute_layer(folder, 15)
    elif damage == "rope":
        scale_rope(folder, 0.5)
    return folder


def judged(registry, folder: Path, logits) -> dict:
    """The gate's divergence and task-score checks on `logits` (token sequences -> full-vocabulary logits, e.g. an
    exporter's logits hook on `folder`), against the reference and with the bounds the served gate would use for
    the export in `folder`."""
    from transformers import AutoTokenizer

    from qlora_bridge.measure.divergence import full_scores

    manifest = mf.read(folder)
    merged = merged_folder(manifest, None)
    reference = reference_for(manifest, merged)
    measured = measure_against(reference, AutoTokenizer.from_pretrained(merged),
                               lambda seqs: map(full_scores, logits(seqs)))
    bounds, source, _ = gate_bounds(registry, manifest)
    checks = importlib.import_module("qlora_bridge_smoke_checks")
    ctx = type("Ctx", (), {"measurements": lambda self: measured, "bounds": bounds})()
    results = {"divergence": checks.divergence(ctx), "task-score": checks.task_score(ctx)}
    return {"passed": all(r["passed"] for r in results.values()), "checks": results, "bounds_source": source}


def figures(result: dict) -> dict:
    """The gate's headline figures from a smoke() or judged() result, as the benches print them."""
    d, t = result["checks"]["divergence"], result["checks"]["task-score"]
    return {"kl_answers": d.get("kl_answers"), "kl_text": d.get("kl_text"), "ppl_ratio": d.get("ppl_ratio"),
            "task": t.get("task_score"), "interval": t.get("interval_95")}


def through_logits(registry, folder: Path) -> dict:
    """The gate's instruments through the exporter's logits hook (our dequantization, float32)."""
    exporter, _ = registry.exporter(mf.read(folder)["export"]["target"])
    return {**judged(registry, folder, lambda seqs: exporter.logits(folder, seqs)), "seconds_to_ready": 0}


def estimators(registry, folder: Path) -> dict:
    """The KL of an export three ways, through its exporter's logits hook: exact (both distributions over the full
    vocabulary, the reference run again), against the cached reference (its 128 most likely tokens: what a
    llama.cpp smoke test computes), and with the export cut to its 20 most likely tokens plus the actual one (what
    vLLM returns): how far the two estimates fall below the exact figure."""
    import torch
    from transformers import AutoTokenizer

    from qlora_bridge.api import TokenScores
    from qlora_bridge.measure.divergence import compare_rows, full_scores, rows_from, sparse, summary
    from qlora_bridge.measure.logits import model_logits
    from qlora_bridge.measure.reference import reference_scores

    manifest = mf.read(folder)
    exporter, _ = registry.exporter(manifest["export"]["target"])
    merged = merged_folder(manifest, None)
    reference = reference_for(manifest, merged)
    ref = reference_scores(reference, AutoTokenizer.from_pretrained(merged))
    model = reference.load()
    out = {}
    kept = {tuple(t.kept) for t in ref.scorer.teachers}
    groups = (("answers", ref.scorer.inputs, lambda i: ref.scorer.starts[i] - 1, ref.scorer.ref),
              ("text", ref.windows, lambda i: 0, ref.text))
    for name, seqs, first, cached in groups:
        rows = {"exact": [], "cached reference": [], "cached reference, engine top-20": []}
        for i, (seq, full_ref, got) in enumerate(zip(seqs, model_logits(model, seqs), exporter.logits(folder, seqs))):
            if name == "answers" and tuple(seq) not in kept:
                continue
            a, targets = first(i), torch.tensor(seq[first(i) + 1:])
            served = rows_from(full_scores(got), a)
            rows["exact"].append(compare_rows(TokenScores(torch.log_softmax(full_ref[a:-1].float(), -1)), served,
                                              targets))
            rows["cached reference"].append(compare_rows(cached[i], served, targets))
            rows["cached reference, engine top-20"].append(compare_rows(cached[i], sparse(served.logprobs, targets, 20),
                                                                        targets))
        for how, r in rows.items():
            figures = summary(r)
            out[f"{name}: {how}"] = {"kl_mean": float(f"{figures['kl_mean']:.4g}"),
                                     "rest_mass": float(f"{figures.get('rest_mass', 0.0):.4g}")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("merged", type=Path)
    ap.add_argument("--out", type=Path, default=Path("gate-bench"))
    ap.add_argument("--only", help="comma-separated case-name prefixes")
    ap.add_argument("--estimator", action="store_true",
                    help="also compare the KL estimators with the exact figure through each case's logits hook")
    ap.add_argument("--vllm-python", default=".venv-vllm/bin/python")
    a = ap.parse_args()
    registry = load_plugins()
    vllm = importlib.import_module("qlora_bridge_vllm")
    can_4bit = Path("/dev/nvidia0").exists() or not vllm.cpu_lacks_4bit_kernel()
    a.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in CASES:
        name, target, quant, _, expected = case
        if a.only and not any(name.startswith(p) for p in a.only.split(",")):
            continue
        t0 = time.time()
        folder = build(registry, case, a.merged, a.out)
        exported = time.time() - t0
        backend = "llamacpp" if target == "gguf" else "vllm"
        t0 = time.time()
        if target in ("gptq", "awq") and not can_4bit:
            result, how = through_logits(registry, folder), "Exporter.logits (no 4-bit kernel here)"
        else:
            result = smoke(registry, folder, backend, options={"python": a.vllm_python} if backend == "vllm" else None)
            how = backend
        seconds = time.time() - t0
        d, t = result["checks"]["divergence"], result["checks"]["task-score"]
        row = {"case": name, "how": how, "expected": expected, "verdict": "PASSED" if result["passed"] else "FAILED",
               "kl_answers": d.get("kl_answers"), "kl_answers_p99": d.get("kl_answers_p99"),
               "kl_text": d.get("kl_text"), "kl_text_p99": d.get("kl_text_p99"), "top1_text": d.get("top1_text"),
               "ppl_ratio": d.get("ppl_ratio"), "task": t.get("task_score"), "task_ref": t.get("task_score_reference"),
               "interval": t.get("interval_95"), "p": t.get("p_value"), "agreement": t.get("agreement"),
               "rest_mass_text": d.get("rest_mass_text"), "seconds_to_verdict": round(seconds, 1),
               "seconds_to_ready": result.get("seconds_to_ready"), "export_seconds": round(exported, 1),
               "failed": {k: r.get("why") or r.get("error") for k, r in result["checks"].items()
                          if r.get("gate", True) and not r["passed"]}}
        if a.estimator:
            row["estimators"] = estimators(registry, folder)
        rows.append(row)
        print(json.dumps(row), flush=True)
    (a.out / "gate-bench.json").write_text(json.dumps(rows, indent=1))
    print("\n| case | measured through | KL answers (p99) | KL text (p99) | top-1 text | ppl ratio | task score "
          "(ref) [95% diff] | agreement | verdict | s to verdict |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['how']} | {r['kl_answers']} ({r['kl_answers_p99']}) | {r['kl_text']} "
              f"({r['kl_text_p99']}) | {r['top1_text']} | {r['ppl_ratio']} | {r['task']} ({r['task_ref']}) "
              f"{r['interval']} | {r['agreement']} | {r['verdict']} | {r['seconds_to_verdict']} |")
    for r in rows:
        if r["failed"]:
            print(f"- {r['case']}: " + "; ".join(f"{k}: {v}" for k, v in r["failed"].items()))


if __name__ == "__main__":
    main()
