"""The merged model against the model that was trained (the 4-bit base + adapter): full-model logits on the
reference text, or the per-layer figures the streamed merge sampled, and the held-out answers side by side."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..corpus import REFERENCE_TEXT
from ..models import trained_model
from ..records import TrainingRecord

if TYPE_CHECKING:
    from ..adapter import Adapter

# fp32 logits of the merged model vs the 4-bit + adapter model: measured ~1e-6 (summation order differs between a
# fused weight and the factored adapter path); 1e-4 is 100x that noise and far below any real merge error (~0.26).
EXACT_LIMIT = 1e-4


def logits_check(base: Path, adapter: Adapter, merged_dir: Path, mode: str, dtype: str) -> dict:
    """Merged model's logits against the 4-bit base + adapter model (and the 4-bit base alone)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(merged_dir)
    ids = tok(REFERENCE_TEXT, return_tensors="pt")["input_ids"][:, :512]
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
        got = merged(ids).logits.float()
        del merged
        model = trained_model(base, adapter.path, adapter.record)
        ref = model(ids.to(model.device)).logits.float().cpu()
        with model.disable_adapter():
            plain = model(ids.to(model.device)).logits.float().cpu()
    norm = lambda t: torch.linalg.vector_norm(t).item()
    rel_error = norm(got - ref) / norm(ref)
    effect = norm(ref - plain) / norm(plain)
    retained = 1 - norm(got - ref) / norm(ref - plain) if effect > 0 else 0.0
    exact_required = mode == "nf4" and dtype == "float32"
    passed = effect > 1e-6 and retained > 0.5 and (rel_error <= EXACT_LIMIT or not exact_required)
    return {"method": "full-model logits", "tokens": int(ids.shape[1]), "rel_error": rel_error,
            "limit": EXACT_LIMIT if exact_required else None, "adapter_effect": effect,
            "fine_tune_retained": retained, "passed": passed}


def heldout_comparison(merged_dir: Path, heldout_file: Path, record: TrainingRecord | None) -> dict:
    """The merged model's held-out answers beside the 4-bit + adapter model's answers from training."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..data import load_heldout
    from .evaluate import exact_match

    tok = AutoTokenizer.from_pretrained(merged_dir)
    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    result = exact_match(model, tok, load_heldout(heldout_file)).to_dict()
    trained = {a["line"]: a["got"] for a in (record.heldout_answers if record else [])}
    for a in result["answers"]:
        a["adapter_got"] = trained.get(a["line"])
    compared = [a for a in result["answers"] if a["adapter_got"] is not None]
    result["path"] = str(heldout_file)
    result["agree_with_adapter"] = sum(a["got"].strip() == a["adapter_got"].strip() for a in compared)
    result["compared"] = len(compared)
    return result


def equivalence(check: str, base: Path, adapter: Adapter, merged: Path, layers: dict, fp32_bytes: int,
                base_weights: str, dtype: str) -> dict:
    """The merged model against the 4-bit base + adapter: full-model logits when three float32 copies (fp32_bytes
    each) fit in free memory (or asked for), else the per-layer sampled activations the merge measured (layers)."""
    method = check
    if check == "auto":
        import psutil

        method = "full" if 3 * fp32_bytes < psutil.virtual_memory().available else "layer"
    worst_layer = max(v["layer_check_rel_error"] for v in layers.values())
    if method == "full":
        result = logits_check(base, adapter, merged, base_weights, dtype)
    else:
        result = {"method": "per-layer sampled activations" if method == "layer" else "unchecked (--check none)",
                  "rel_error": worst_layer if method == "layer" else None,
                  "limit": EXACT_LIMIT if method == "layer" and (base_weights, dtype) == ("nf4", "float32") else None}
        result["passed"] = method == "none" or result["limit"] is None or worst_layer <= EXACT_LIMIT
    result["worst_layer_rel_error"] = worst_layer
    return result


def check_failure(result: dict, mode: str, dtype: str) -> str:
    if result.get("adapter_effect", 1) <= 1e-6:
        return "the adapter does not change the model's outputs: the merged model would equal the base"
    if result.get("fine_tune_retained", 1) <= 0.5:
        return (f"the merged model kept only {result['fine_tune_retained']:.0%} of the fine-tune's effect on the "
                f"logits of the reference text ({mode} base weights, {dtype}): it is closer to the base than to the "
                "trained model (`qlora-bridge compare` measures both merges on the held-out answers)")
    return (f"the merged model's logits differ from the 4-bit base + adapter by {result['rel_error']:.2e} "
            f"(relative), above the {result['limit']:.0e} an exact nf4 float32 merge must meet")
