"""Synthetic checkpoints for the benchmarks: random weights in real model shapes, written tensor by tensor."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

SHAPES = {
    "1.1b": dict(hidden=2048, inter=5632, layers=22, heads=32, kv=4, vocab=32000),
    "7b": dict(hidden=4096, inter=11008, layers=32, heads=32, kv=32, vocab=32000),
    "8b": dict(hidden=4096, inter=14336, layers=32, heads=32, kv=8, vocab=128256),  # Llama-3-8B
}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def linear_shapes(s):
    head = s["hidden"] // s["heads"]
    return {"self_attn.q_proj": (s["hidden"], s["hidden"]), "self_attn.k_proj": (s["kv"] * head, s["hidden"]),
            "self_attn.v_proj": (s["kv"] * head, s["hidden"]), "self_attn.o_proj": (s["hidden"], s["hidden"]),
            "mlp.gate_proj": (s["inter"], s["hidden"]), "mlp.up_proj": (s["inter"], s["hidden"]),
            "mlp.down_proj": (s["hidden"], s["inter"])}


def build(shape: str, root: Path, layers: int | None = None) -> tuple[Path, Path]:
    """Base checkpoint, tokenizer, adapter and training record, written tensor by tensor; `layers` cuts the
    decoder stack (a stage that holds one layer at a time peaks the same on 4 layers as on 32)."""
    import torch
    from transformers import LlamaConfig

    from qlora_bridge.files import digest_folder, write_json
    from qlora_bridge.quant import BLOCKSIZE, state_digest
    from qlora_bridge.safetensors_io import ShardWriter
    from qlora_bridge.tinymodel import build_tokenizer
    from bitsandbytes.functional import quantize_4bit

    s = {**SHAPES[shape], **({"layers": layers} if layers else {})}
    base, adapter = root / f"base-{shape}", root / f"adapter-{shape}"
    if (adapter / "training_record.json").is_file():
        return base, adapter
    shutil.rmtree(root, ignore_errors=True)
    base.mkdir(parents=True)
    adapter.mkdir()
    LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["inter"],
                num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv"],
                tie_word_embeddings=False, dtype="bfloat16", architectures=["LlamaForCausalLM"]).save_pretrained(base)
    build_tokenizer().save_pretrained(base)
    tensors = [("model.embed_tokens.weight", (s["vocab"], s["hidden"]))]
    for i in range(s["layers"]):
        tensors += [(f"model.layers.{i}.{n}.weight", shp) for n, shp in linear_shapes(s).items()]
        tensors += [(f"model.layers.{i}.input_layernorm.weight", (s["hidden"],)),
                    (f"model.layers.{i}.post_attention_layernorm.weight", (s["hidden"],))]
    tensors += [("model.norm.weight", (s["hidden"],)), ("lm_head.weight", (s["vocab"], s["hidden"]))]
    g = torch.Generator().manual_seed(0)
    writer = ShardWriter(base, 2 * 2**30)
    for name, shp in tensors:
        writer.plan(name, torch.bfloat16, shp)
    fingerprint, lora = {}, {}
    for n, (name, shp) in enumerate(tensors):
        w = torch.ones(shp) if len(shp) == 1 else torch.randn(shp, generator=g) * 0.02
        w = w.to(torch.bfloat16)
        writer.write(name, w)
        if any(t in name for t in TARGETS):
            # the training record's fingerprint: what bitsandbytes builds from the fp32-loaded weight
            packed, qs = quantize_4bit(w.float(), blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4")
            fingerprint[name] = {"sha256": state_digest(packed, qs), "shape": list(shp), "source_dtype": "float32",
                                 "blocksize": BLOCKSIZE}
            module = name.removesuffix(".weight")
            lora[f"base_model.model.{module}.lora_A.weight"] = torch.randn(16, shp[1], generator=g) * 0.01
            lora[f"base_model.model.{module}.lora_B.weight"] = torch.randn(shp[0], 16, generator=g) * 0.01
        print(f"\rbuilding {shape}: {n + 1}/{len(tensors)} tensors", end="", file=sys.stderr)
    index = writer.close()
    write_json(base / "model.safetensors.index.json", {"metadata": {}, "weight_map": index})
    print(file=sys.stderr)
    from safetensors.torch import save_file

    save_file(lora, adapter / "adapter_model.safetensors")
    write_json(adapter / "adapter_config.json", {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
        "target_modules": list(TARGETS), "base_model_name_or_path": str(base), "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False})
    from importlib.metadata import version

    write_json(adapter / "training_record.json", {
        "quantization": {"quant_type": "nf4", "double_quant": True, "blocksize": BLOCKSIZE,
                         "compute_dtype": "float32", "fingerprint": {"layers": fingerprint, "sha256": ""}},
        "base": {"path": str(base), "files": digest_folder(base, "*.safetensors") | digest_folder(base, "config.json")},
        "environment": {"libraries": {"bitsandbytes": version("bitsandbytes")}}})
    return base, adapter


def peak_rss_mib() -> float:
    """This process's own high-water mark. (wait4's ru_maxrss would include what the parent held at fork.)"""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


