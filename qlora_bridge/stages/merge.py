"""`qlora-bridge merge`: exact, streaming dequantize-and-merge of a QLoRA adapter.

The adapter was trained against dequant(nf4(W)), not W. With `base_weights="nf4"` (the default) every target weight
is re-quantized with the same bitsandbytes settings, proven identical to what training built (the fingerprint in
`training_record.json`), dequantized, and W' = dequant(nf4(W)) + (alpha/r)·B·A is formed in float32. With
"original", W' = W + (alpha/r)·B·A: what most tools do, and a different model from the one that was trained.

Tensors stream from the base's shards to the output's shards one at a time, so peak memory is a few copies of the
largest tensor, whatever the size of the model. Reading the adapter is adapter.py, the NF4 rebuild quant.py (beside
the fingerprint it must reproduce), the checks against the trained model measure/equivalence.py.
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
from ..adapter import Adapter, LoraLayer, check_pairing, named_bases, read_adapter
from ..errors import BridgeError, CheckFailed
from ..files import check_output, digest_folder, output_folder, sha256_file, write_json, writer_lock
from ..manifest import environment
from ..measure.equivalence import check_failure, equivalence, heldout_comparison
from ..models import check_base, peak_rss_mib
from ..quant import nf4_base_weight, nf4_device
from ..records import MERGE_REPORT, MergeReport, write_merge_report, write_training_record
from ..safetensors_io import SafetensorsReader, ShardWriter, model_shards

MODES = ("nf4", "original")
DTYPES = ("float32", "float16", "bfloat16")
# A delta whose stored form keeps less than this share (by norm) earns a warning: a tenth of the fine-tune gone.
KEPT_WARNING = 0.9
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "model.safetensors.index.json",
                "pytorch_model.bin.index.json")



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
        ours = f.name in ("README.md", "qlora_bridge_source.json")
        if not f.is_file() or any(f.match(p) for p in WEIGHT_FILES) or ours:
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


def stream(base_shards: dict[str, Path], adapter: Adapter, out: Path, *, base_weights: str, dtype: str,
           quant: dict | None, device: str, inexact_nf4: bool, max_shard_bytes: int, progress: bool) -> Streamed:
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
    return Streamed(layers, bytes_read, writer.bytes_written, writer.digests,
                    {k: round(v, 2) for k, v in seconds.items()}, peak_rss_mib(),
                    sum(4 * math.prod(r.tensors[n].shape) for n, r in order))


def recorded_inputs(adapter_dir: Path, base: str | None, heldout: str | None,
                    use_heldout: bool = True) -> tuple[Path, Path | None]:
    """The base and held-out file a merge of this adapter uses where none is given: those its training record
    names (the recorded base where that folder still exists, else the embedded default)."""
    from ..default_model import resolve_base

    record = read_adapter(adapter_dir).record
    recorded = record.base_path if record else None
    chosen = Path(base) if base else (recorded if recorded and recorded.is_dir() else resolve_base(None))
    if use_heldout and not heldout and record:
        heldout = record.heldout.get("path")
    return chosen, Path(heldout) if use_heldout and heldout else None


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
        result = equivalence(check, base, adapter, tmp, streamed.layers, streamed.fp32_bytes, base_weights, dtype)
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
