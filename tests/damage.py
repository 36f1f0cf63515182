"""Deliberately damaged exports, for showing that the smoke gate fails each one (tests and bench/gate.py).

Each takes a good export folder (written by `qlora-bridge export`), damages it the way an exporter bug would, and
records the damaged files in its manifest, so only the gate's measurements can tell.
"""

import json
import shutil
from pathlib import Path

from qlora_bridge import manifest as mf


def rerecord(folder: Path) -> Path:
    manifest = mf.read(folder)
    manifest["outputs"] = mf.output_files(folder)
    mf.write(folder, manifest)
    return folder


def with_base_weights(gguf_export: Path, base_gguf_export: Path) -> Path:
    """The base model dressed in the fine-tune's lineage: the export of the base, in the fine-tune's folder."""
    gguf = next(gguf_export.glob("*.gguf"))
    shutil.copy(next(base_gguf_export.glob("*.gguf")), gguf)
    return rerecord(gguf_export)


def permute_layer(export: Path, layer: int) -> Path:
    """One decoder layer's attention output and MLP down projections with their output rows shuffled (a layout
    bug of the kind that keeps every shape and dtype valid). GGUF in place; safetensors shards rewritten."""
    import torch

    gen = torch.Generator().manual_seed(layer)
    ggufs = list(export.glob("*.gguf"))
    if ggufs:
        from gguf import GGUFReader

        reader = GGUFReader(str(ggufs[0]), "r+")
        for t in reader.tensors:
            if t.name in (f"blk.{layer}.attn_output.weight", f"blk.{layer}.ffn_down.weight"):
                data = t.data  # rows are output features, for every tensor type (quantized rows are whole blocks)
                perm = torch.randperm(data.shape[0], generator=gen).numpy()
                data[:] = data[perm]
        del reader
        return rerecord(export)
    from safetensors.torch import load_file, save_file

    names = (f"model.layers.{layer}.self_attn.o_proj.weight", f"model.layers.{layer}.mlp.down_proj.weight")
    for shard in export.glob("*.safetensors"):
        tensors = load_file(shard)
        if any(n in tensors for n in names):
            for n in names:
                if n in tensors:
                    tensors[n] = tensors[n][torch.randperm(tensors[n].shape[0], generator=gen)].contiguous()
            save_file(tensors, shard, metadata={"format": "pt"})
    return rerecord(export)


def scale_rope(export: Path, factor: float) -> Path:
    """The rotary base multiplied by `factor` (a wrong rope_theta: short answers survive, long text does not)."""
    ggufs = list(export.glob("*.gguf"))
    if ggufs:
        from gguf import GGUFReader

        reader = GGUFReader(str(ggufs[0]), "r+")
        field = next(f for name, f in reader.fields.items() if name.endswith(".rope.freq_base"))
        field.parts[field.data[0]][0] *= factor
        del reader
        return rerecord(export)
    config = json.loads((export / "config.json").read_text())
    rope = config.get("rope_parameters") or config
    rope["rope_theta"] = rope["rope_theta"] * factor
    (export / "config.json").write_text(json.dumps(config, indent=2))
    return rerecord(export)


def set_gguf_field(export: Path, key: str, value) -> Path:
    """A GGUF metadata value rewritten in place: a number or a bool, or a string of the same length in bytes."""
    from gguf import GGUFReader

    reader = GGUFReader(str(next(export.glob("*.gguf"))), "r+")
    field = reader.get_field(key)
    part = field.parts[field.data[0]]
    if isinstance(value, str):
        data = value.encode()
        assert len(data) == len(part), f"{key}: {len(data)} bytes where the file has {len(part)}"
        part[:] = list(data)
    else:
        part[0] = value
    del reader
    return rerecord(export)


def edit_json(export: Path, name: str, edit) -> Path:
    """One of a Hugging Face folder's JSON files changed by edit(dict) (in place)."""
    path = export / name
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))
    return rerecord(export)
