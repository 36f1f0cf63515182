"""Hugging Face folder -> GGUF (F32, F16 or BF16), tensor by tensor, on the `gguf` package's writer.

Supported: the Llama family (Llama 2/3, Mistral, SmolLM2), Qwen2, Qwen3 and Gemma 3 text models. Each entry of
ARCHS says how its tensors differ from the checkpoint's: Llama's q/k rows are permuted for llama.cpp's rotary
layout, Gemma 3's RMSNorm weights are stored as 1 + w.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qlora_bridge.api import BridgeError


@dataclass(frozen=True)
class Arch:
    gguf_arch: str  # gguf.MODEL_ARCH member name
    permute_qk: bool = False  # HF rotate-half layout -> llama.cpp's interleaved layout
    norm_shift: float = 0.0  # added to every *norm.weight (Gemma's RMSNorm multiplies by 1 + w)


ARCHS = {
    "LlamaForCausalLM": Arch("LLAMA", permute_qk=True),
    "MistralForCausalLM": Arch("LLAMA", permute_qk=True),
    "Qwen2ForCausalLM": Arch("QWEN2"),
    "Qwen3ForCausalLM": Arch("QWEN3"),
    "Gemma3ForCausalLM": Arch("GEMMA3", norm_shift=1.0),
}


def architecture(config: dict, config_path: Path) -> tuple[str, Arch]:
    names = config.get("architectures") or []
    for name in names:
        if name in ARCHS:
            return name, ARCHS[name]
    raise BridgeError(f"architecture {names or config.get('model_type')} is not supported by the GGUF exporter",
                      file=config_path, field="architectures",
                      fix=f"supported: {', '.join(sorted(ARCHS))} (open an issue, or write an exporter plugin)")


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: rows of each head from [first half | second half] to interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_theta(config: dict) -> float | None:
    params = config.get("rope_parameters") or {}
    params = params.get("full_attention", params)
    return params.get("rope_theta", config.get("rope_theta"))


def llama3_rope_factors(config: dict) -> np.ndarray | None:
    """The rope_freqs tensor llama.cpp needs for Llama 3.1-style rope scaling (same formula as its converter)."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if str(params.get("rope_type", "")).lower() != "llama3":
        return None
    base = params.get("rope_theta", config.get("rope_theta", 10000.0))
    dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, low = params.get("factor", 8.0), params.get("low_freq_factor", 1.0)
    high = params.get("high_freq_factor", 4.0)
    old_ctx = params.get("original_max_position_embeddings", 8192)
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def add_hparams(writer, config: dict, arch: Arch, hf_arch: str, file_type: int) -> None:
    n_head = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config.get("max_position_embeddings", 4096))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(config.get("num_key_value_heads", n_head))
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    if (theta := rope_theta(config)) is not None:
        writer.add_rope_freq_base(theta)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_file_type(file_type)
    if arch.gguf_arch == "LLAMA":
        writer.add_vocab_size(config["vocab_size"])
        writer.add_rope_dimension_count(head_dim)
    if arch.gguf_arch == "GEMMA3":
        if (swa_theta := (config.get("rope_parameters") or {}).get("sliding_attention", {}).get("rope_theta")):
            writer.add_rope_freq_base_swa(swa_theta)
        if config.get("final_logit_softcapping"):
            writer.add_final_logit_softcapping(config["final_logit_softcapping"])
        if config.get("sliding_window_pattern") != 1 and config.get("sliding_window"):
            writer.add_sliding_window(config["sliding_window"])


def plan_tensors(folder: Path, config: dict, arch: Arch):
    """(gguf name, hf name, transform) for every tensor, in checkpoint order."""
    import gguf

    from qlora_bridge.api.safetensors import model_shards

    tmap = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.gguf_arch), config["num_hidden_layers"])
    n_head = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads", n_head)
    plan = []
    for hf_name in model_shards(folder):
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue  # recomputed by llama.cpp
        name = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise BridgeError(f"no GGUF name for tensor '{hf_name}' of a {arch.gguf_arch.lower()} model",
                              file=folder, fix="this checkpoint has tensors the GGUF exporter does not know")
        def transform(w, hf_name=hf_name):
            if arch.permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                w = permute(w, n_head)
            elif arch.permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                w = permute(w, n_kv)
            if arch.norm_shift and hf_name.endswith("norm.weight"):
                w = w + arch.norm_shift
            return w
        plan.append((name, hf_name, transform))
    return plan


