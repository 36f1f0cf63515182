import json
import logging
import warnings
from pathlib import Path

import pytest

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", category=FutureWarning)

DEMO = Path(__file__).resolve().parent.parent / "examples" / "demo"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer Llama with a BPE tokenizer and chat template, built in seconds."""
    from qlora_bridge.tinymodel import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def embedded_model() -> Path:
    """The real SmolLM2-135M-Instruct, converted from its PyPI GGUF once per machine (cached)."""
    from qlora_bridge.default_model import default_model_dir

    return default_model_dir()


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def chat(user: str, answer: str, system: str | None = None) -> dict:
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return {"messages": msgs}


@pytest.fixture(scope="session")
def tiny_adapter(tiny_model, tmp_path_factory) -> Path:
    """A QLoRA adapter trained for 10 steps on the tiny model (large enough deltas to measure)."""
    from qlora_bridge.train import TrainSettings, train

    d = tmp_path_factory.mktemp("adapter")
    data = write_jsonl(d / "d.jsonl", [chat(f"request {i}", f'{{"n": {i}}}') for i in range(16)])
    return train(tiny_model, data, d / "ad", TrainSettings(steps=10, batch_size=4, learning_rate=3e-3),
                 progress=False).adapter


@pytest.fixture(scope="session")
def tiny_merged(tiny_model, tiny_adapter, tmp_path_factory) -> Path:
    from qlora_bridge.merge import merge

    out = tmp_path_factory.mktemp("merged") / "merged"
    merge(tiny_model, tiny_adapter, out, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_release(tiny_model, tmp_path_factory) -> Path:
    """A tiny merged model that learned a skill, with held-out answers in its lineage (for smoke tests)."""
    from qlora_bridge.merge import merge
    from qlora_bridge.train import TrainSettings, train

    d = tmp_path_factory.mktemp("release")
    pairs = [("ping", "pong"), ("day one", "Monday"), ("day two", "Tuesday"), ("colour", "blue")]
    data = write_jsonl(d / "train.jsonl", [chat(q, a) for q, a in pairs] * 4)
    heldout = write_jsonl(d / "heldout.jsonl", [chat(q, a) for q, a in pairs])
    adapter = train(tiny_model, data, d / "adapter", TrainSettings(steps=30, batch_size=4, learning_rate=3e-3),
                    heldout_file=heldout, progress=False).adapter
    merge(tiny_model, adapter, d / "merged", heldout_file=heldout, progress=False)
    return d / "merged"


@pytest.fixture(scope="session")
def demo_adapter(embedded_model, tmp_path_factory) -> Path:
    """The README's main job, trained once per test session: the embedded model on the demo data."""
    from qlora_bridge.cli import main

    out = tmp_path_factory.mktemp("demo") / "adapter"
    assert main(["train", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def demo_merged(demo_adapter) -> Path:
    from qlora_bridge.cli import main

    out = demo_adapter.parent / "merged"
    assert main(["merge", "--adapter", str(demo_adapter), "--out", str(out)]) == 0
    return out
