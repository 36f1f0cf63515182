"""`train` on the tiny model: each dataset shape, the training record, the NF4 fingerprint, and bad inputs."""

import json

import pytest
from conftest import DEMO, chat, write_jsonl

from qlora_bridge.data import load_heldout
from qlora_bridge.errors import BridgeError
from qlora_bridge.records import TRAINING_RECORD as RECORD
from qlora_bridge.records import read_training_record
from qlora_bridge.stages.train import TrainSettings, train

FAST = dict(steps=2, batch_size=2, max_seq_len=128)


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    return write_jsonl(d / "chat.jsonl", [chat(f"request {i}", f'{{"n": {i}}}') for i in range(6)])


@pytest.mark.parametrize("rows", [
    [{"prompt": f"Q{i}:", "completion": f" A{i}"} for i in range(4)],
    [{"text": f"some plain text number {i}"} for i in range(4)],
], ids=["instruction", "text"])
def test_each_shape_trains(tiny_model, tmp_path, rows):
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    rec = train(tiny_model, data, tmp_path / "ad", TrainSettings(**FAST), progress=False).record
    assert rec.dataset["records"] == 4 and len(rec.loss_curve) == 2


def test_adapter_folder_and_training_record(tiny_model, chat_data, tmp_path):
    from peft import PeftConfig

    res = train(tiny_model, chat_data, tmp_path / "ad", TrainSettings(**FAST, rank=4, alpha=8), progress=False)
    files = {p.name for p in res.adapter.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", RECORD} <= files
    cfg = PeftConfig.from_pretrained(res.adapter)
    assert (cfg.r, cfg.lora_alpha) == (4, 8)
    assert {m.rsplit(".", 1)[-1] for m in cfg.target_modules} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    rec = read_training_record(res.adapter)
    assert rec == res.record  # what train returned is what it wrote
    q = rec.quantization
    assert (q["quant_type"], q["double_quant"], q["blocksize"]) == ("nf4", True, 64)
    assert rec.environment["libraries"]["bitsandbytes"] == "0.50.2"
    assert len(q["fingerprint"]["layers"]) == 2 * 7  # every linear layer of both blocks
    assert set(rec.base["files"]) >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert rec.dataset["shape"] == "chat" and rec.dataset["answer_tokens"] > 0
    assert len(rec.loss_curve) == 2 and rec.peak_rss_mib > 0 and rec.settings["rank"] == 4


def test_fingerprint_is_reproduced_from_the_checkpoint(tiny_model, chat_data, tmp_path):
    """The merge rebuilds NF4 from the base checkpoint; it must match what training quantized, bit for bit."""
    import torch
    from bitsandbytes.functional import quantize_4bit
    from safetensors import safe_open

    from qlora_bridge.quant import state_digest

    rec = train(tiny_model, chat_data, tmp_path / "ad", TrainSettings(**FAST), progress=False).record
    layers = rec.quantization["fingerprint"]["layers"]
    with safe_open(tiny_model / "model.safetensors", "pt") as f:
        for name, fp in layers.items():
            w = f.get_tensor(name).to(getattr(torch, fp["source_dtype"]))
            packed, qs = quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
            assert state_digest(packed, qs) == fp["sha256"], name
    w[0, :64] *= 3  # a different base weight (here one 64-block) must give a different fingerprint
    assert state_digest(*quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")) != fp["sha256"]


def test_plain_lora_baseline_has_no_quantization(tiny_model, chat_data, tmp_path):
    rec = train(tiny_model, chat_data, tmp_path / "ad", TrainSettings(**FAST, quant="none"), progress=False).record
    assert rec.quantization is None and "quantization" not in rec.to_json() and rec.settings["quant"] == "none"


def test_heldout_is_scored_before_and_after(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [chat("ping", "pong")] * 8)
    heldout = write_jsonl(tmp_path / "h.jsonl", [chat("ping", "pong")])
    rec = train(tiny_model, data, tmp_path / "ad", TrainSettings(steps=25, batch_size=4, learning_rate=3e-3),
                heldout_file=heldout, progress=False).record
    assert rec.heldout["path"] == str(heldout)
    assert rec.heldout["before"]["exact_match"] == 0.0  # random weights do not say "pong"
    assert rec.heldout["after"]["exact_match"] == 1.0
    assert rec.loss_curve[-1] < rec.loss_curve[0] / 2


def test_existing_output_is_refused_unless_forced(tiny_model, chat_data, tmp_path):
    out = tmp_path / "ad"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(BridgeError, match="already exists"):
        train(tiny_model, chat_data, out, TrainSettings(**FAST), progress=False)
    assert (out / "keep.txt").exists()
    # --force replaces an adapter folder this tool wrote, never another folder (issue 35)
    with pytest.raises(BridgeError, match="has no training_record.json"):
        train(tiny_model, chat_data, out, TrainSettings(**FAST), force=True, progress=False)
    assert (out / "keep.txt").exists()
    ours = tmp_path / "ours"
    train(tiny_model, chat_data, ours, TrainSettings(**FAST), progress=False)
    (ours / "keep.txt").write_text("x")
    train(tiny_model, chat_data, ours, TrainSettings(**FAST), force=True, progress=False)
    assert not (ours / "keep.txt").exists() and (ours / RECORD).exists()


def test_interrupted_run_leaves_nothing_that_looks_finished(tiny_model, chat_data, tmp_path, monkeypatch):
    import torch

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch.optim.AdamW, "step", boom)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_model, chat_data, tmp_path / "ad", TrainSettings(**FAST), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_base_that_is_not_a_causal_lm(tmp_path, chat_data):
    from transformers import BertConfig, ViTConfig

    BertConfig(architectures=["BertForMaskedLM"]).save_pretrained(tmp_path / "bert")
    with pytest.raises(BridgeError, match=r"architectures \['BertForMaskedLM'\] is not a causal language model"):
        train(tmp_path / "bert", chat_data, tmp_path / "ad", TrainSettings(**FAST), progress=False)
    ViTConfig().save_pretrained(tmp_path / "vit")
    with pytest.raises(BridgeError, match="model_type 'vit' is not a causal language model"):
        train(tmp_path / "vit", chat_data, tmp_path / "ad", TrainSettings(**FAST), progress=False)
    with pytest.raises(BridgeError, match="no config.json"):
        train(tmp_path, chat_data, tmp_path / "ad", TrainSettings(**FAST), progress=False)


def test_pickle_only_and_tokenizerless_bases_are_refused(tiny_model, chat_data, tmp_path):
    import shutil

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(tiny_model / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(BridgeError, match="only pickle files: pytorch_model.bin"):
        train(pickled, chat_data, tmp_path / "ad", TrainSettings(**FAST), progress=False)
    notok = tmp_path / "notok"
    notok.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model / f, notok)
    with pytest.raises(BridgeError, match="no tokenizer"):
        train(notok, chat_data, tmp_path / "ad", TrainSettings(**FAST), progress=False)


@pytest.mark.parametrize("field, value", [("quant", "int3"), ("rank", 0), ("learning_rate", -1.0),
                                          ("schedule", "zigzag"), ("dropout", 1.5)])
def test_bad_settings(field, value):
    with pytest.raises(BridgeError) as e:
        TrainSettings(**{field: value}).validate()
    assert e.value.field.startswith(field.split("_")[0]) and e.value.fix


def test_missing_target_module_is_named(tiny_model, chat_data, tmp_path):
    with pytest.raises(BridgeError) as e:
        train(tiny_model, chat_data, tmp_path / "ad", TrainSettings(**FAST, target_modules=["qkv_fused"]),
              progress=False)
    assert e.value.field == "target_modules" and "qkv_fused" in str(e.value)


def test_demo_dataset_is_well_formed():
    from qlora_bridge import demo

    assert demo.train_file() == DEMO / "train.jsonl"
    train_people = {json.loads(m["messages"][-1]["content"])["person"]
                    for m in map(json.loads, (DEMO / "train.jsonl").read_text().splitlines())}
    held = load_heldout(DEMO / "heldout.jsonl")
    assert len(held) == 200
    # held-out inputs name people training never saw: exact match on them measures a skill, not memory
    assert not {json.loads(h.expected)["person"] for h in held} & train_people
