"""`qlora-bridge merge`: exact, streaming dequantize-and-merge of a QLoRA adapter.

The adapter was trained against dequant(nf4(W)), not W. With `base_weights="nf4"` (the default) every target weight
is re-quantized with the same bitsandbytes settings, proven identical to what training built (the fingerprint in
`training_record.json`), dequantized, and W' = dequant(nf4(W)) + (alpha/r)·B·A is formed in float32. With
"original", W' = W + (alpha/r)·B·A: what most tools do, and a different model from the one that was trained.

Tensors stream from the base's shards to the output's shards one at a time, so peak memory is a few copies of the
largest tensor, whatever the size of the model.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .. import __version__
from ..corpus import REFERENCE_TEXT
from ..errors import BridgeError, CheckFailed
from ..files import check_output, digest_folder, output_folder, sha256_file, write_json, writer_lock
from ..manifest import environment
from ..models import check_base, peak_rss_mib, trained_model
from ..quant import state_digest
from ..records import (MERGE_REPORT, MergeReport, TrainingRecord, read_training_record, write_merge_report,
                       write_training_record)
from ..safetensors_io import SafetensorsReader, ShardWriter, model_shards

MODES = ("nf4", "original")
DTYPES = ("float32", "float16", "bfloat16")
# fp32 logits of the merged model vs the 4-bit + adapter model: measured ~1e-6 (summation order differs between a
# fused weight and the factored adapter path); 1e-4 is 100x that noise and far below any real merge error (~0.26).
EXACT_LIMIT = 1e-4
# A delta whose stored form keeps less than this share (by norm) earns a warning: a tenth of the fine-tune gone.
KEPT_WARNING = 0.9
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "model.safetensors.index.json",
                "pytorch_model.bin.index.json")


@dataclass
class LoraLayer:
    module: str  # e.g. model.layers.0.self_attn.q_proj
    a_key: str
    b_key: str
    scale: float
    fan_in_fan_out: bool


@dataclass
class Adapter:
    path: Path
    config: dict
    layers: dict[str, LoraLayer]  # by base weight key
    reader: SafetensorsReader
    record: TrainingRecord | None


def _pattern(patterns: dict, module: str, default):
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_adapter(path: Path) -> Adapter:
    path = Path(path)
    cfg_file = path / "adapter_config.json"
    if not cfg_file.is_file():
        raise BridgeError("not a peft adapter folder (no adapter_config.json)", file=path,
                          fix="pass the folder written by `qlora-bridge train` (or peft's save_pretrained)")
    cfg = json.loads(cfg_file.read_text())
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        found = [p.name for p in path.glob("adapter_model.bin")]
        raise BridgeError("no adapter_model.safetensors" + (" (only a pickle .bin, which is never loaded)"
                          if found else ""), file=path, fix="re-save the adapter with safetensors")
    if cfg.get("peft_type", "LORA") != "LORA" or cfg.get("use_dora"):
        raise BridgeError(f"only plain LoRA adapters can be merged (this is {cfg.get('peft_type')}"
                          f"{', DoRA' if cfg.get('use_dora') else ''})", file=cfg_file, field="peft_type",
                          fix="train a plain LoRA adapter")
    if cfg.get("modules_to_save"):
        raise BridgeError(f"the adapter also saves whole modules {cfg['modules_to_save']}, which this merge does "
                          "not write", file=cfg_file, field="modules_to_save", fix="train without modules_to_save")
    reader = SafetensorsReader(weights)
    layers = {}
    for key in reader.tensors:
        m = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])(?:\.default)?\.weight", key)
        if not m:
            raise BridgeError(f"unsupported adapter tensor '{key}'", file=weights,
                              fix="only LoRA A/B matrices of linear layers can be merged")
        if m.group(2) == "B":
            continue
        module = m.group(1)
        b_key = key.replace(".lora_A", ".lora_B")
        if b_key not in reader.tensors:
            raise BridgeError(f"'{key}' has no matching lora_B", file=weights, fix="re-save the adapter")
        r = reader.tensors[key].shape[0]
        alpha = _pattern(cfg.get("alpha_pattern"), module, cfg["lora_alpha"])
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        layers[f"{module}.weight"] = LoraLayer(module, key, b_key, scale, bool(cfg.get("fan_in_fan_out")))
    if not layers:
        raise BridgeError("the adapter holds no LoRA layers", file=weights, fix="pass a trained adapter")
    record = read_training_record(path, required=False)
    return Adapter(path, cfg, layers, reader, record)


def check_pairing(base: Path, adapter: Adapter, shards: dict[str, Path], mode: str, ignore_digests: bool,
                  base_files: dict[str, str]) -> None:
    """Refuse an adapter trained on another base, and say which evidence shows it."""
    missing = [k for k in adapter.layers if k not in shards]
    if missing:
        raise BridgeError(f"missing target modules: the base has no {', '.join(missing[:3])}"
                          f"{' …' if len(missing) > 3 else ''} ({len(missing)} of {len(adapter.layers)})",
                          file=base, fix="merge into the base the adapter was trained on")
    readers = {}
    for key, layer in adapter.layers.items():
        reader = readers.setdefault(shards[key], SafetensorsReader(shards[key]))
        out_f, in_f = reader.tensors[key].shape
        a, b = adapter.reader.tensors[layer.a_key].shape, adapter.reader.tensors[layer.b_key].shape
        want = (in_f, out_f) if layer.fan_in_fan_out else (out_f, in_f)
        if (b[0], a[1]) != want:
            raise BridgeError(f"shape mismatch at {key}: the base weight is {list(want)}, the adapter's B·A is "
                              f"{[b[0], a[1]]}", file=base, fix="merge into the base the adapter was trained on")
    record = adapter.record
    if mode == "nf4" and (record is None or record.quantization is None):
        raise BridgeError("--base-weights nf4 needs the NF4 fingerprint from training_record.json, which this "
                          "adapter lacks", file=adapter.path, fix="merge an adapter trained by `qlora-bridge train`, "
                          "or pass --base-weights original (a different model from the one trained)")
    if record and not ignore_digests:
        trained_on = record.base["files"]
        differ = [n for n, d in trained_on.items() if n in base_files and base_files[n] != d]
        gone = [n for n in trained_on if n.endswith(".safetensors") and n not in base_files]
        if differ or gone:
            detail = "; ".join([f"{n}: trained on sha256 {trained_on[n][:12]}…, this base has "
                                f"{base_files[n][:12]}…" for n in differ] + [f"{n} is missing" for n in gone])
            raise BridgeError(f"digest mismatch: this is not the base the adapter was trained on ({detail})",
                              file=base, fix="merge into the base recorded in training_record.json, or pass "
                              "--ignore-base-digests if the weights were only re-saved (nf4 mode still proves them "
                              "by fingerprint)")


def named_bases(adapter: Adapter, base: Path, digests_checked: bool) -> list[str]:
    """Where adapter_config.json names a base other than the training record's (an edited or copied config): said,
    not silently settled. Which weights the adapter was trained on is proven by the record's digests and the NF4
    fingerprint (check_pairing), which refuse a base that differs; the config's name proves nothing."""
    named = adapter.config.get("base_model_name_or_path")
    if not named or adapter.record is None or named == adapter.record.base["path"]:
        return []
    return [f"adapter_config.json names the base {named}, the training record {adapter.record.base['path']}: "
            f"merged into {base}, " + ("whose files match the record's digests" if digests_checked else
                                       "whose digests were not checked (--ignore-base-digests)")
            + "; fix base_model_name_or_path in the config before publishing the adapter"]


