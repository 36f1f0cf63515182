"""Full-vocabulary logits of a model for token sequences, one sequence at a time (torch is imported lazily: the
public API re-exports these)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator


def model_logits(model, sequences: list[list[int]], batch_tokens: int = 2048) -> Iterator:
    """Logits [len, vocab] (float32, on the CPU) of a transformers causal LM for each token sequence.

    Consecutive sequences go through together, padded on the right, up to batch_tokens positions a batch: a causal
    model's logits at a position never depend on later ones, so the padding changes nothing but the matmuls' shape
    (~1e-7 relative), and on a CPU three short prompts at once cost about what one does."""
    import torch

    model.eval()
    i = 0
    while i < len(sequences):
        batch = [sequences[i]]
        while i + len(batch) < len(sequences) and \
                max(map(len, batch + [sequences[i + len(batch)]])) * (len(batch) + 1) <= batch_tokens:
            batch.append(sequences[i + len(batch)])
        width = max(map(len, batch))
        ids = torch.tensor([s + [0] * (width - len(s)) for s in batch], device=model.device)
        with torch.no_grad():  # not around the yield: the caller's code must not run under no_grad by surprise
            out = model(ids).logits.float().cpu()
        for row, seq in zip(out, batch):
            yield row[: len(seq)]
        i += len(batch)


def load_float32(folder: Path):
    """A Hugging Face causal-LM folder, loaded in float32 for evaluation."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=False).eval()


def folder_logits(folder: Path, sequences: list[list[int]]) -> Iterator:
    """model_logits of a Hugging Face model folder, loaded in float32."""
    yield from model_logits(load_float32(folder), sequences)
