"""GGUF k-quants with and without the fine-tune's importance matrix, on the smoke gate's instruments.

    python bench/imatrix.py MERGED [--out DIR] [--quants Q4_K_M,Q4_K_S,Q3_K_M] [--option KEY=VALUE ...]

MERGED is a merged fine-tune with held-out answers in its lineage. Each quant type is exported twice
(--option imatrix=off, then on; --option adds to both) and judged through the exporter's logits hook (llama.cpp in
process, full vocabulary) against the cached reference, as the llama.cpp smoke test does: mean KL along the held-out
answers and on the reference document, top-1 agreement, perplexity ratio, task score, and the verdict under the
target's bounds. The with/without ratio of each KL comes with a paired bootstrap interval over the sequences
(answers, text windows): the same sequences, so the interval is about the matrix and not about the sample.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gate import judged  # noqa: E402

from qlora_bridge.stages.export import export  # noqa: E402
from qlora_bridge.host import load_plugins  # noqa: E402


def tap(registry, folder: Path, ref, sums: dict):
    """The export's logits hook, recording each sequence's summed KL and token count against the cached reference
    (in `sums`, by answers/text) as the gate's measurement passes through it: one llama.cpp run for both."""
    import torch

    from qlora_bridge.measure.divergence import compare_rows, full_scores, rows_from

    exporter, _ = registry.exporter("gguf")
    kept = {tuple(t.kept) for t in ref.scorer.teachers}
    answers = ref.scorer.inputs

    def logits(seqs):
        kind = "answers" if seqs == answers else "text"
        first = (lambda i: ref.scorer.starts[i] - 1) if kind == "answers" else (lambda i: 0)
        cached = ref.scorer.ref if kind == "answers" else ref.text
        for i, (seq, got) in enumerate(zip(seqs, exporter.logits(folder, seqs))):
            if kind == "text" or tuple(seq) in kept:
                a = first(i)
                r = compare_rows(cached[i], rows_from(full_scores(got), a), torch.tensor(seq[a + 1:]))
                sums.setdefault(kind, []).append((r.kl.double().sum().item(), r.kl.numel()))
            yield got
    return logits


def paired_ratio(on: list, off: list, draws: int = 2000) -> tuple[float, float, float]:
    """Token-weighted mean KL with / without, and its 95% paired bootstrap interval over sequences."""
    ratio = lambda idx: sum(on[i][0] for i in idx) / max(sum(off[i][0] for i in idx), 1e-30)
    rng = random.Random(0)
    n = len(on)
    boots = sorted(ratio([rng.randrange(n) for _ in range(n)]) for _ in range(draws))
    return ratio(range(n)), boots[int(0.025 * draws)], boots[int(0.975 * draws)]


def main() -> None:
    from transformers import AutoTokenizer

    from qlora_bridge.measure.reference import reference_scores
    from qlora_bridge.stages.smoke import reference_for

    ap = argparse.ArgumentParser()
    ap.add_argument("merged", type=Path)
    ap.add_argument("--out", type=Path, default=Path("imatrix-bench"))
    ap.add_argument("--quants", default="Q4_K_M,Q4_K_S,Q3_K_M")
    ap.add_argument("--option", action="append", default=[], help="KEY=VALUE for every export")
    a = ap.parse_args()
    registry = load_plugins()
    extra = dict(o.split("=", 1) for o in a.option)
    a.out.mkdir(parents=True, exist_ok=True)
    rows, per_seq = [], {}
    for quant in a.quants.split(","):
        for setting in ("off", "on"):
            folder = a.out / f"{quant}-imatrix-{setting}"
            shutil.rmtree(folder, ignore_errors=True)
            t0 = time.time()
            manifest = export(registry, "gguf", a.merged, folder, quant=quant,
                              options={**extra, "imatrix": setting}, progress=False)
            seconds = time.time() - t0
            ref = reference_scores(reference_for(manifest, a.merged), AutoTokenizer.from_pretrained(a.merged),
                                   progress=False)
            per_seq[(quant, setting)] = {}
            result = judged(registry, folder, tap(registry, folder, ref, per_seq[(quant, setting)]))
            d, t = result["checks"]["divergence"], result["checks"]["task-score"]
            imx = manifest["export"]["settings"]["importance_matrix"] or {}
            row = {"quant": quant, "imatrix": setting, "verdict": "PASSED" if result["passed"] else "FAILED",
                   "kl_answers": d["kl_answers"], "kl_text": d["kl_text"], "top1_text": d["top1_text"],
                   "ppl_ratio": d["ppl_ratio"], "task": t["task_score"], "task_ref": t["task_score_reference"],
                   "interval": t["interval_95"], "bpw_layers": manifest["export"]["checks"]["quantization"]["bpw_layers"],
                   "size_mb": round((folder / f"model-{quant}.gguf").stat().st_size / 1e6, 1),
                   "export_s": round(seconds, 1), "chunks": imx.get("chunks"),
                   "calibration_tokens": (imx.get("calibration") or {}).get("tokens"),
                   "failed": {k: r.get("why") for k, r in result["checks"].items() if not r["passed"]}}
            if setting == "on":
                for kind in ("answers", "text"):
                    ratio, lo, hi = paired_ratio(per_seq[(quant, "on")][kind], per_seq[(quant, "off")][kind])
                    row[f"{kind}_ratio"] = f"{ratio:.3f} [{lo:.3f}, {hi:.3f}]"
            rows.append(row)
            print(json.dumps(row), flush=True)
    (a.out / "imatrix-bench.json").write_text(json.dumps(rows, indent=1))
    print(f"\n{a.merged}\n")
    print("| quant | imatrix | KL answers | KL text | with/without: answers [95%] | text [95%] | top-1 text | "
          "ppl ratio | task (ref) [95% diff] | verdict |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['quant']} | {r['imatrix']} | {r['kl_answers']} | {r['kl_text']} | {r.get('answers_ratio', '')} | "
              f"{r.get('text_ratio', '')} | {r['top1_text']} | {r['ppl_ratio']} | {r['task']} ({r['task_ref']}) "
              f"{r['interval']} | {r['verdict']} |")


if __name__ == "__main__":
    main()