def nf4_device(quant: dict, inexact: bool) -> str:
    """Where to rebuild NF4: where training built it, since bitsandbytes' CUDA and CPU kernels round differently."""
    import bitsandbytes as bnb

    trained_on = quant.get("device", "cpu")
    if trained_on == "cpu" or torch.cuda.is_available():
        return trained_on
    if inexact:
        return "cpu"
    raise CheckFailed("the adapter was trained on a CUDA GPU, and bitsandbytes' CUDA and CPU kernels round NF4 "
                      "differently (on an H200 with bitsandbytes 0.50.2, 13 of 14 layers differed, by up to 1.3e-3 "
                      f"relative; this is bitsandbytes {bnb.__version__}), so the exact rebuild needs a CUDA GPU",
                      field="quantization.device", fix="run the merge on a machine with a CUDA GPU, or pass "
                      "--inexact-nf4 to rebuild NF4 on the CPU (unproven: ~1e-3 off the trained weights, against "
                      "~0.09 for --base-weights original)")


def nf4_base_weight(w: torch.Tensor, key: str, quant: dict, device: str, inexact: bool) -> torch.Tensor:
    """dequant(nf4(w)) exactly as training built it, after proving the rebuild matches its fingerprint."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    fp = quant["fingerprint"]["layers"][key]
    src = w.to(device=device, dtype=getattr(torch, fp["source_dtype"]))
    packed, qs = quantize_4bit(src, blocksize=fp["blocksize"], compress_statistics=quant["double_quant"],
                               quant_type=quant["quant_type"])
    if not inexact and state_digest(packed, qs) != fp["sha256"]:
        raise FingerprintMismatch(key, quant.get("bitsandbytes_version"), bnb.__version__)
    return dequantize_4bit(packed, qs).float().cpu()


class FingerprintMismatch(CheckFailed):
    def __init__(self, key: str, trained_with: str | None, have: str):
        cause = (f"training used bitsandbytes {trained_with} and this is {have}; its NF4 codes differ between "
                 "versions" if trained_with and trained_with != have else
                 "the base weights differ from the ones the adapter was trained on")
        super().__init__(f"the NF4 weights rebuilt for {key} do not match the fingerprint recorded in training: "
                         f"{cause}", field="quantization.fingerprint",
                         fix=f"merge with bitsandbytes {trained_with or 'as used in training'} and the same base, or "
                         "pass --base-weights original (a different model from the one trained)")


SAMPLE_STRIDE = 8  # every 8th output row: enough for the figures that are estimates, at an eighth of the cost


def merge_layer(base_w: torch.Tensor, adapter: Adapter, layer: LoraLayer, out_dtype: torch.dtype,
                seed: int) -> tuple[torch.Tensor, dict]:
    """W' = base_w + (alpha/r)·B·A in float32, in place, and the stored tensor with the layer's figures.

    Figures: the delta's norm (exact, from the r×r Gram matrices), how much of it the chosen dtype keeps (exact)
    and the other dtypes would keep (estimated on sampled rows), and the relative error of the stored layer
    against the factored path the trained model computes, on sampled rows and random inputs.
    """
    a = adapter.reader.read(layer.a_key).float()
    b = adapter.reader.read(layer.b_key).float()
    w = base_w.T if layer.fan_in_fan_out else base_w  # [out, in] view either way
    rows = slice(None, None, SAMPLE_STRIDE)
    x = torch.randn(8, w.shape[1], generator=torch.Generator().manual_seed(seed))
    ref = x @ w[rows].T + layer.scale * ((x @ a.T) @ b[rows].T)
    base_norm = torch.linalg.vector_norm(w).item()
    # ||B·A||_F^2 = trace((BᵀB)(AAᵀ)): exact without forming the delta
    delta_norm = layer.scale * math.sqrt(max(torch.trace((b.T @ b) @ (a @ a.T)).item(), 0.0))
    sample_delta = torch.linalg.vector_norm(layer.scale * (b[rows] @ a)).item()
    w.addmm_(b, a, alpha=layer.scale)
    stored = base_w.to(out_dtype)
    kept = {}
    for name in DTYPES:
        dtype = getattr(torch, name)
        if dtype == torch.float32 or delta_norm == 0:
            kept[name] = 1.0
        elif dtype == out_dtype:
            err = torch.linalg.vector_norm(stored.float() - base_w).item()
            kept[name] = max(0.0, 1.0 - err / delta_norm)
        else:
            err = torch.linalg.vector_norm(w[rows].to(dtype).float() - w[rows]).item()
            kept[name] = max(0.0, 1.0 - err / sample_delta) if sample_delta else 1.0
    got = x @ (stored.T if layer.fan_in_fan_out else stored)[rows].float().T
    check = (torch.linalg.vector_norm(got - ref) / torch.linalg.vector_norm(ref)).item()
    return stored, {"delta_norm": delta_norm, "delta_rel": delta_norm / max(base_norm, 1e-30), "delta_kept": kept,
                    "layer_check_rel_error": check}


def copy_side_files(base: Path, out: Path, dtype: str) -> None:
    """Config (with the new dtype and no quantization), generation config, tokenizer and other non-weight files."""
    for f in base.iterdir():
        if not f.is_file() or any(f.match(p) for p in WEIGHT_FILES) or f.name in ("README.md", "qlora_bridge_source.json"):
            continue
        shutil.copy2(f, out / f.name)
    cfg = json.loads((base / "config.json").read_text())
    cfg.pop("quantization_config", None)
    cfg["dtype"] = dtype
    cfg.pop("torch_dtype", None)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def base_license(base: Path) -> str | None:
    source = base / "qlora_bridge_source.json"
    if source.is_file():
        return json.loads(source.read_text()).get("license")
    card = base / "README.md"
    if card.is_file():
        m = re.search(r"^license:\s*(\S+)", card.read_text(errors="replace"), re.M)
        return m.group(1) if m else None
    return None


def model_card(base: Path, adapter: Adapter, report: MergeReport) -> str:
    lic = base_license(base)
    check = report.check
    front = ["---", f"base_model: {base.name}", "library_name: transformers", "tags: [qlora-bridge, lora, merged]"]
    if lic:
        front.insert(2, f"license: {lic}")
    front.append("---")
    body = [
        f"# {base.name} + {adapter.path.name} (merged)", "",
        f"Merged by qlora-bridge {__version__}: the LoRA adapter `{adapter.path.name}` added to "
        + ("the NF4-rounded base weights it was trained against (dequant(nf4(W)) + (alpha/r)·B·A, in float32)."
           if report.base_weights == "nf4" else "the original base weights (W + (alpha/r)·B·A)."),
        "", f"- stored dtype: {report.dtype}; delta kept: {report.delta_kept_overall:.4f}",
        f"- equivalence check ({check['method']}): relative logits error {check.get('rel_error')} "
        f"against the 4-bit base + adapter; passed: {check['passed']}",
        "- loads with plain transformers; needs neither peft nor bitsandbytes.", "",
        "See `merge_report.json` for the per-layer figures.",
    ]
    return "\n".join(front + [""] + body) + "\n"


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
    from ..measure.evaluate import exact_match

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


@dataclass
class Streamed:
    """What streaming the weights measured: per-layer delta figures, bytes, seconds per phase, peak memory."""
    layers: dict
    bytes_read: int
    bytes_written: int
    digests: dict
    seconds: dict
    peak_rss_mib: float
    fp32_bytes: int


def stream(base_shards: dict[str, Path], adapter: Adapter, out: Path, *, base_weights: str, dtype: str, quant: dict | None,
           device: str, inexact_nf4: bool, max_shard_bytes: int, progress: bool) -> Streamed:
    """Every base tensor, one at a time: read, rebuilt through NF4 (or copied), the LoRA delta added in float32, cast
    to `dtype` and written to the next shard. Memory stays at a tensor or two whatever the model's size."""
    from tqdm import tqdm

    out_dtype = getattr(torch, dtype)
    readers = {f: SafetensorsReader(f) for f in dict.fromkeys(base_shards.values())}
    order = [(name, readers[f]) for f, r in readers.items() for name in r.tensors if base_shards.get(name) == f]
    writer = ShardWriter(out, max_shard_bytes)
    for name, reader in order:
        info = reader.tensors[name]
        writer.plan(name, out_dtype if info.dtype.is_floating_point else info.dtype, info.shape)
    layers, bytes_read = {}, 0
    seconds = {"read": 0.0, "nf4_rebuild": 0.0, "arithmetic": 0.0, "write": 0.0}
    total = sum(r.tensors[n].nbytes for n, r in order)
    with tqdm(total=total, unit="B", unit_scale=True, desc="merging", disable=not progress, mininterval=1.0,
              leave=False) as bar:
        for i, (name, reader) in enumerate(order):
            t = time.perf_counter()
            w = reader.read(name)
            bytes_read += w.nbytes
            t = lap(seconds, "read", t)
            layer = adapter.layers.get(name)
            if layer is None:
                stored = w.to(out_dtype) if w.is_floating_point() else w
            else:
                base_w = (nf4_base_weight(w, name, quant, device, inexact_nf4) if base_weights == "nf4"
                          else w.to(torch.float32, copy=True))
                t = lap(seconds, "nf4_rebuild", t)
                stored, layers[name] = merge_layer(base_w, adapter, layer, out_dtype, seed=i)
                del base_w
            t = lap(seconds, "arithmetic", t)
            writer.write(name, stored)
            lap(seconds, "write", t)
            bar.update(w.nbytes)
            del w, stored
    weight_map = writer.close()
    write_json(out / "model.safetensors.index.json",
               {"metadata": {"total_size": writer.bytes_written}, "weight_map": weight_map})
    return Streamed(layers, bytes_read, writer.bytes_written, writer.digests, {k: round(v, 2) for k, v in seconds.items()},
                    peak_rss_mib(), sum(4 * math.prod(r.tensors[n].shape) for n, r in order))


