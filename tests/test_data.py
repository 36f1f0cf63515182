"""Dataset shapes, answer-only label masking, and every malformed-input error."""

import json
import re

import pytest

from qlora_bridge.cli import main
from qlora_bridge.data import IGNORE_INDEX, load_dataset, load_heldout
from qlora_bridge.errors import BridgeError
from qlora_bridge.models import load_tokenizer

from conftest import chat, write_jsonl


@pytest.fixture(scope="module")
def tok(tiny_model):
    return load_tokenizer(tiny_model)


def labelled_text(tok, ex) -> str:
    return tok.decode([t for t in ex.labels if t != IGNORE_INDEX])


def test_chat_labels_cover_exactly_the_assistant_turns(tok, tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"},
                      {"role": "assistant", "content": "Hi there"}, {"role": "user", "content": "Again"},
                      {"role": "assistant", "content": "Hello"}]}])
    ds = load_dataset(f, tok, 512)
    assert ds.shape == "chat"
    ex = ds.examples[0]
    # Only the two answers and their end-of-turn markers are trained; a prompt token here would fail this.
    assert labelled_text(tok, ex) == "Hi there<|im_end|>\nHello<|im_end|>\n"
    assert labelled_text(tok, ex).count("Say hi") == 0
    assert len(ex.labels) == len(ex.input_ids)


def test_instruction_labels_cover_the_completion_and_eos(tok, tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q: two plus two?\nA:", "completion": " four"}])
    ex = load_dataset(f, tok, 512).examples[0]
    assert labelled_text(tok, ex) == " four<|im_end|>"
    assert tok.decode(ex.input_ids) == "Q: two plus two?\nA: four<|im_end|>"


def test_text_trains_on_every_token(tok, tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"text": "plain words"}])
    ex = load_dataset(f, tok, 512).examples[0]
    assert ex.labels == ex.input_ids
    assert tok.decode(ex.labels) == "plain words<|im_end|>"


@pytest.mark.parametrize("rows, message", [
    (['{"text": "ok"}', '{"text": "broken"'], "line 2 is not valid JSON"),
    (['["a list"]'], "line 1 is a JSON list, not an object"),
    ([{"promt": "typo", "completion": "x"}], "line 1: the record has keys ['completion', 'promt'], which match no"),
    ([{"text": "a"}, {"prompt": "b", "completion": "c"}], "line 2: the record is instruction data but the file started"),
    ([{"messages": [{"role": "user", "content": "no answer"}]}], "line 1: the conversation has no assistant turn"),
    ([{"messages": [{"role": "robot", "content": "x"}]}], "line 1: message 0 needs a role"),
    ([{"prompt": "", "completion": "x"}], "line 1: 'prompt' must be a non-empty string"),
    ([], "the dataset has no records"),
])
def test_bad_datasets_name_the_file_and_line(tok, tmp_path, rows, message):
    f = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(BridgeError) as e:
        load_dataset(f, tok, 512)
    assert message in str(e.value) and not re.search(r"line \d+: line \d+", str(e.value))  # said once (issue 35)
    assert str(f) in str(e.value) and e.value.fix


def test_a_dataset_that_is_not_utf8_names_the_line(tok, tmp_path, tiny_model, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n{"text": "a\xffb"}\n')
    with pytest.raises(BridgeError, match="not UTF-8 text: byte 0xff on line 2") as e:
        load_dataset(bad, tok, 512)
    assert e.value.file == str(bad) and e.value.field == "line 2" and "iconv" in e.value.fix
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "fine"}])
    for data, heldout in ((bad, good), (good, bad)):
        assert main(["train", "--base", str(tiny_model), "--data", str(data), "--heldout", str(heldout),
                     "--out", str(tmp_path / "out"), "--json"]) == 2
        assert json.loads(capsys.readouterr().out)["file"] == str(bad)
    assert not (tmp_path / "out").exists()


