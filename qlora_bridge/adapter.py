"""A peft LoRA adapter as the merge reads it (its layers and their scales, from adapter_config.json and the
safetensors file; a pickle is never loaded), and the checks that it belongs to a given base."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import BridgeError
from .records import TrainingRecord, read_training_record
from .safetensors_io import SafetensorsReader


@dataclass
class LoraLayer:
    module: str  # e.g. model.layers.0.self_attn.q_proj
    a_key: str
    b_key: str
    scale: float
    fan_in_fan_out: bool


@dataclass
class Adapter:
    path: Path
    config: dict
    layers: dict[str, LoraLayer]  # by base weight key
    reader: SafetensorsReader
    record: TrainingRecord | None


def _pattern(patterns: dict, module: str, default):
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_adapter(path: Path) -> Adapter:
    path = Path(path)
    cfg_file = path / "adapter_config.json"
    if not cfg_file.is_file():
        raise BridgeError("not a peft adapter folder (no adapter_config.json)", file=path,
                          fix="pass the folder written by `qlora-bridge train` (or peft's save_pretrained)")
    cfg = json.loads(cfg_file.read_text())
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        found = [p.name for p in path.glob("adapter_model.bin")]
        raise BridgeError("no adapter_model.safetensors" + (" (only a pickle .bin, which is never loaded)"
                          if found else ""), file=path, fix="re-save the adapter with safetensors")
    if cfg.get("peft_type", "LORA") != "LORA" or cfg.get("use_dora"):
        raise BridgeError(f"only plain LoRA adapters can be merged (this is {cfg.get('peft_type')}"
                          f"{', DoRA' if cfg.get('use_dora') else ''})", file=cfg_file, field="peft_type",
                          fix="train a plain LoRA adapter")
    if cfg.get("modules_to_save"):
        raise BridgeError(f"the adapter also saves whole modules {cfg['modules_to_save']}, which this merge does "
                          "not write", file=cfg_file, field="modules_to_save", fix="train without modules_to_save")
    reader = SafetensorsReader(weights)
    layers = {}
    for key in reader.tensors:
        m = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])(?:\.default)?\.weight", key)
        if not m:
            raise BridgeError(f"unsupported adapter tensor '{key}'", file=weights,
                              fix="only LoRA A/B matrices of linear layers can be merged")
        if m.group(2) == "B":
            continue
        module = m.group(1)
        b_key = key.replace(".lora_A", ".lora_B")
        if b_key not in reader.tensors:
            raise BridgeError(f"'{key}' has no matching lora_B", file=weights, fix="re-save the adapter")
        r = reader.tensors[key].shape[0]
        alpha = _pattern(cfg.get("alpha_pattern"), module, cfg["lora_alpha"])
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        layers[f"{module}.weight"] = LoraLayer(module, key, b_key, scale, bool(cfg.get("fan_in_fan_out")))
    if not layers:
        raise BridgeError("the adapter holds no LoRA layers", file=weights, fix="pass a trained adapter")
    record = read_training_record(path, required=False)
    return Adapter(path, cfg, layers, reader, record)


def check_pairing(base: Path, adapter: Adapter, shards: dict[str, Path], mode: str, ignore_digests: bool,
                  base_files: dict[str, str]) -> None:
    """Refuse an adapter trained on another base, and say which evidence shows it."""
    missing = [k for k in adapter.layers if k not in shards]
    if missing:
        raise BridgeError(f"missing target modules: the base has no {', '.join(missing[:3])}"
                          f"{' …' if len(missing) > 3 else ''} ({len(missing)} of {len(adapter.layers)})",
                          file=base, fix="merge into the base the adapter was trained on")
    readers = {}
    for key, layer in adapter.layers.items():
        reader = readers.setdefault(shards[key], SafetensorsReader(shards[key]))
        out_f, in_f = reader.tensors[key].shape
        a, b = adapter.reader.tensors[layer.a_key].shape, adapter.reader.tensors[layer.b_key].shape
        want = (in_f, out_f) if layer.fan_in_fan_out else (out_f, in_f)
        if (b[0], a[1]) != want:
            raise BridgeError(f"shape mismatch at {key}: the base weight is {list(want)}, the adapter's B·A is "
                              f"{[b[0], a[1]]}", file=base, fix="merge into the base the adapter was trained on")
    record = adapter.record
    if mode == "nf4" and (record is None or record.quantization is None):
        raise BridgeError("--base-weights nf4 needs the NF4 fingerprint from training_record.json, which this "
                          "adapter lacks", file=adapter.path, fix="merge an adapter trained by `qlora-bridge train`, "
                          "or pass --base-weights original (a different model from the one trained)")
    if record and not ignore_digests:
        trained_on = record.base["files"]
        differ = [n for n, d in trained_on.items() if n in base_files and base_files[n] != d]
        gone = [n for n in trained_on if n.endswith(".safetensors") and n not in base_files]
        if differ or gone:
            detail = "; ".join([f"{n}: trained on sha256 {trained_on[n][:12]}…, this base has "
                                f"{base_files[n][:12]}…" for n in differ] + [f"{n} is missing" for n in gone])
            raise BridgeError(f"digest mismatch: this is not the base the adapter was trained on ({detail})",
                              file=base, fix="merge into the base recorded in training_record.json, or pass "
                              "--ignore-base-digests if the weights were only re-saved (nf4 mode still proves them "
                              "by fingerprint)")


def named_bases(adapter: Adapter, base: Path, digests_checked: bool) -> list[str]:
    """Where adapter_config.json names a base other than the training record's (an edited or copied config): said,
    not silently settled. Which weights the adapter was trained on is proven by the record's digests and the NF4
    fingerprint (check_pairing), which refuse a base that differs; the config's name proves nothing."""
    named = adapter.config.get("base_model_name_or_path")
    if not named or adapter.record is None or named == adapter.record.base["path"]:
        return []
    return [f"adapter_config.json names the base {named}, the training record {adapter.record.base['path']}: "
            f"merged into {base}, " + ("whose files match the record's digests" if digests_checked else
                                       "whose digests were not checked (--ignore-base-digests)")
            + "; fix base_model_name_or_path in the config before publishing the adapter"]