def equivalence(check: str, base: Path, adapter: Adapter, merged: Path, streamed: Streamed, base_weights: str,
                dtype: str) -> dict:
    """The merged model against the 4-bit base + adapter: full-model logits when three float32 copies fit in free
    memory (or asked for), else the per-layer sampled activations the stream measured."""
    method = check
    if check == "auto":
        import psutil

        method = "full" if 3 * streamed.fp32_bytes < psutil.virtual_memory().available else "layer"
    worst_layer = max(v["layer_check_rel_error"] for v in streamed.layers.values())
    if method == "full":
        result = logits_check(base, adapter, merged, base_weights, dtype)
    else:
        result = {"method": "per-layer sampled activations" if method == "layer" else "unchecked (--check none)",
                  "rel_error": worst_layer if method == "layer" else None,
                  "limit": EXACT_LIMIT if method == "layer" and (base_weights, dtype) == ("nf4", "float32") else None}
        result["passed"] = method == "none" or result["limit"] is None or worst_layer <= EXACT_LIMIT
    result["worst_layer_rel_error"] = worst_layer
    return result


def merge(base: Path, adapter_dir: Path, out: Path, *, base_weights: str = "nf4", dtype: str = "float32",
          check: str = "auto", heldout_file: Path | None = None, force: bool = False, ignore_base_digests: bool = False,
          inexact_nf4: bool = False, gate: bool = True,
          max_shard_bytes: int = 2 * 2**30, threads: int | None = None, progress: bool = True) -> MergeReport:
    """Merge `adapter_dir` into `base`, writing `out`; the folder is claimed before the base is hashed and planned,
    so a second run to it is refused at once."""
    settings = dict(base_weights=base_weights, dtype=dtype, check=check, heldout_file=heldout_file, force=force,
                    ignore_base_digests=ignore_base_digests, inexact_nf4=inexact_nf4, gate=gate,
                    max_shard_bytes=max_shard_bytes, threads=threads, progress=progress)
    with writer_lock(out, what="merged model folder"):
        check_output(out, force=force, what="merged model folder", marker=MERGE_REPORT)
        return merge_claimed(Path(base), Path(adapter_dir), Path(out), **settings)


