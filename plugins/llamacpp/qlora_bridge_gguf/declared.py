"""What a GGUF says about itself (Exporter.declares): llama.cpp's metadata keys as api.Declared, and the stop
strings of the Ollama Modelfile beside it."""

from __future__ import annotations

import json
from pathlib import Path

from qlora_bridge.api import BridgeError, Declared


def declares(folder: Path) -> Declared:
    from gguf import GGUFReader

    files = sorted(Path(folder).glob("*.gguf"))
    if len(files) != 1:
        raise BridgeError(f"expected one .gguf file, found {len(files)}", file=folder,
                          fix="pass a folder written by `qlora-bridge export --target gguf`")
    reader = GGUFReader(str(files[0]))

    def value(key: str):
        field = reader.get_field(key)
        return field.contents() if field is not None else None

    arch = value("general.architecture")
    ends = [value(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    tokens = reader.get_field("tokenizer.ggml.tokens")
    modelfile = Path(folder) / "Modelfile"
    stops = tuple(json.loads(line.split(None, 2)[2]) for line in modelfile.read_text().splitlines()
                  if line.startswith("PARAMETER stop ")) if modelfile.is_file() else None
    return Declared(
        bos=value("tokenizer.ggml.bos_token_id"), eos=ends[0], stop=tuple(sorted({i for i in ends if i is not None})),
        pad=value("tokenizer.ggml.padding_token_id"), unk=value("tokenizer.ggml.unknown_token_id"),
        add_bos=value("tokenizer.ggml.add_bos_token"), add_eos=value("tokenizer.ggml.add_eos_token"),
        chat_template=value("tokenizer.chat_template"), stop_strings=stops,
        context_length=value(f"{arch}.context_length"), rope_theta=value(f"{arch}.rope.freq_base"),
        norm_eps=value(f"{arch}.attention.layer_norm_rms_epsilon"), layers=value(f"{arch}.block_count"),
        hidden=value(f"{arch}.embedding_length"), heads=value(f"{arch}.attention.head_count"),
        kv_heads=value(f"{arch}.attention.head_count_kv"), head_dim=value(f"{arch}.attention.key_length"),
        vocab=value(f"{arch}.vocab_size") or (len(tokens.data) if tokens is not None else None),
        adapter_sha256=value("qlora_bridge.adapter_sha256"))
