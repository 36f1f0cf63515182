"""recipe=auto: the fewest bits per weight that keep the fine-tune, found by measuring it (issue 33).

A fixed recipe cannot be right for every model: groups of 32 with q/k/v kept in float16 (6.40 bits per decoder
weight) were needed on the 135M demo, where a 7B keeps its fine-tune at ~4.25 bits. So the export tries recipes in
order of bits and keeps the first whose figures hold:

    groups of 128, 64, 32 (those that divide every layer's input), all packed
    then, at the smallest group, vLLM's fused sets kept in 16 bits one more at a time, in the order measurement
    ranks them: each set's merged weights put back alone into the export as written, the KL along the answers it
    buys back per bit it costs (a set that buys nothing back is never kept); the first keep tried is the one the
    sets' effects, added up, predict to hold
    until every figure is inside the target's bounds by MARGIN, or the next recipe would exceed max_bits

Each step is a whole export, read back as usual, then measured through our own dequantization against the model
that was trained (api.fidelity: the gate's figures, teacher-forced, no server). The manifest records every step.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from qlora_bridge.api import Bounds, BridgeError, CheckFailed, fidelity, misses, model_logits, streamed_model

# The aim inside the gate's bounds: KL at most 0.7 of its bound, the perplexity ratio's excess over 1 at most 0.7 of
# the bound's. Two fine-tunes of the same demo data at one fixed recipe were served at perplexity ratios 1.037 and
# 1.054 (bound 1.05): a retrained model moves the figures by about a third of the bound's excess, and what vLLM
# computes (half-precision activations, its own kernels) is not exactly our float32 dequantization.
MARGIN = 0.7
MAX_BITS = 8.0  # beyond this an 8-bit export (gptq int8, gguf Q8_0) keeps more for fewer bits


@dataclass
class Step:
    """One recipe tried: its settings, the bits per decoder weight it costs, the figures measured, what missed."""
    group: int
    keep: tuple[str, ...]  # module kinds kept in 16 bits (q_proj, ...)
    bits_per_weight: float
    figures: dict = field(default_factory=dict)
    missed: list[str] = field(default_factory=list)

    def record(self) -> dict:
        return {"group_size": self.group, "kept_unquantized": list(self.keep),
                "bits_per_weight": self.bits_per_weight, "figures": rounded(self.figures), "missed": self.missed}


def rounded(figures: dict) -> dict:
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in figures.items()}


def recipe_bits(shapes: dict[str, tuple[int, int]], bits: int, group: int, keep: tuple[str, ...]) -> float:
    """What a recipe stores per decoder weight: codes, a 16-bit scale and a `bits`-bit zero point per group of the
    packed Linears, 16 bits for each weight of the kept ones."""
    packed = bits + (16 + bits) / group
    total = sum(o * i for o, i in shapes.values())
    stored = sum(o * i * (16 if name.rpartition(".")[2] in keep else packed) for name, (o, i) in shapes.items())
    return round(stored / total, 3)


def restored_logits(merged: Path, kinds: tuple[str, ...]):
    """An Exporter.logits-like hook: the export dequantized, with the merged weights of `kinds` put back."""
    from .readback import Reader, dense_weights

    reference = Reader(merged)

    def logits(folder: Path, sequences):
        dequantized, _ = dense_weights(folder)

        def weight(name: str):
            module, _, leaf = name.rpartition(".")
            if leaf == "weight" and module.rpartition(".")[2] in kinds:
                return reference.get(name).float()
            return dequantized(name)
        yield from model_logits(streamed_model(folder, weight), sequences)
    logits.restored = kinds
    return logits


def clear(folder: Path) -> None:
    for p in folder.iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def search(req, write, logits, shapes: dict[str, tuple[int, int]], bits: int, groups, bounds: Bounds, fused,
           max_bits: float, say) -> tuple[object, dict]:
    """Export at each recipe in turn (write(group, kinds kept) -> its ExportResult, written into req.out) until one
    holds, trying `groups` largest first (those that divide every layer's input) and `fused` sets kept together;
    returns that export's result and the recipe's record for the manifest. Raises CheckFailed with the closest
    step when none within max_bits does."""
    widths = {i for _, i in shapes.values()}
    groups = sorted((g for g in groups if not any(w % g for w in widths)), reverse=True)
    if not groups:
        raise BridgeError(f"no group size divides every layer's input width ({sorted(widths)})", file=req.merged,
                          fix="this model cannot be packed in whole groups; export it as gguf or safetensors")
    present = {name.rpartition(".")[2] for name in shapes}
    sets = [tuple(k for k in s if k in present) for s in fused]
    sets = [s for s in sets if s] + [(k,) for k in sorted(present - {k for s in sets for k in s})]
    steps: list[Step] = []

    def attempt(group: int, keep: tuple[str, ...]):
        step = Step(group, tuple(sorted(keep)), recipe_bits(shapes, bits, group, keep))
        say(f"recipe step {len(steps) + 1}: groups of {group}"
            + (f", {', '.join(step.keep)} kept in 16 bits" if keep else ", all packed")
            + f" ({step.bits_per_weight} bits per weight)")
        if steps:
            clear(req.out)
        written = write(group, step.keep)
        step.figures = fidelity(req.lineage, req.merged, req.out, logits)
        step.missed = misses(step.figures, bounds, MARGIN)
        steps.append(step)
        say("  " + (f"inside the bounds by the margin: {figures_line(step.figures)}" if not step.missed
                    else "missed: " + "; ".join(step.missed)))
        return written, step

    for group in groups:
        written, step = attempt(group, ())
        if not step.missed:
            return written, record(steps, max_bits)
    group, base = groups[-1], steps[-1]
    restored, gains = {}, {}
    say("what each module set costs the fine-tune: its merged weights put back into this export")
    for kinds in sets:  # measured on the export as written
        restored[kinds] = fidelity(req.lineage, req.merged, req.out, restored_logits(req.merged, kinds))
        cost = recipe_bits(shapes, bits, group, kinds) - base.bits_per_weight
        gains[kinds] = (base.figures["kl_answers"] - restored[kinds]["kl_answers"]) / cost
        say(f"  {'+'.join(kinds)}: KL along the answers {restored[kinds]['kl_answers']:.3g}, "
            f"{gains[kinds]:.3g} bought back per bit")
    ranked = sorted([s for s in sets if gains[s] > 0], key=lambda s: -gains[s])  # a set that buys nothing: never
    keeps = [tuple(k for s in ranked[:i] for k in s) for i in range(1, len(ranked) + 1)]
    keeps = [k for k in keeps if set(k) != present and recipe_bits(shapes, bits, group, k) <= max_bits]
    # start where the sets' measured effects, added up, say the figures would hold (else at the dearest keep the
    # budget allows, to report how close it comes); each export then says whether they really do
    holds = [k for k in keeps if not misses(predicted(base.figures, [restored[s] for s in ranked
                                                                     if set(s) <= set(k)]), bounds, MARGIN)]
    start = keeps.index(holds[0]) if holds else len(keeps) - 1
    for keep in keeps[max(start, 0):]:
        written, step = attempt(group, keep)
        if not step.missed:
            return written, record(steps, max_bits, gains)
    closest = min(steps, key=lambda s: len(s.missed))
    raise CheckFailed(f"recipe=auto: no recipe within max_bits={max_bits} keeps every figure inside the bounds by "
                      f"the margin ({MARGIN}); the closest, groups of {closest.group}"
                      + (f" with {', '.join(closest.keep)} kept" if closest.keep else "")
                      + f" ({closest.bits_per_weight} bits per weight), missed: {'; '.join(closest.missed)}",
                      file=req.out, field="--option max_bits",
                      fix="raise --option max_bits, or export at 8 bits (--target gptq --quant int8, or gguf Q8_0)")


def predicted(base: dict, restored: list[dict]) -> dict:
    """The figures with several sets kept, from each set's measured effect alone, added up (the task score's test
    is not predicted: it is left out)."""
    out = {**base, "task_p_value": 1.0}
    for key in ("kl_answers", "kl_text", "ppl_ratio"):
        out[key] = base[key] - sum(base[key] - r[key] for r in restored)
    return out


def figures_line(f: dict) -> str:
    return (f"KL along the answers {f['kl_answers']:.3g}, on the text {f['kl_text']:.3g}, perplexity ratio "
            f"{f['ppl_ratio']:.4f}, task score {f['task_score']:.3f} (reference {f['task_score_reference']:.3f})")


def record(steps: list[Step], max_bits: float, gains: dict | None = None) -> dict:
    """The manifest's settings.recipe: every step tried, the last one chosen."""
    return {"mode": "auto", "margin": MARGIN, "max_bits": max_bits, "steps": [s.record() for s in steps],
            "chosen": len(steps), **({"kl_bought_back_per_bit": {"+".join(k): round(v, 6) for k, v in gains.items()}}
                                     if gains else {})}
