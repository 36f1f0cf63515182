"""recipe=auto for GPTQ and AWQ: what this target offers the API's search (api.search_recipe) and how it reads a
recipe: group sizes that divide every layer's input, vLLM's fused sets kept together, what a recipe stores per
weight, and the export read with some sets' merged weights put back."""

from __future__ import annotations

from pathlib import Path

from qlora_bridge.api import BridgeError, RecipeSpace, model_logits, streamed_model


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


def space(req, write, logits, shapes: dict[str, tuple[int, int]], bits: int, groups, fused) -> RecipeSpace:
    """The recipes of this export: `groups` that divide every layer's input (largest first), the `fused` sets with
    every other module kind a set of its own, write(group, kinds kept) -> its ExportResult."""
    widths = {i for _, i in shapes.values()}
    groups = tuple(sorted((g for g in groups if not any(w % g for w in widths)), reverse=True))
    if not groups:
        raise BridgeError(f"no group size divides every layer's input width ({sorted(widths)})", file=req.merged,
                          fix="this model cannot be packed in whole groups; export it as gguf or safetensors")
    present = {name.rpartition(".")[2] for name in shapes}
    sets = [tuple(k for k in s if k in present) for s in fused]
    sets = [s for s in sets if s] + [(k,) for k in sorted(present - {k for s in sets for k in s})]
    return RecipeSpace(groups=groups, sets=sets, bits=lambda group, keep: recipe_bits(shapes, bits, group, keep),
                       write=write, logits=logits, restored=lambda kinds: restored_logits(req.merged, kinds),
                       fix="raise --option max_bits, or export at 8 bits (--target gptq --quant int8, or gguf Q8_0)")