def merge_claimed(base: Path, adapter_dir: Path, out: Path, *, base_weights: str, dtype: str, check: str,
                  heldout_file: Path | None, force: bool, ignore_base_digests: bool, inexact_nf4: bool, gate: bool,
                  max_shard_bytes: int, threads: int | None, progress: bool) -> MergeReport:
    if base_weights not in MODES:
        raise BridgeError(f"unknown mode {base_weights!r}", field="base_weights", fix="use nf4 or original")
    if dtype not in DTYPES:
        raise BridgeError(f"unknown dtype {dtype!r}", field="dtype", fix=f"use one of {', '.join(DTYPES)}")
    started = time.time()
    torch.set_num_threads(threads or os.cpu_count() or 1)
    # plan: the pair must be the one that was trained (digests, fingerprint), and NF4 is rebuilt where it was built
    check_base(base)
    adapter = read_adapter(adapter_dir)
    shards = model_shards(base)
    base_files = digest_folder(base, "*.safetensors") | digest_folder(base, "config.json")  # hashed once
    check_pairing(base, adapter, shards, base_weights, ignore_base_digests, base_files)
    quant = adapter.record.quantization if adapter.record else None
    if quant is not None:
        quant = dict(quant, bitsandbytes_version=adapter.record.environment.get("libraries", {}).get("bitsandbytes"))
    device = nf4_device(quant, inexact_nf4) if base_weights == "nf4" else "cpu"
    with output_folder(out, force=force, what="merged model folder", marker=MERGE_REPORT) as tmp:
        streamed = stream(shards, adapter, tmp, base_weights=base_weights, dtype=dtype, quant=quant, device=device,
                          inexact_nf4=inexact_nf4, max_shard_bytes=max_shard_bytes, progress=progress)
        copy_side_files(base, tmp, dtype)
        if all(v["delta_norm"] == 0 for v in streamed.layers.values()):
            raise CheckFailed("every LoRA delta is zero: the merged model would equal the base (the adapter's "
                              "lora_B matrices were never trained)", file=adapter.path,
                              fix="train the adapter (loss must fall) before merging")
        result = equivalence(check, base, adapter, tmp, streamed, base_weights, dtype)
        if not result["passed"] and gate:
            raise CheckFailed(check_failure(result, base_weights, dtype), file=out,
                              fix="see merge_report figures in the JSON output; nothing was written")
        report = merge_report(base, base_files, adapter, streamed, result, base_weights=base_weights, dtype=dtype,
                              device=device, inexact_nf4=inexact_nf4, started=started,
                              warnings=named_bases(adapter, base, not ignore_base_digests))
        if adapter.record:  # the merged folder carries its lineage, so exports need nothing else
            write_training_record(tmp, adapter.record)
        if heldout_file:
            report = replace(report, heldout=heldout_comparison(tmp, heldout_file, adapter.record))
        (tmp / "README.md").write_text(model_card(base, adapter, report))
        write_merge_report(tmp, report)
    return report


