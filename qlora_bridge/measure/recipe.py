"""recipe=auto: the fewest bits per weight that keep the fine-tune, found by measuring it (issue 33), for any packed
target that describes its recipes (RecipeSpace).

A fixed recipe cannot be right for every model: groups of 32 with q/k/v kept in 16 bits (6.40 bits per decoder
weight) were needed on the 135M demo, where a 7B keeps its fine-tune at ~4.25 bits. So the export tries recipes in
order of bits and keeps the first whose figures hold:

    each group size the target offers, largest first, all packed
    then, at the smallest group, the module sets (those a server runs as one Linear, kept together) kept in 16 bits
    one more at a time, in the order measurement ranks them: each set's merged weights put back alone into the
    export as written, the KL along the answers it buys back per bit it costs (a set that buys nothing back is never
    kept); the first keep tried is the one the sets' effects, added up, predict to hold
    until every figure is inside the target's bounds by MARGIN, or the next recipe would exceed max_bits

Each step is a whole export, read back as the target does, then measured through the target's own logits against
the model that was trained (fidelity: the gate's figures, teacher-forced, no server). The manifest records every
step.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import CheckFailed
from .fidelity import fidelity, misses

# The aim inside the gate's bounds: KL at most 0.7 of its bound, the perplexity ratio's excess over 1 at most 0.7 of
# the bound's. Two fine-tunes of the same demo data at one fixed recipe were served at perplexity ratios 1.037 and
# 1.054 (bound 1.05): a retrained model moves the figures by about a third of the bound's excess, and what a server
# computes (half-precision activations, its own kernels) is not exactly an exporter's float32 dequantization.
MARGIN = 0.7
MAX_BITS = 8.0  # beyond this a plain 8-bit export keeps more for fewer bits


@dataclass
class RecipeSpace:
    """What a packed target offers the search, and how it writes and reads a recipe.

        RecipeSpace(groups=(128, 64, 32), sets=[("q_proj", "k_proj", "v_proj"), ("o_proj",), ...],
                    bits=lambda group, keep: 4.2, write=lambda group, keep: export_result,
                    logits=exporter_logits, restored=lambda kinds: logits_with_kinds_put_back)

    groups: largest first, each dividing every layer's input; sets: module kinds kept or packed together; bits:
    bits per decoder weight of (group, kinds kept); write: export that recipe into the request's out folder (its
    ExportResult); logits: an Exporter.logits hook; restored(kinds): one that reads the export with the merged
    weights of `kinds` put back, to measure what packing them costs; fix: what the failure past the budget tells
    the user to do."""
    groups: tuple[int, ...]
    sets: list[tuple[str, ...]]
    bits: Callable[[int, tuple[str, ...]], float]
    write: Callable[[int, tuple[str, ...]], object]
    logits: Callable
    restored: Callable[[tuple[str, ...]], Callable]
    fix: str = "raise --option max_bits, or export at 8 bits (`qlora-bridge plugins` lists the targets)"


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


def clear(folder: Path) -> None:
    for p in folder.iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def search_recipe(req, space: RecipeSpace, bounds, max_bits: float = MAX_BITS,
                  say: Callable[[str], None] = lambda text: None) -> tuple[object, dict]:
    """Export at each recipe in turn until one holds; returns that export's result (written in req.out) and the
    recipe's record for the manifest (settings.recipe). Raises CheckFailed with the closest step when none within
    max_bits does.

        result, record = search_recipe(req, space, BOUNDS[req.quant], max_bits=8, say=print)
    """
    present = {k for s in space.sets for k in s}
    steps: list[Step] = []

    def attempt(group: int, keep: tuple[str, ...]):
        step = Step(group, tuple(sorted(keep)), space.bits(group, keep))
        say(f"recipe step {len(steps) + 1}: groups of {group}"
            + (f", {', '.join(step.keep)} kept in 16 bits" if keep else ", all packed")
            + f" ({step.bits_per_weight} bits per weight)")
        if steps:
            clear(req.out)
        written = space.write(group, step.keep)
        step.figures = fidelity(req.lineage, req.merged, req.out, space.logits)
        step.missed = misses(step.figures, bounds, MARGIN)
        steps.append(step)
        say(f"  {figures_line(step.figures)}: " + ("inside the bounds by the margin" if not step.missed
                                                  else "missed " + "; ".join(step.missed)))
        return written, step

    for group in space.groups:
        written, step = attempt(group, ())
        if not step.missed:
            return written, record(steps, max_bits)
    group, base = space.groups[-1], steps[-1]
    restored, gains = {}, {}
    say("what each module set costs the fine-tune: its merged weights put back into this export")
    for kinds in space.sets:  # measured on the export as written
        restored[kinds] = fidelity(req.lineage, req.merged, req.out, space.restored(kinds))
        cost = space.bits(group, kinds) - base.bits_per_weight
        gains[kinds] = (base.figures["kl_answers"] - restored[kinds]["kl_answers"]) / cost
        say(f"  {'+'.join(kinds)}: KL along the answers {restored[kinds]['kl_answers']:.3g}, "
            f"{gains[kinds]:.3g} bought back per bit")
    ranked = sorted([s for s in space.sets if gains[s] > 0], key=lambda s: -gains[s])  # buys nothing: never kept
    keeps = [tuple(k for s in ranked[:i] for k in s) for i in range(1, len(ranked) + 1)]
    keeps = [k for k in keeps if set(k) != present and space.bits(group, k) <= max_bits]
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
                      fix=space.fix)


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
