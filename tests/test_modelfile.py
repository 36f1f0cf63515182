"""The Ollama Modelfile beside a GGUF: its template, rendered by Go's text/template as Ollama renders it, gives the
Hugging Face chat template's prompt exactly; a template it cannot express gets no TEMPLATE, and says why."""

import importlib

import pytest
from conftest import modelfile_fields

from qlora_bridge.host import load_plugins
from qlora_bridge.tinymodel import CHAT_TEMPLATE, SPM_CHAT_TEMPLATE, build_sentencepiece_tokenizer, build_tokenizer

# SmolLM2-Instruct's own template: a system turn of its own when the conversation has none
SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
           "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
           "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
           "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Gemma's shape: the system prompt folded into the first user turn, the assistant called "model"
GEMMA = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set prefix = messages[0]['content'] + '\n\n' %}"
         "{% set loop_messages = messages[1:] %}{% else %}{% set prefix = '' %}{% set loop_messages = messages %}"
         "{% endif %}{% for message in loop_messages %}{% set role = 'model' if message['role'] == 'assistant' "
         "else message['role'] %}{{ '<start_of_turn>' + role + '\n' + (prefix if loop.first else '') "
         "+ message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
# Ollama's own gemma3 template leaves the last answer open; a Jinja template that does the same is not expressible
# by per-role pieces
OPEN_LAST = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] }}"
             "{% if not loop.last %}{{ '<|im_end|>\n' }}{% endif %}{% endfor %}"
             "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

CONVERSATIONS = [
    [{"role": "user", "content": "Phone Ben on Saturday"}],
    [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": "Phone Ben on Saturday"}],
    [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": "Phone Ben"},
     {"role": "assistant", "content": '{"intent": "call"}'}, {"role": "user", "content": "and Aiko?"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
]


@pytest.fixture(scope="module")
def modelfile():
    load_plugins()
    return importlib.import_module("qlora_bridge_gguf.modelfile").modelfile


def tokenizer_with(template: str, sentencepiece: bool = False):
    tok = build_sentencepiece_tokenizer() if sentencepiece else build_tokenizer()
    tok.chat_template = template
    return tok


@pytest.mark.parametrize("template, sentencepiece, shape", [
    (CHAT_TEMPLATE, False, "wrapped"), (SMOLLM2, False, "wrapped"), (GEMMA, True, "folded"),
    (SPM_CHAT_TEMPLATE, True, "wrapped")], ids=["chatml", "smollm2-default-system", "gemma-folded", "spm"])
@pytest.mark.parametrize("system", [None, "Convert the request to JSON."])
def test_ollama_renders_what_hugging_face_renders(modelfile, ollama_render, template, sentencepiece, shape, system):
    tok = tokenizer_with(template, sentencepiece)
    text, info = modelfile("model-Q4_K_M.gguf", tok, system, [])
    fields = modelfile_fields(text)
    assert info["template"] == shape and fields["from"] == "./model-Q4_K_M.gguf" and fields["system"] == system
    # Ollama puts the Modelfile's SYSTEM first where a request has no system message
    expected = [conv if conv[0]["role"] == "system" or not system else [{"role": "system", "content": system}, *conv]
                for conv in CONVERSATIONS]
    bos = tok.bos_token if sentencepiece else ""  # llama.cpp adds it, as the tokenizer does
    for conv, served in zip(expected, ollama_render(fields["template"], system, CONVERSATIONS)):
        assert bos + served == tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)


def test_stops_come_from_the_turn_end_and_generation_config(modelfile):
    tok = tokenizer_with(GEMMA, sentencepiece=True)
    _, info = modelfile("m.gguf", tok, None, ["</s>"])
    assert info["stops"] == ["<end_of_turn>", "</s>"]


# a template that drops the system prompt: Ollama would send the Modelfile's SYSTEM nowhere the model was trained on
NO_SYSTEM = ("{% for message in messages if message['role'] != 'system' %}{{ '<|im_start|>' + message['role'] + '\n' "
             "+ message['content'] + '<|im_end|>\n' }}{% endfor %}"
             "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.mark.parametrize("template", [OPEN_LAST, NO_SYSTEM], ids=["open-last-turn", "no-system"])
def test_a_template_it_cannot_express_gets_no_template_and_says_why(modelfile, template):
    text, info = modelfile("m.gguf", tokenizer_with(template), "Be brief.", [])
    fields = modelfile_fields(text)
    assert fields["template"] is None and info["template"] is None
    assert info["no_template_because"] and f"# no TEMPLATE: {info['no_template_because']}" in text
    assert fields["stops"] == ["<|im_end|>"] and fields["system"] == "Be brief."