def merge_report(base: Path, base_files: dict, adapter: Adapter, streamed: Streamed, check: dict, *, base_weights: str,
                 dtype: str, device: str, inexact_nf4: bool, started: float, warnings: list[str]) -> MergeReport:
    layers = streamed.layers
    overall_kept = (sum(v["delta_norm"] * v["delta_kept"][dtype] for v in layers.values())
                    / sum(v["delta_norm"] for v in layers.values()))
    return MergeReport(
        base={"path": str(base.resolve()), "files": base_files},
        adapter={"path": str(adapter.path.resolve()), "sha256": sha256_file(adapter.path / "adapter_model.safetensors"),
                 "rank": adapter.config.get("r"), "alpha": adapter.config.get("lora_alpha")},
        base_weights=base_weights, dtype=dtype,
        fingerprint_verified=base_weights == "nf4" and not inexact_nf4,
        nf4_rebuilt_on=device if base_weights == "nf4" else None,
        delta_kept_overall=overall_kept, layers=layers, check=check,
        wall_seconds=round(time.time() - started, 2), seconds=streamed.seconds,
        peak_rss_mib=round(streamed.peak_rss_mib, 1), peak_rss_mib_with_check=round(peak_rss_mib(), 1),
        bytes_read=streamed.bytes_read, bytes_written=streamed.bytes_written,
        weights=streamed.digests,  # what an export's reference checks the merged folder against
        warnings=warnings,
        threads=torch.get_num_threads(), environment=environment())


def lap(totals: dict, key: str, since: float) -> float:
    now = time.perf_counter()
    totals[key] += now - since
    return now


def check_failure(result: dict, mode: str, dtype: str) -> str:
    if result.get("adapter_effect", 1) <= 1e-6:
        return "the adapter does not change the model's outputs: the merged model would equal the base"
    if result.get("fine_tune_retained", 1) <= 0.5:
        return (f"the merged model kept only {result['fine_tune_retained']:.0%} of the fine-tune's effect on the "
                f"logits of the reference text ({mode} base weights, {dtype}): it is closer to the base than to the "
                "trained model (`qlora-bridge compare` measures both merges on the held-out answers)")
    return (f"the merged model's logits differ from the 4-bit base + adapter by {result['rel_error']:.2e} "
            f"(relative), above the {result['limit']:.0e} an exact nf4 float32 merge must meet")
