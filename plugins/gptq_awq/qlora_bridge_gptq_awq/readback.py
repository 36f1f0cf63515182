"""Read an export back with our own format reader and hold it against the merged weights it came from.

Two checks, both independent of the library that wrote the export:
- per layer: the dequantized weight against the merged one (relative Frobenius error). AWQ folds per-channel
  smoothing factors into neighbouring tensors (input channels of the quantized layer, output rows of the layer
  before it), so for AWQ the merged weight is first given the diagonal factors that fit the export best (least
  squares), and the error is measured there, in the scaled frame where the rounding happened. Diagonal factors
  cannot hide wrong packing, zero points or scales: those scramble values within a row or a column.
- the whole model: every tensor from the export (dequantized where packed) in a float32 model of its
  architecture, logits and perplexity on the reference text against the merged model's, both streamed one layer
  at a time.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .formats import awq_dequantize, gptq_dequantize

# 4-bit round-to-nearest with groups of 32..128 leaves ~10-15% relative error on weights; GPTQ stays near that
# (demo: mean 0.13, worst 0.26), AWQ too once its smoothing is fitted (demo, first layers: 0.10-0.13; it also clips
# weights where that lowers the output error). Scrambled packing gives ~1.4 (GPTQ) or ~0.9 (AWQ, where the fit
# shrinks the scrambled columns), an all-zero layer fails on its own, so the bound sits between.
MAX_LAYER_ERROR = {"gptq": 0.5, "awq": 0.5}
# The dequantized model's perplexity on the reference text, as a multiple of the merged model's: 4-bit GPTQ of the
# demo gives 1.55x, GPTQModel's AWQ forced to compute in float32 (which it does not support) gave 180,000x.
MAX_PPL_RATIO = 3.0
ELEMENT_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


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


def fit_smoothing(got: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """ref with the diagonal factors that bring it closest to got: diag(r) ref diag(c), columns first."""
    c = (got * ref).sum(0) / (ref * ref).sum(0).clamp(min=1e-30)
    ref = ref * c
    r = (got * ref).sum(1) / (ref * ref).sum(1).clamp(min=1e-30)
    return ref * r.unsqueeze(1)


def layer_errors(export_dir: Path, merged_dir: Path, smoothed: bool | None = None, console=None) -> dict[str, float]:
    """Relative error of every packed layer against the merged weight; raises ValueError naming a bad layer.
    smoothed: whether the quantizer folded smoothing factors into the weights (default: AWQ does; an AWQ file
    written by GPTQ's rounding has none, and is held to the merged weight as it is). console: where a progress bar
    goes (None: none)."""
    from tqdm import tqdm

    qc = quantization_config(export_dir)
    export, merged = Reader(export_dir), Reader(merged_dir)
    prefixes = sorted(n[: -len(".qweight")] for n in export.index if n.endswith(".qweight"))
    if not prefixes:
        raise ValueError("the export has no packed layers (no .qweight tensors)")
    errors = {}
    for prefix in tqdm(prefixes, desc="reading back", unit="matrix", file=console, disable=console is None,
                       leave=False):
        ref = merged.get(f"{prefix}.weight").float()
        got = dequantized(export, prefix, qc)
        if got.shape != ref.shape:
            raise ValueError(f"{prefix}: dequantized shape {tuple(got.shape)}, merged {tuple(ref.shape)}")
        if not torch.isfinite(got).all():
            raise ValueError(f"{prefix}: the dequantized weight has NaN or infinite values")
        if not got.any():
            raise ValueError(f"{prefix}: every dequantized weight is zero")
        if smoothed if smoothed is not None else qc["quant_method"] == "awq":
            ref = fit_smoothing(got, ref)
        err = (torch.linalg.vector_norm(got - ref) / torch.linalg.vector_norm(ref).clamp(min=1e-30)).item()
        limit = MAX_LAYER_ERROR[qc["quant_method"]]
        if not math.isfinite(err) or err > limit:
            raise ValueError(f"{prefix}: relative error {err:.3g} against the merged weight (limit "
                             f"{limit}): wrong packing, zero points or scales")
        errors[prefix] = round(err, 5)
    return errors


def kept_errors(export_dir: Path, merged_dir: Path, kept: list[str]) -> dict[str, float]:
    """Relative error of every layer the export left unquantized against the merged weight; raises ValueError
    naming a layer that was packed after all, or that holds other weights than the merged ones. Storing a float32
    weight in half precision moves each value by at most half a unit in its last place, so the relative error
    stays below that precision's machine epsilon (float16 9.8e-4, bfloat16 7.8e-3); an unmerged or another
    model's weight differs by far more (the demo's LoRA deltas are ~1% of a weight)."""
    export, merged = Reader(export_dir), Reader(merged_dir)
    errors = {}
    for prefix in kept:
        if f"{prefix}.qweight" in export or f"{prefix}.weight" not in export:
            raise ValueError(f"{prefix}: was to stay unquantized, but the export holds no float weight for it")
        got, ref = export.get(f"{prefix}.weight"), merged.get(f"{prefix}.weight").float()
        err = (torch.linalg.vector_norm(got.float() - ref) / torch.linalg.vector_norm(ref).clamp(min=1e-30)).item()
        if not err <= torch.finfo(got.dtype).eps:
            raise ValueError(f"{prefix}: the unquantized weight differs from the merged one (relative error "
                             f"{err:.3g}, more than {got.dtype}'s rounding)")
        errors[prefix] = round(err, 7)
    return errors


def bits_per_weight(export_dir: Path, merged_dir: Path, prefixes: list[str]) -> float:
    """Bits the export stores per weight of these layers, codes, scales, zero points and unquantized weights all
    counted (4-bit codes in groups of 32 with float16 scales and 4-bit zeros: 4.625)."""
    from safetensors import safe_open

    def sizes(folder: Path) -> dict[str, tuple[int, int]]:  # tensor -> (elements, bytes)
        out = {}
        for f in sorted(Path(folder).glob("*.safetensors")):
            with safe_open(f, "pt") as h:
                for name in h.keys():
                    t = h.get_slice(name)
                    n = math.prod(t.get_shape())
                    out[name] = (n, n * ELEMENT_BYTES[t.get_dtype()])
        return out

    stored, merged = sizes(export_dir), sizes(merged_dir)
    nbytes = sum(b for name, (_, b) in stored.items() if name.rpartition(".")[0] in prefixes)
    weights = sum(merged[f"{p}.weight"][0] for p in prefixes)
    return round(8 * nbytes / weights, 3)


def dense_weights(export_dir: Path):
    """name -> the export's tensor as a plain float32 weight: a packed layer's dequantized, anything else as stored."""
    qc = quantization_config(export_dir)
    export = Reader(export_dir)
    packed = {n[: -len(".qweight")] for n in export.index if n.endswith(".qweight")}

    def weight(name: str) -> torch.Tensor:
        prefix, _, leaf = name.rpartition(".")
        if prefix in packed and leaf == "weight":
            return dequantized(export, prefix, qc)
        return export.get(name).float()
    names = [n.removesuffix(".qweight") + ".weight" if n.endswith(".qweight") else n for n in export.index
             if n.endswith(".qweight") or n.rpartition(".")[0] not in packed]
    return weight, names


def dense_state(export_dir: Path) -> dict[str, torch.Tensor]:
    """The export as plain tensors: packed layers dequantized to float32 weights, everything else as stored."""
    weight, names = dense_weights(export_dir)
    return {name: weight(name) for name in names}


def dense_model(export_dir: Path):
    """The export as a plain float32 transformers model: its architecture, every packed layer dequantized."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(export_dir, trust_remote_code=False)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    missing, unexpected = model.load_state_dict(dense_state(export_dir), strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise ValueError(f"the export's tensors do not fit its architecture: missing "
                         f"{sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]}")
    model.tie_weights()
    return model