def convert(folder: Path, out_file: Path, outtype: str, *, vocab, tokenizer_pre: str, metadata: dict,
            progress=None) -> dict:
    """Write `out_file` and return {'tensors': n, 'arch': ...}. Peak memory: one tensor at a time, since the header
    (metadata, vocabulary, every tensor's name, shape and type) is written first, then each tensor in turn."""
    import gguf

    from qlora_bridge.api.safetensors import SafetensorsReader, model_shards

    from .vocab import add_vocab

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    hf_arch, arch = architecture(config, folder / "config.json")
    writer = gguf.GGUFWriter(out_file, gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, arch.gguf_arch)])
    add_metadata(writer, folder, config, arch, hf_arch, outtype, metadata)
    add_vocab(writer, vocab, tokenizer_pre)
    shards = model_shards(folder)
    readers = {f: SafetensorsReader(f) for f in dict.fromkeys(shards.values())}
    plan = plan_tensors(folder, config, arch)
    extra = llama3_rope_factors(config) if arch.gguf_arch == "LLAMA" else None
    qtype = getattr(gguf.GGMLQuantizationType, outtype)

    def target(name: str, ndim: int):
        # llama.cpp's rule: 1-D tensors and norms stay F32
        return gguf.GGMLQuantizationType.F32 if ndim <= 1 or name.endswith("_norm.weight") else qtype

    for name, hf_name, _ in plan:
        shape = readers[shards[hf_name]].tensors[hf_name].shape
        add_tensor_info(writer, name, shape, target(name, len(shape)))
    if extra is not None:
        writer.add_tensor_info("rope_freqs.weight", extra.shape, np.dtype(np.float32), extra.nbytes)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name, hf_name, transform in plan:
        w = transform(readers[shards[hf_name]].read(hf_name).float().numpy())
        writer.write_tensor_data(encode(w, target(name, w.ndim)))
        if progress:
            progress(1)
    if extra is not None:
        writer.write_tensor_data(extra)
    writer.close()
    return {"arch": hf_arch, "gguf_arch": arch.gguf_arch.lower(), "tensors": len(plan) + (extra is not None),
            "outtype": outtype}


def add_metadata(writer, folder: Path, config: dict, arch, hf_arch: str, outtype: str, metadata: dict) -> None:
    """The file's type and name, our lineage keys, and the architecture's hyperparameters."""
    import gguf

    file_type = {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
                 "BF16": gguf.LlamaFileType.MOSTLY_BF16}[outtype]
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(metadata.get("name") or folder.name)
    for key, value in metadata.items():
        if key != "name" and value is not None:
            writer.add_string(key, str(value))
    add_hparams(writer, config, arch, hf_arch, file_type)


def add_tensor_info(writer, name: str, shape, t) -> None:
    import gguf

    n = math.prod(shape)
    if t == gguf.GGMLQuantizationType.BF16:  # written as raw bytes: two per element
        writer.add_tensor_info(name, (*shape[:-1], shape[-1] * 2), np.dtype(np.uint8), 2 * n, raw_dtype=t)
    elif t == gguf.GGMLQuantizationType.F16:
        writer.add_tensor_info(name, shape, np.dtype(np.float16), 2 * n)
    else:
        writer.add_tensor_info(name, shape, np.dtype(np.float32), 4 * n)


def encode(w: np.ndarray, t) -> np.ndarray:
    import gguf

    if t == gguf.GGMLQuantizationType.F32:
        return w.astype(np.float32)
    if t == gguf.GGMLQuantizationType.F16:
        return w.astype(np.float16)
    return gguf.quants.quantize(w.astype(np.float32), t)
