"""Hugging Face model folders as the stages use them: checking a base, loading its tokenizer and its 4-bit model
(train trains it, merge rebuilds it to check against), and the peak memory each stage reports."""

from __future__ import annotations

import os
import resource
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import BridgeError
from .quant import QuantSettings, disable_cpu_packed_layout
from .train_settings import TrainSettings

if TYPE_CHECKING:
    from .records import TrainingRecord


def check_base(base: Path) -> None:
    """A base must be a Hugging Face causal-LM folder with safetensors weights and a tokenizer."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if not (base / "config.json").is_file():
        raise BridgeError("not a Hugging Face model folder (no config.json)", file=base,
                          fix="pass the folder that holds config.json, the safetensors weights and the tokenizer")
    config = AutoConfig.from_pretrained(base, trust_remote_code=False)
    archs = config.architectures or []
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or (
            archs and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)):
        what = f"architectures {archs}" if archs else f"model_type '{config.model_type}'"
        raise BridgeError(f"{what} is not a causal language model", file=base / "config.json",
                          field="architectures" if archs else "model_type",
                          fix="pass a decoder-only (causal LM) model such as Llama, Qwen or Gemma")
    if not any(base.glob("*.safetensors")):
        pickles = [p.name for p in base.glob("*.bin")]
        raise BridgeError("no safetensors weights" + (f" (only pickle files: {', '.join(pickles)})" if pickles else ""),
                          file=base, fix="convert the checkpoint to safetensors; pickle checkpoints are never loaded")
    if not any((base / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        raise BridgeError("the model folder has no tokenizer (tokenizer.json or tokenizer.model)", file=base,
                          fix="save the tokenizer into the model folder (tokenizer.save_pretrained)")


def load_tokenizer(base: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base, trust_remote_code=False)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(base: Path, s: TrainSettings):
    """The base model, quantized to 4 bits unless `quant` is 'none', with the CPU packed layout disabled."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": torch.float32, "trust_remote_code": False}
    if s.quant != "none":
        fsdp = s.strategy == "fsdp" and s.processes > 1
        kwargs["quantization_config"] = QuantSettings(s.quant, s.double_quant, s.compute_dtype,
                                                      "float32" if fsdp else "uint8").to_bnb_config()
        if not fsdp:  # FSDP places the shards itself; with DDP each process holds the whole model on its own GPU
            kwargs["device_map"] = ({"": int(os.environ.get("LOCAL_RANK", 0))} if torch.cuda.is_available()
                                    else {"": "cpu"})
    model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    if s.quant != "none":
        disable_cpu_packed_layout(model)
    return model


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def trained_model(base: Path, adapter_dir: Path, record: TrainingRecord | None):
    """The model that was trained: the 4-bit base + the adapter, computing in float32 so that comparisons with it
    measure the merge or the export, not bf16 matmul noise."""
    from peft import PeftModel

    quant = (record.quantization if record else None) or {"quant_type": "nf4", "double_quant": True}
    settings = TrainSettings(quant=quant["quant_type"], double_quant=quant["double_quant"], compute_dtype="float32")
    return PeftModel.from_pretrained(load_model(base, settings), adapter_dir).eval()
