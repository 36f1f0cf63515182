"""The GGUF exporter: logits parity per architecture, tokenizer parity, quantization read-back, lineage."""

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import FULL_PARITY, modelfile_fields

from qlora_bridge.errors import BridgeError, CheckFailed
from qlora_bridge.stages.export import export
from qlora_bridge.host import load_plugins
from qlora_bridge.tinymodel import build_tiny_model

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is the GGUF extra: pip install '.[gguf]'")


@pytest.fixture(scope="module")
def registry():
    return load_plugins()


def hf_and_gguf_logits(folder, gguf_path, text="def add(a, b):\n    return a + b  # The quick brown fox 42"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(folder)(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(torch.tensor([ids])).logits[0].numpy()
    model = llama_cpp.Llama(str(gguf_path), logits_all=True, verbose=False, type_k=0, type_v=0)  # F32 KV cache
    model.eval(ids)
    got = np.array(model.scores[: len(ids)])
    model.close()
    return np.linalg.norm(got - ref) / np.linalg.norm(ref)


def declared_differences(registry, folder, base) -> list[dict]:
    """What the smoke gate's `declarations` check finds between the GGUF's metadata and the model it came from."""
    from transformers import AutoTokenizer

    from qlora_bridge.api import differences, hf_declared

    exporter, _ = registry.exporter("gguf")
    return differences(exporter.declares(folder), hf_declared(base), AutoTokenizer.from_pretrained(base))


# float32 end to end: only summation order differs (~5e-7 measured). Gemma 3 is looser: ggml evaluates GELU
# through a float16 lookup table (2.7e-4 measured); a missing norm shift or rotary permutation gives errors ~1.
@pytest.mark.parametrize("arch, limit", [("llama", 1e-5), ("qwen2", 1e-5), ("qwen3", 1e-5), ("gemma3", 1e-3)])
def test_f32_conversion_matches_transformers(registry, tmp_path, arch, limit):
    base = build_tiny_model(tmp_path / arch, arch=arch)
    manifest = export(registry, "gguf", base, tmp_path / "gguf", quant="F32", progress=False)
    assert manifest["export"]["settings"]["gguf_arch"] == arch
    assert hf_and_gguf_logits(base, tmp_path / "gguf" / "model-F32.gguf") < limit
    assert declared_differences(registry, tmp_path / "gguf", base) == []


# SentencePiece-style vocabularies (byte fallback, "▁" for spaces): Llama 2's prefix space and Gemma's none. Before
# the token scores were written from the merge ranks, llama.cpp merged in arbitrary order (Gemma 3: 0 of 24 lines).
@pytest.mark.parametrize("tokenizer", ["sentencepiece", "sentencepiece-no-prefix"])
def test_sentencepiece_vocabularies_export_with_full_parity(registry, tmp_path, tokenizer):
    from gguf import GGUFReader

    base = build_tiny_model(tmp_path / tokenizer, tokenizer=tokenizer)
    manifest = export(registry, "gguf", base, tmp_path / "g", quant="F32", progress=False)
    checks = manifest["export"]["checks"]
    assert checks["tokenizer_parity"] == FULL_PARITY and checks["pre_tokenizer"]["tokenizer_model"] == "llama"
    assert checks["chat_template_carried"] is True
    reader = GGUFReader(str(tmp_path / "g" / "model-F32.gguf"))
    assert reader.get_field("tokenizer.ggml.add_space_prefix").contents() is (tokenizer == "sentencepiece")
    assert reader.get_field("tokenizer.ggml.add_bos_token").contents() is True
    assert hf_and_gguf_logits(base, tmp_path / "g" / "model-F32.gguf") < 1e-5
    assert declared_differences(registry, tmp_path / "g", base) == []


@pytest.mark.slow
def test_a_real_sentencepiece_model_exports_with_full_parity(registry, gemma3_base, tmp_path):
    """Gemma 3 270M: a byte-fallback BPE with "▁" for spaces and no prefix space, 262k tokens."""
    manifest = export(registry, "gguf", gemma3_base, tmp_path / "g", quant="F16", progress=False)
    checks = manifest["export"]["checks"]
    assert checks["tokenizer_parity"] == FULL_PARITY and checks["pre_tokenizer"]["tokenizer_model"] == "llama"
    # float16 weights against the float32 model: 2.2e-3 measured; a broken conversion reads ~1
    assert hf_and_gguf_logits(gemma3_base, tmp_path / "g" / "model-F16.gguf") < 1e-2
    assert declared_differences(registry, tmp_path / "g", gemma3_base) == []  # its stop ids, template, head size
    # Q4_K_M: the 262k x 640 embedding (64% of the weights) takes the output's type and falls back to Q8_0, as in
    # upstream's own Q4_K_M of this model; the decoder layers are what must be 4-bit in substance
    q = export(registry, "gguf", gemma3_base, tmp_path / "q", quant="Q4_K_M", progress=False)["export"]["checks"]
    assert q["quantization"]["bpw_matrices"] > 4.85 * 1.35 > q["quantization"]["bpw_layers"]


def test_export_records_parity_quantization_and_lineage(registry, tiny_merged, tmp_path):
    from gguf import GGUFReader

    manifest = export(registry, "gguf", tiny_merged, tmp_path / "q", quant="Q4_K_M", progress=False)
    checks = manifest["export"]["checks"]
    assert checks["tokenizer_parity"] == FULL_PARITY and checks["pre_tokenizer"]["pre"] == "gpt-2"
    q = checks["quantization"]
    assert q["fallback_count"] == 0 and set(q["tensor_types"]) == {"F32", "Q4_K", "Q6_K"}
    assert 4.5 < q["bpw_matrices"] < 5.5
    assert checks["chat_template_carried"] is True
    modelfile = modelfile_fields((tmp_path / "q" / "Modelfile").read_text())
    assert modelfile["from"] == "./model-Q4_K_M.gguf" and modelfile["stops"] == ["<|im_end|>"]
    assert checks["modelfile"]["template"] == "wrapped" and modelfile["template"]
    reader = GGUFReader(str(tmp_path / "q" / "model-Q4_K_M.gguf"))
    assert reader.get_field("qlora_bridge.merge_base_weights").contents() == "nf4"
    adapter = manifest["inputs"]["adapter"]["sha256"]
    assert reader.get_field("qlora_bridge.adapter_sha256").contents() == adapter
    assert not (tmp_path / "q" / "intermediate-F16.gguf").exists()


def test_a_wrong_pre_tokenizer_is_refused(registry, tiny_merged, tmp_path):
    with pytest.raises(CheckFailed) as e:
        export(registry, "gguf", tiny_merged, tmp_path / "g", quant="F16", options={"pre_tokenizer": "llama-bpe"},
               progress=False)
    assert "no llama.cpp pre-tokenizer reproduces this tokenizer" in str(e.value) and "llama-bpe" in str(e.value)
    assert not (tmp_path / "g").exists()


def test_k_quant_fallbacks_are_reported(registry, tmp_path, capfd):
    # 320 is a multiple of 32 but not of 256: k-quant rows fall back to q5_0/q8_0, still ~5-6 bits
    base = build_tiny_model(tmp_path / "w320", hidden=320, intermediate=832)
    settings = export(registry, "gguf", base, tmp_path / "g", quant="Q4_K_M", progress=False)["export"]
    q = settings["checks"]["quantization"]
    assert q["fallback_count"] > 0 and all(t in ("Q5_0", "Q8_0", "Q6_K") for t in q["fallbacks"].values())
    # llama.cpp's line per fallback goes to the log beside the folder, not between the tool's own lines
    log = (tmp_path / "g.export.log").read_text()
    assert log.count("falling back") > 0 and "tensor(s) required fallback quantization" in log
    assert "falling back" not in capfd.readouterr().err
    # a model with no training record in its lineage: the importance matrix comes from general text, and says so
    imx = settings["settings"]["importance_matrix"]
    assert imx["calibration"]["source"] == "general text only: the merge's lineage names no training data"


def test_a_result_that_is_not_the_requested_quantization_fails(registry, tmp_path):
    # 200 is not a multiple of 32: llama.cpp keeps every matrix in F16 and still returns success
    base = build_tiny_model(tmp_path / "w200", hidden=200, intermediate=520, heads=2)
    with pytest.raises(CheckFailed, match=r"not Q8_0 in substance: its decoder layers average 1\d\.\d\d bits"):
        export(registry, "gguf", base, tmp_path / "g", quant="Q8_0", progress=False)
    assert not (tmp_path / "g").exists()


def test_unsupported_architecture_names_the_supported_ones(registry, tiny_merged, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_merged, other)
    config = json.loads((other / "config.json").read_text())
    config["architectures"] = ["GPTNeoXForCausalLM"]
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(BridgeError, match="(?s)not supported by the GGUF exporter.*supported: Gemma3ForCausalLM"):
        export(registry, "gguf", other, tmp_path / "g", quant="F16", progress=False)


def imatrix_metadata(path) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return {f.name: f.contents() for f in reader.fields.values() if f.name.startswith("quantize.imatrix.")}


def imx_entries(folder) -> int:
    """Matrices llama-imatrix collects: each layer's q, k, v, o, gate, up and down (not the output matrix)."""
    return 7 * json.loads((folder / "config.json").read_text())["num_hidden_layers"]


def test_k_quants_use_an_importance_matrix_of_the_training_data(registry, tiny_merged, tmp_path):
    on = export(registry, "gguf", tiny_merged, tmp_path / "on", quant="Q4_K_M", progress=False)
    imx = on["export"]["settings"]["importance_matrix"]
    data = on["inputs"]["training_record"]["dataset"]
    # the data the adapter was trained on (by digest), then general text; llama-imatrix read all of it
    assert imx["calibration"]["source"] == "the fine-tune's training data"
    assert imx["calibration"]["sha256"] == data["sha256"] and imx["calibration"]["general_text"]["tokens"] > 0
    total = imx["calibration"]["tokens"] + imx["calibration"]["general_text"]["tokens"]
    # llama-imatrix tokenizes the text again and drops the last partial chunk (a cut word may tokenize differently)
    assert imx["chunk_tokens"] == 512 and total // 512 - 1 <= imx["chunks"] <= total // 512
    # every layer matrix took it
    assert imx["matrices"] == imx["entries_applied"] == imx_entries(tiny_merged)
    assert imatrix_metadata(tmp_path / "on" / "model-Q4_K_M.gguf")["quantize.imatrix.chunks_count"] == imx["chunks"]
    off = export(registry, "gguf", tiny_merged, tmp_path / "off", quant="Q4_K_M", options={"imatrix": "off"},
                 progress=False)
    # the matrix and its text were working files, like the F16 intermediate
    assert sorted(p.name for p in (tmp_path / "on").iterdir()) == sorted(p.name for p in (tmp_path / "off").iterdir())
    assert off["export"]["settings"]["importance_matrix"] is None
    assert imatrix_metadata(tmp_path / "off" / "model-Q4_K_M.gguf") == {}
    # the same types, rounded differently
    assert off["export"]["checks"]["quantization"]["tensor_types"] == on["export"]["checks"]["quantization"]["tensor_types"]
    assert (tmp_path / "on" / "model-Q4_K_M.gguf").read_bytes() != (tmp_path / "off" / "model-Q4_K_M.gguf").read_bytes()


def test_a_users_importance_matrix_is_used_as_given(registry, tiny_merged, tmp_path):
    import subprocess

    from qlora_bridge_gguf.tools import TARGETS, tools
    from qlora_bridge_llamacpp.build import amx_instructions

    bin_dir, _ = tools(None, progress=False)
    if shutil.which("objdump"):  # built with the library's flags: no AMX kernel (llamacpp_build)
        assert all(amx_instructions(bin_dir / t) == [] for t in TARGETS)
    export(registry, "gguf", tiny_merged, tmp_path / "f16", quant="F16", progress=False)
    (tmp_path / "text.txt").write_text("def f(x):\n    return x * 2  # the quick brown fox\n" * 200)
    subprocess.run([bin_dir / "llama-imatrix", "-m", tmp_path / "f16" / "model-F16.gguf", "-f", tmp_path / "text.txt",
                    "-o", tmp_path / "mine.gguf", "--no-ppl", "-c", "128"], check=True, capture_output=True)
    manifest = export(registry, "gguf", tiny_merged, tmp_path / "q", quant="Q4_K_S",
                      options={"imatrix": str(tmp_path / "mine.gguf")}, progress=False)
    imx = manifest["export"]["settings"]["importance_matrix"]
    assert imx["source"] == "file" and imx["entries_applied"] == imx_entries(tiny_merged)
    assert imx["sha256"] == hashlib.sha256((tmp_path / "mine.gguf").read_bytes()).hexdigest()
    assert imatrix_metadata(tmp_path / "q" / "model-Q4_K_S.gguf")["quantize.imatrix.file"] == str(tmp_path / "mine.gguf")


@pytest.mark.parametrize("quant, options, message", [
    ("Q4_K_M", {"imatrix": "missing.gguf"}, "importance matrix file not found"),
    ("Q8_0", {"imatrix": "on"}, "Q8_0 does not use an importance matrix"),
    ("Q4_K_M", {"text_tokens": "many"}, "text_tokens must be an integer"),
    # 16 short records: ~300 tokens, under llama-imatrix's two 512-token chunks once the general text is left out
    ("Q4_K_M", {"text_tokens": "0"}, "llama-imatrix needs at least 1024"),
])
def test_bad_importance_matrix_settings_are_refused(registry, tiny_merged, tmp_path, quant, options, message):
    with pytest.raises(BridgeError, match=message) as e:
        export(registry, "gguf", tiny_merged, tmp_path / "g", quant=quant, options=options, progress=False)
    assert e.value.exit_code == 2 and e.value.field.startswith("--option") and not (tmp_path / "g").exists()


def test_llama_cpp_sources_must_be_llama_cpp_pythons(tmp_path):
    import tarfile

    from qlora_bridge_gguf.tools import unpack

    (tmp_path / "x.txt").write_text("x")
    with tarfile.open(tmp_path / "other.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "x.txt", arcname="pkg-1.0/x.txt")
    for sdist, message in ((tmp_path / "absent.tar.gz", "source distribution not found"),
                           (tmp_path / "other.tar.gz", "no vendor/llama.cpp in this archive")):
        with pytest.raises(BridgeError, match=message) as e:
            unpack(sdist, tmp_path / "src")
        assert e.value.field == "--option llama_cpp_sdist"