def test_missing_dataset_file(tok, tmp_path):
    with pytest.raises(BridgeError, match="dataset file not found"):
        load_dataset(tmp_path / "nope.jsonl", tok, 512)


def test_a_folder_given_as_data_is_called_a_folder(tmp_path, tiny_model, capsys):
    """Issue 35: `train --data DIR` said "dataset file not found" of a folder that is there."""
    write_jsonl(tmp_path / "tickets.jsonl", [{"text": "a"}])
    for out in ([], ["--out", str(tmp_path / "out")]):  # the project's stage, and a named folder
        assert main(["train", "--base", str(tiny_model), "--data", str(tmp_path), *out, "--json"]) == 2
        err = json.loads(capsys.readouterr().out)
        assert err["problem"].endswith("path is a folder, not a file") and err["file"] == str(tmp_path)
        assert "this folder holds tickets.jsonl" in err["fix"]


def test_a_byte_order_mark_is_accepted(tok, tmp_path):
    """Windows editors write one; it was refused as "not valid JSON" with the generic fix."""
    f = tmp_path / "bom.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + b'{"text": "plain words"}\n')
    assert tok.decode(load_dataset(f, tok, 512).examples[0].labels) == "plain words<|im_end|>"


def test_overlong_record_is_refused_by_default_and_cut_on_request(tok, tmp_path):
    long_answer = "word " * 100
    f = write_jsonl(tmp_path / "d.jsonl", [chat("short", "fine"), chat("q", long_answer), chat("x " * 200, "a")])
    with pytest.raises(BridgeError) as e:
        load_dataset(f, tok, 64)
    assert "line 2 is" in str(e.value) and "--truncate" in e.value.fix
    ds = load_dataset(f, tok, 64, truncate=True)
    assert ds.truncated == [2, 3]
    assert ds.dropped == [3]  # its prompt alone fills 64 tokens, so no answer token is left to learn
    assert [ex.line for ex in ds.examples] == [1, 2]
    assert all(len(ex.input_ids) <= 64 for ex in ds.examples)


def test_heldout_takes_the_last_answer_as_expected(tmp_path):
    f = write_jsonl(tmp_path / "h.jsonl", [chat("q1", "a1", system="s"), {"prompt": "p", "completion": "c"}])
    items = load_heldout(f)
    assert items[0].expected == "a1" and items[0].prompt[-1] == {"role": "user", "content": "q1"}
    assert (items[1].prompt, items[1].expected) == ("p", "c")
    with pytest.raises(BridgeError, match="plain text has none"):
        load_heldout(write_jsonl(tmp_path / "t.jsonl", [{"text": "x"}]))


class AddsBos:
    """The test tokenizer as one that adds a BOS token to plain text (Llama's, Mistral's), which SmolLM2's does not."""

    def __init__(self, tok):
        self.tok, self.bos_token, self.bos_token_id = tok, "<|endoftext|>", tok.convert_tokens_to_ids("<|endoftext|>")

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def __call__(self, text, add_special_tokens=True, **kw):
        enc = self.tok(text, add_special_tokens=False, **kw)
        if add_special_tokens:
            enc["input_ids"] = [self.bos_token_id, *enc["input_ids"]]
        return enc


def test_a_chat_template_that_drops_the_bos_token_is_reported(tok, tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [chat("Say hi", "Hi there")])
    assert load_dataset(f, tok, 512).warnings == []  # no BOS for plain text, none expected in chat
    warnings = load_dataset(f, AddsBos(tok), 512).warnings
    assert len(warnings) == 1 and "does not begin a conversation with <|endoftext|>" in warnings[0]


def test_chat_data_for_a_base_without_a_template_says_how_to_give_it_one(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(tok, "chat_template", None)
    f = write_jsonl(tmp_path / "d.jsonl", [chat("Say hi", "Hi there")])
    with pytest.raises(BridgeError, match="has no chat template") as e:
        load_dataset(f, tok, 512)
    assert "chat_template.jinja" in e.value.fix and "prompt/completion" in e.value.fix
