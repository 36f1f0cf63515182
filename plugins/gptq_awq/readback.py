"""Read an export back with our own format reader and hold it against the merged weights it came from.

Two checks, both independent of the library that wrote the export:
- per layer: the dequantized weight against the merged one (relative Frobenius error). AWQ folds per-channel
  smoothing factors into neighbouring tensors (input channels of the quantized layer, output rows of the layer
  before it), so for AWQ those diagonal factors are undone by least squares first. A diagonal rescaling cannot
  hide wrong packing, zero points or scales: those scramble values within a row or a column.
- the whole model: merged architecture with every tensor from the export (dequantized where packed), logits on
  the reference text against the merged model's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .formats import awq_dequantize, gptq_dequantize

# 4-bit round-to-nearest with groups of 32..128 leaves ~10-15% relative error on weights; GPTQ stays near that
# (demo: mean 0.13, worst 0.26). AWQ also clips weights where that lowers the output error, so its weight error
# runs higher (worst 0.48 on a random-init tiny model). Scrambled packing gives ~1.4 (columns swapped within
# blocks of 8) and an all-zero layer 1.0, so the bound sits between.
MAX_LAYER_ERROR = {"gptq": 0.5, "awq": 0.8}


def tensors(folder: Path) -> dict[str, tuple[Path, str]]:
    """Tensor name -> (file, name) over a folder's safetensors files, sharded or not."""
    from safetensors import safe_open

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            out.update({k: (f, k) for k in h.keys()})
    return out


class Reader:
    def __init__(self, folder: Path):
        self.index = tensors(folder)

    def __contains__(self, name):
        return name in self.index

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        f, key = self.index[name]
        with safe_open(f, "pt") as h:
            return h.get_tensor(key)


def quantization_config(folder: Path) -> dict:
    return json.loads((Path(folder) / "config.json").read_text()).get("quantization_config") or {}


def dequantized(export: Reader, prefix: str, qc: dict) -> torch.Tensor:
    qweight, qzeros, scales = (export.get(f"{prefix}.{n}") for n in ("qweight", "qzeros", "scales"))
    if qc["quant_method"] == "awq":
        return awq_dequantize(qweight, qzeros, scales, qc["group_size"])
    return gptq_dequantize(qweight, qzeros, scales, export.get(f"{prefix}.g_idx"), qc["bits"])


def undo_smoothing(w: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """w ~ diag(r) ref diag(c): divide out the least-squares column factors c, then the row factors r."""
    c = (w * ref).sum(0) / (ref * ref).sum(0).clamp(min=1e-30)
    w = w / torch.where(c.abs() > 1e-12, c, torch.ones_like(c))
    r = (w * ref).sum(1) / (ref * ref).sum(1).clamp(min=1e-30)
    return w / torch.where(r.abs() > 1e-12, r, torch.ones_like(r)).unsqueeze(1)


def layer_errors(export_dir: Path, merged_dir: Path) -> dict[str, float]:
    """Relative error of every packed layer against the merged weight; raises ValueError naming a bad layer."""
    qc = quantization_config(export_dir)
    export, merged = Reader(export_dir), Reader(merged_dir)
    prefixes = sorted(n[: -len(".qweight")] for n in export.index if n.endswith(".qweight"))
    if not prefixes:
        raise ValueError("the export has no packed layers (no .qweight tensors)")
    errors = {}
    for prefix in prefixes:
        ref = merged.get(f"{prefix}.weight").float()
        got = dequantized(export, prefix, qc)
        if got.shape != ref.shape:
            raise ValueError(f"{prefix}: dequantized shape {tuple(got.shape)}, merged {tuple(ref.shape)}")
        if not torch.isfinite(got).all():
            raise ValueError(f"{prefix}: the dequantized weight has NaN or infinite values")
        if qc["quant_method"] == "awq":
            got = undo_smoothing(got, ref)
        err = (torch.linalg.vector_norm(got - ref) / torch.linalg.vector_norm(ref).clamp(min=1e-30)).item()
        limit = MAX_LAYER_ERROR[qc["quant_method"]]
        if not math.isfinite(err) or err > limit:
            raise ValueError(f"{prefix}: relative error {err:.3g} against the merged weight (limit "
                             f"{limit}): wrong packing, zero points or scales")
        errors[prefix] = round(err, 5)
    return errors


def dense_state(export_dir: Path) -> dict[str, torch.Tensor]:
    """The export as plain tensors: packed layers dequantized to float32 weights, everything else as stored."""
    qc = quantization_config(export_dir)
    export = Reader(export_dir)
    packed = {n[: -len(".qweight")] for n in export.index if n.endswith(".qweight")}
    state = {}
    for name in export.index:
        prefix, _, leaf = name.rpartition(".")
        if prefix in packed:
            if leaf == "qweight":
                state[f"{prefix}.weight"] = dequantized(export, prefix, qc)
        else:
            state[name] = export.get(name).float()
    return state


def logits_check(export_dir: Path, merged_dir: Path, text: str) -> dict:
    """The export, dequantized into the merged architecture, against the merged model on `text` (float32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(merged_dir, trust_remote_code=False)
    ids = tok(text, return_tensors="pt")["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(ids).logits[0].float()
        missing, unexpected = model.load_state_dict(dense_state(export_dir), strict=False)
        tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
        if unexpected or set(missing) - tied:
            raise ValueError(f"the export's tensors do not fit the merged architecture: missing "
                             f"{sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]}")
        got = model(ids).logits[0].float()
    nll = lambda lg: torch.nn.functional.cross_entropy(lg[:-1], ids[0, 1:]).item()
    return {"tokens": ids.shape[1],
            "rel_logits_error": round((torch.linalg.vector_norm(got - ref) / torch.linalg.vector_norm(ref)).item(), 5),
            "top1_agreement": round((got.argmax(-1) == ref.argmax(-1)).float().mean().item(), 4),
            "ppl_merged": round(math.exp(nll(ref)), 4), "ppl_dequantized": round(math.exp(nll(got)), 4)}
