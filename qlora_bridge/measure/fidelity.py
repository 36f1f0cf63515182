"""An export against the model that was trained, in the gate's own figures: KL along the reference's held-out
answers and on the reference text, the perplexity ratio, and the paired task score, from any source of next-token
scores: a server's (the smoke gate) or an exporter's own logits, no server (`fidelity`: what an exporter reads to
choose its recipe, and what the benches read where nothing serves 4-bit)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterator

from .scores import TokenScores
from .reference import Reference, reference_for

SIGNIFICANCE = 0.05  # one-sided: a task-score drop counts only when chance would produce it less than 1 in 20 times


def measure_against(reference: Reference, tok, scores: Callable[[list[list[int]]], Iterator[TokenScores]]) -> dict:
    """An export against the reference: along the reference's held-out answers (KL, top-1, answers kept, the
    paired task score) and over the reference document (KL, top-1, perplexity ratio). scores: the export's
    next-token distributions for token sequences (a serving engine's, or an exporter's logits hook's)."""
    from .divergence import text_divergence
    from .reference import reference_scores
    from .stats import mcnemar_drop, paired_interval

    ref = reference_scores(reference, tok)
    started = time.time()
    answers = ref.scorer.score(scores(ref.scorer.inputs))
    text = text_divergence(ref.windows, ref.text, scores(ref.windows))
    correct, served = answers.pop("reference_correct"), answers.pop("served_correct")
    n, r, s = len(correct), sum(correct), sum(served)
    task = {"reference": r / n, "served": s / n, "ratio": s / r if r else 1.0, **mcnemar_drop(correct, served),
            "interval": paired_interval(correct, served), "prompts": n, "significance": SIGNIFICANCE}
    return {"reference": reference.label, "answers": answers, "text": text, "task": task,
            "seconds": round(time.time() - started, 1), "reference_seconds": ref.seconds,
            "reference_cache": str(ref.cached)}


def fidelity(lineage: dict, merged: Path, folder: Path, logits) -> dict:
    """The gate's headline figures for the export in `folder`, teacher-forced through logits(folder, sequences)
    (an Exporter.logits hook: full-vocabulary logits per sequence) against the reference of an export with this
    lineage (ExportRequest.lineage) from `merged`. The reference's scores are cached, so a second call costs one
    pass of the export over ~23k tokens (the demo).

        f = fidelity(req.lineage, req.merged, req.out, logits)   # {"kl_answers": 0.0061, "ppl_ratio": 1.03, ...}
    """
    from transformers import AutoTokenizer

    from .divergence import full_scores

    reference = reference_for({"inputs": lineage}, merged)
    tok = AutoTokenizer.from_pretrained(merged, trust_remote_code=False)
    m = measure_against(reference, tok, lambda sequences: map(full_scores, logits(folder, sequences)))
    answers, text, task = m["answers"], m["text"], m["task"]
    return {"kl_answers": answers["kl_mean"], "top1_answers": answers["top1"], "kl_text": text["kl_mean"],
            "top1_text": text["top1"], "ppl_ratio": text["ppl_ratio"], "task_score": task["served"],
            "task_score_reference": task["reference"], "task_ratio": task["ratio"], "task_p_value": task["p_value"],
            "prompts": task["prompts"], "seconds": m["seconds"]}


def misses(figures: dict, bounds, margin: float = 1.0) -> list[str]:
    """Which of fidelity()'s figures are outside `bounds` (an api.Bounds) tightened by `margin`: the KLs above
    margin x their bound, the perplexity ratio's excess over 1 above margin x the bound's, the task score down
    significantly (exact McNemar, as the gate tests it) below the bound's ratio. Empty: every figure inside.

        misses({"kl_answers": 0.009, ...}, INT4, margin=0.7)   # ["KL along the answers 0.009 > 0.007 (0.7 x 0.01)"]
    """
    aim = lambda bound: f"{margin * bound:.3g} ({margin} x {bound})" if margin != 1 else f"{bound}"
    out = []
    if figures["kl_answers"] > margin * bounds.kl_answers:
        out.append(f"KL along the answers {figures['kl_answers']:.3g} > {aim(bounds.kl_answers)}")
    if figures["kl_text"] > margin * bounds.kl_text:
        out.append(f"KL on the text {figures['kl_text']:.3g} > {aim(bounds.kl_text)}")
    if figures["ppl_ratio"] - 1 > margin * (bounds.ppl_ratio - 1):
        out.append(f"perplexity ratio {figures['ppl_ratio']:.4f} > {1 + margin * (bounds.ppl_ratio - 1):.4g}")
    if figures["task_p_value"] < SIGNIFICANCE and figures["task_ratio"] < bounds.task_ratio:
        out.append(f"task score {figures['task_score']:.3f} against the reference's "
                   f"{figures['task_score_reference']:.3f} (a significant drop, p = {figures['task_p_value']:.3g})")
    return out
