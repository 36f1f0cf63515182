"""Full-vocabulary logits for token sequences, in batches, of a model in memory or streamed from its files one module
at a time (torch is imported lazily: the public API re-exports these)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from ..malloc import release_freed_memory

if TYPE_CHECKING:
    import torch


def model_logits(model, sequences: list[list[int]], batch_tokens: int = 2048) -> Iterator:
    """Logits [len, vocab] (float32, on the CPU) of a transformers causal LM for each token sequence.

    Consecutive sequences go through together, padded on the right, up to batch_tokens positions a batch: a causal
    model's logits at a position never depend on later ones, so the padding changes nothing but the matmuls' shape
    (~1e-7 relative), and on a CPU three short prompts at once cost about what one does."""
    import torch

    model.eval()
    # a streamed model's parameters wait on the meta device until their module runs (streamed_model)
    device = getattr(model, "stream_device", None) or model.device
    i = 0
    while i < len(sequences):
        batch = [sequences[i]]
        while i + len(batch) < len(sequences) and \
                max(map(len, batch + [sequences[i + len(batch)]])) * (len(batch) + 1) <= batch_tokens:
            batch.append(sequences[i + len(batch)])
        width = max(map(len, batch))
        ids = torch.tensor([s + [0] * (width - len(s)) for s in batch], device=device)
        with torch.no_grad():  # not around the yield: the caller's code must not run under no_grad by surprise
            out = model(ids).logits.float().cpu()
        for row, seq in zip(out, batch):
            yield row[: len(seq)]
        i += len(batch)


def folder_model(folder: Path):
    """A Hugging Face causal-LM folder in float32 for evaluation, as a streamed_model reading its safetensors shards
    one tensor at a time: the merged 8B in float32 is 32 GB, one of its layers 0.9 GB."""
    from ..safetensors_io import SafetensorsReader, model_shards

    shards = model_shards(folder)
    return streamed_model(folder, lambda name: SafetensorsReader(shards[name]).read(name))


def folder_logits(folder: Path, sequences: list[list[int]]) -> Iterator:
    """model_logits of a Hugging Face model folder (folder_model)."""
    yield from model_logits(folder_model(folder), sequences)


def streamed_model(folder: Path, weights):
    """The causal LM that `folder`'s config.json describes, with only one module's weights in memory at a time:
    every decoder layer, the embedding, the final norm and the head get their tensors from weights(name) (the
    checkpoint's parameter name, in float32) just before they run and drop them after, so the peak is one layer,
    the embedding or the head, and the activations, never the model (a 70B read back in float32 would be 280 GB).
    Each forward reads every tensor again: batch many sequences into few forwards (model_logits does). Where a
    CUDA GPU is present the module at work and the activations are on it.

        logits = model_logits(streamed_model(merged, lambda name: reader.get(name).float()), sequences)
    """
    import torch
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    if hasattr(config, "quantization_config"):  # the weights come dequantized
        del config.quantization_config
    with init_empty_weights():  # parameters on the meta device; buffers (rotary frequencies) computed as usual
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where each module runs, in turn
    for owner in model.modules():
        for name, b in list(owner.named_buffers(recurse=False)):
            owner._buffers[name] = b.to(device)
    model.stream_device = device  # for model_logits: the parameters report the meta device
    tied = {}
    if getattr(config, "tie_word_embeddings", False):  # the head reads the embedding's tensor
        names = {id(m): n for n, m in model.named_modules()}
        tied = {f"{names[id(model.get_output_embeddings())]}.weight":
                f"{names[id(model.get_input_embeddings())]}.weight"}
    units = []  # a decoder layer, or a module outside the layers that holds parameters of its own
    for name, module in model.named_modules():
        inside = any(name.startswith(u + ".") for u, _ in units)
        layer = isinstance(model.get_submodule(name.rpartition(".")[0]), torch.nn.ModuleList) if name else False
        if not inside and (layer or any(True for _ in module.parameters(recurse=False))):
            units.append((name, module))

    def hooks(prefix, module):
        params = [f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters()]

        def load(*_):
            for full in params:
                set_module_tensor_to_device(model, full, device, value=weights(tied.get(full, full)).float())

        def drop(*_):
            for full in params:
                set_module_tensor_to_device(model, full, "meta")
            release_freed_memory()
        module.register_forward_pre_hook(load)
        module.register_forward_hook(drop)

    for prefix, module in units:
        hooks(prefix, module)
    return model


def streamed_logits(folder: Path, weights, ids) -> torch.Tensor:
    """Logits [len, vocab] (float32) of one token sequence through streamed_model(folder, weights).

        ref = streamed_logits(merged, lambda name: reader.get(name).float(), ids)
    """
    import torch

    model = streamed_model(folder, weights)
    with torch.no_grad():
        return model(torch.as_tensor(ids, device=model.stream_device).reshape(1, -1)).logits[0].float().cpu()
