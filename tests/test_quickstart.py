"""The README's main job on the real embedded model: train, merge exactly, export GGUF, pass the smoke gate."""

import json

import pytest
from conftest import FULL_PARITY, modelfile_fields

from qlora_bridge.cli import main

pytestmark = pytest.mark.slow


def test_demo_training_raises_heldout_exact_match(demo_adapter):
    record = json.loads((demo_adapter / "training_record.json").read_text())
    before = record["heldout"]["before"]["exact_match"]
    after = record["heldout"]["after"]["exact_match"]
    # Measured 0% -> 58.5% on 200 held-out prompts; the base model never produces the house JSON shape. The bar
    # leaves room for run-to-run noise from thread scheduling while still failing a run that learned nothing.
    assert before <= 0.05
    assert after >= 0.4


def test_embedded_model_merge_is_exact_and_answers_like_the_adapter(demo_merged):
    report = json.loads((demo_merged / "merge_report.json").read_text())
    assert report["check"]["method"] == "full-model logits" and report["check"]["rel_error"] <= 1e-4
    assert report["check"]["adapter_effect"] > 1e-3
    h = report["heldout"]
    # greedy answers of two models whose logits agree to ~1e-6 are the same token for token
    assert h["compared"] == 200 and h["agree_with_adapter"] == 200


# Only Q4_K_M, the lowest-bit type that must pass, for time (each type costs ~3 minutes on 2 cores and the suite must
# stay under 40): F16 and Q8_0 are closer to the merged model on every instrument (docs/gguf-and-the-gate.md, the
# gate's figures), and a float copy passing the gate is tested on the tiny model (test_smoke.py) and on vLLM
# (test_vllm.py)
@pytest.mark.parametrize("quant", ["Q4_K_M"])
def test_gguf_exports_pass_the_smoke_gate(demo_merged, quant, capsys, ollama_render):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is the GGUF extra: pip install '.[gguf]'")
    from transformers import AutoTokenizer

    out = demo_merged.parent / f"gguf-{quant}"
    assert main(["export", "--target", "gguf", "--quant", quant, "--merged", str(demo_merged), "--out", str(out)]) == 0
    # the Modelfile: Ollama's prompt for every golden prompt (with its system prompt, and without it, when the
    # Modelfile's SYSTEM stands in) is the Hugging Face template's, token for token through the GGUF's tokenizer
    fields = modelfile_fields((out / "Modelfile").read_text())
    prompts = [a["prompt"] for a in json.loads((demo_merged / "merge_report.json").read_text())["heldout"]["answers"]]
    assert fields["system"] == prompts[0][0]["content"] and fields["stops"] == ["<|im_end|>"]
    tok = AutoTokenizer.from_pretrained(demo_merged)
    vocab = llama_cpp.Llama(str(out / f"model-{quant}.gguf"), vocab_only=True, verbose=False)
    for asked in (prompts, [p[1:] for p in prompts]):
        for prompt, served in zip(prompts, ollama_render(fields["template"], fields["system"], asked)):
            assert vocab.tokenize(served.encode(), add_bos=True, special=True) == tok.apply_chat_template(
                prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    vocab.close()
    capsys.readouterr()
    code = main(["smoke", str(out), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["passed"], json.dumps(result["checks"], indent=1)[:3000]
    assert result["checks"]["tokenization"]["parity"] == FULL_PARITY
    # quantized with the importance matrix of the demo's own training data, which moves general text less: mean KL
    # on the reference text 0.044 with it, 0.059 without (bench/imatrix.py; paired ratio 0.75 [0.72, 0.77]).
    # The bound is halfway: a matrix that was not applied, or computed on the wrong model, reads ~0.059
    settings = json.loads((out / "manifest.json").read_text())["export"]["settings"]
    assert settings["importance_matrix"]["calibration"]["source"] == "the fine-tune's training data"
    assert result["checks"]["divergence"]["kl_text"] < 0.0515
