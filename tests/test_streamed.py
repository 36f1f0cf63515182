"""A forward pass with one module's weights in memory at a time (measure.logits.streamed_logits): the same logits as
the whole model, and never more than one decoder layer's tensors alive."""

import json
import shutil
import weakref

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from qlora_bridge.api import streamed_logits

IDS = [5, 17, 300, 42, 7, 999, 64, 128, 3, 11]


def reader(folder):
    files = {k: f for f in folder.glob("*.safetensors") for k in safe_open(f, "pt").keys()}
    return lambda name: safe_open(files[name], "pt").get_tensor(name)


def whole(folder):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([IDS])).logits[0]


def relative(a, b):
    return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)).item()


def test_streamed_logits_are_the_whole_models(tiny_model):
    # float32 both ways, the same kernels: equal up to summation order
    assert relative(streamed_logits(tiny_model, reader(tiny_model), IDS), whole(tiny_model)) < 1e-6


def test_a_tied_head_reads_the_embedding(tiny_model, tmp_path):
    tied = tmp_path / "tied"
    shutil.copytree(tiny_model, tied)
    config = json.loads((tied / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    (shard,) = tied.glob("*.safetensors")
    state = load_file(shard)
    del state["lm_head.weight"]
    save_file(state, shard, metadata={"format": "pt"})
    assert relative(streamed_logits(tied, reader(tied), IDS), whole(tied)) < 1e-6


def test_at_most_one_layers_tensors_are_alive(tiny_model):
    read, alive, most, order = reader(tiny_model), [], [0], []

    def weights(name):
        tensor = read(name)
        alive[:] = [r for r in alive if r() is not None]
        alive.append(weakref.ref(tensor))
        most[0] = max(most[0], len(alive))
        order.append(name)
        return tensor
    streamed_logits(tiny_model, weights, IDS)
    per_layer = 9  # q k v o gate up down, two norms
    assert most[0] <= per_layer  # a run that kept what it loaded would hold all 2 x 9 + 3
    assert len(order) == len(set(order)) == 2 * per_layer + 3  # each tensor read once: embedding, layers, norm, head
    assert order[0] == "model.embed_tokens.weight" and order[-1] == "lm_head.weight"


def test_a_folder_is_scored_in_batches_one_layer_in_memory(tiny_model, monkeypatch):
    """folder_logits (what `compare`, the gate's reference and the exporters' logits read) over several sequences of
    different lengths, padded into one batch: the whole model's logits, with at most one layer's tensors read and
    alive at a time, so a 70B is never loaded whole to score it (it was: 280 GB in float32)."""
    from qlora_bridge.api import folder_logits
    from qlora_bridge.safetensors_io import SafetensorsReader

    alive, most, read = [], [0], SafetensorsReader.read

    def counted(self, name):
        tensor = read(self, name)
        alive[:] = [r for r in alive if r() is not None]
        alive.append(weakref.ref(tensor))
        most[0] = max(most[0], len(alive))
        return tensor
    monkeypatch.setattr(SafetensorsReader, "read", counted)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    sequences = [IDS, IDS[:3], [9, 8, 7, 6, 5, 4], IDS[::-1] * 2]
    got = list(folder_logits(tiny_model, sequences))
    assert 0 < most[0] <= 9  # one decoder layer's tensors (q k v o gate up down, two norms)
    assert [g.shape[0] for g in got] == list(map(len, sequences))
    for seq, logits in zip(sequences, got):
        with torch.no_grad():
            assert relative(logits, model(torch.tensor([seq])).logits[0]) < 1e-6
