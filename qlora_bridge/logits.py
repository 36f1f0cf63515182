"""Full-vocabulary logits of a model for token sequences, one sequence at a time (torch is imported lazily: the
public API re-exports these)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator


def model_logits(model, sequences: list[list[int]]) -> Iterator:
    """Logits [len, vocab] (float32, on the CPU) of a transformers causal LM for each token sequence."""
    import torch

    model.eval()
    for ids in sequences:
        with torch.no_grad():  # not around the yield: the caller's code must not run under no_grad by surprise
            out = model(torch.tensor([ids], device=model.device)).logits[0].float().cpu()
        yield out


def folder_logits(folder: Path, sequences: list[list[int]]) -> Iterator:
    """model_logits of a Hugging Face model folder, loaded in float32."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=False)
    yield from model_logits(model, sequences)
