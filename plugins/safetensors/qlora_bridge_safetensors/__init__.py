"""Built-in exporter `safetensors`: the merged model re-saved in a chosen dtype, sharded.

The reference exporter: it uses only qlora_bridge.api, as an in-house plugin would. It streams tensor by
tensor, reads every shard back, and compares it with the merged weights so a bad write cannot ship.
"""

import json
import shutil
from pathlib import Path

from qlora_bridge.api import (EIGHT_BIT, FLOAT_COPY, BridgeError, CheckFailed, Exporter, ExportRequest, ExportResult,
                              Lineage, ModelShape, Need, folder_logits, hf_declared, hookimpl)

PLUGIN_API = 11  # the plugin API this module was written for
BOUNDS = {"float32": FLOAT_COPY, "float16": FLOAT_COPY, "bfloat16": EIGHT_BIT}  # bfloat16 erases small LoRA deltas
DTYPES = ("float16", "bfloat16", "float32")
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "chat_template.jinja", "tokenizer.model", "vocab.json", "merges.txt",
              "added_tokens.json")


def export(req: ExportRequest) -> ExportResult:
    import torch

    from qlora_bridge.api.safetensors import SafetensorsReader, ShardWriter, model_shards

    try:
        shard_gib = float(req.options.get("max_shard_size", "2"))
    except ValueError:
        raise BridgeError(f"max_shard_size must be a number of GiB, got {req.options['max_shard_size']!r}",
                          field="--option max_shard_size", fix="e.g. --option max_shard_size=4") from None
    dtype = getattr(torch, req.quant)
    shards = model_shards(req.merged)
    readers = {f: SafetensorsReader(f) for f in dict.fromkeys(shards.values())}
    writer = ShardWriter(req.out, int(shard_gib * 2**30))
    for name, f in shards.items():
        info = readers[f].tensors[name]
        writer.plan(name, dtype if info.dtype.is_floating_point else info.dtype, info.shape)
    for name, f in shards.items():
        t = readers[f].read(name)
        writer.write(name, t.to(dtype) if t.is_floating_point() else t)
    weight_map = writer.close()
    (req.out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": writer.bytes_written}, "weight_map": weight_map}, indent=2))
    for name in SIDE_FILES:
        if (req.merged / name).is_file():
            shutil.copy2(req.merged / name, req.out / name)
    config = json.loads((req.out / "config.json").read_text())
    config["dtype"] = req.quant
    (req.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    # read back: every tensor must equal the merged one cast to the target dtype
    worst = 0.0
    out_readers = {f: SafetensorsReader(req.out / f) for f in set(weight_map.values())}
    for name, f in shards.items():
        want = readers[f].read(name)
        got = out_readers[weight_map[name]].read(name)
        if want.is_floating_point():
            if not torch.equal(got, want.to(dtype)):
                raise CheckFailed(f"read-back of {name} differs from the merged weight cast to {req.quant}",
                                  file=req.out, fix="check the disk; nothing was kept")
            denom = torch.linalg.vector_norm(want.float()).item() or 1.0
            worst = max(worst, torch.linalg.vector_norm(got.float() - want.float()).item() / denom)
        elif not torch.equal(got, want):
            raise CheckFailed(f"read-back of {name} differs from the merged tensor", file=req.out,
                              fix="check the disk; nothing was kept")
    checks = {"read_back": "every tensor equals the merged tensor cast to the dtype", "tensors": len(shards),
              "worst_rel_rounding_error": worst}
    merge = Lineage.from_json(req.lineage).merge
    layers = merge.layers if merge else {}
    if layers:  # how much of the LoRA delta this dtype keeps, from the merge report's per-layer figures
        total = sum(v["delta_norm"] for v in layers.values()) or 1.0
        checks["delta_kept"] = sum(v["delta_norm"] * v["delta_kept"][req.quant] for v in layers.values()) / total
    return ExportResult(settings={"dtype": req.quant, "max_shard_size_gib": shard_gib, "shards": len(out_readers)},
                        checks=checks)


# torch and safetensors imported, one tensor read: measured on the tiny model (bench/plan.py)
RUNTIME = 235 * 2**20


def memory(shape: ModelShape, quant: str | None, gpu: bool) -> Need:
    """Streams one tensor at a time. The read-back holds the most: the merged tensor, the exported one, the merged
    one cast for the equality test, and both in float32 for the rounding error with their difference."""
    out = {"float32": 4}.get(quant, 2)
    copies = shape.largest_matrix * (shape.dtype_bytes + 2 * out + 8)
    return Need(host={"runtime": RUNTIME, "one tensor and its copies": copies},
                disk={f"{quant} weights": shape.params * out}, output=shape.params * out)


def recognizes(folder) -> bool:
    """A plain Hugging Face checkpoint: safetensors weights and a config without a quantization method."""
    config = Path(folder) / "config.json"
    return (config.is_file() and any(Path(folder).glob("*.safetensors"))
            and not json.loads(config.read_text()).get("quantization_config"))


@hookimpl
def register_exporters(register):
    register(Exporter(target="safetensors", export=export, format="safetensors", quant_types=DTYPES,
                      logits=folder_logits, bounds=BOUNDS,
                      options={"max_shard_size": "largest shard in GiB (default 2)"}, library="transformers",
                      bits_per_weight=lambda e: {"float32": 32, "float16": 16, "bfloat16": 16}[e["quant"]],
                      memory=memory, recognizes=recognizes, declares=hf_declared,
                      description="the merged model re-saved in float16, bfloat16 or float32, sharded"))