def logits_check(export_dir: Path, merged_dir: Path, text: str, console=None) -> dict:
    """The export, dequantized, against the merged model on `text` (float32), each streamed layer by layer
    (measure.logits.streamed_logits): two whole float32 models side by side were three quarters of a 4-bit
    export's peak memory (17.4 GB for a 1.1B model). console: where a progress bar goes (None: none)."""
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from qlora_bridge.api import streamed_logits

    tok = AutoTokenizer.from_pretrained(merged_dir, trust_remote_code=False)
    ids = tok(text, return_tensors="pt")["input_ids"][0]
    merged = Reader(merged_dir)
    with tqdm(total=2, desc="reading back: the reference text through the merged model and the export",
              unit="model", file=console, disable=console is None, leave=False) as bar:
        ref = streamed_logits(merged_dir, lambda name: merged.get(name).float(), ids)
        bar.update()
        got = streamed_logits(export_dir, dense_weights(export_dir)[0], ids)
        bar.update()
    nll = lambda lg: torch.nn.functional.cross_entropy(lg[:-1], ids[1:]).item()
    return {"tokens": len(ids),
            "rel_logits_error": round((torch.linalg.vector_norm(got - ref) / torch.linalg.vector_norm(ref)).item(), 5),
            "top1_agreement": round((got.argmax(-1) == ref.argmax(-1)).float().mean().item(), 4),
            "ppl_merged": round(math.exp(nll(ref)), 4), "ppl_dequantized": round(math.exp(nll(got)), 4)}
