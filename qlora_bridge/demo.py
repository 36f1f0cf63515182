"""The embedded demo project: what every command uses when it is given no data of its own."""

from __future__ import annotations

from pathlib import Path

# Tuned so the quickstart trains in about three minutes on 2 CPU cores and the held-out exact match rises clearly.
TRAIN_OVERRIDES = {"steps": 30, "learning_rate": 1e-3, "batch_size": 8}
OUT = Path("qlora-bridge-out")


def demo_data_dir() -> Path:
    """examples/demo in a source checkout, or its copy inside an installed wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "demo_data", here.parent / "examples" / "demo"):
        if (candidate / "train.jsonl").is_file():
            return candidate
    raise FileNotFoundError("the demo dataset is missing from this installation (examples/demo/train.jsonl)")


def train_file() -> Path:
    return demo_data_dir() / "train.jsonl"


def heldout_file() -> Path:
    return demo_data_dir() / "heldout.jsonl"


def exports() -> list[tuple[str, str, str]]:
    """The demo release's targets, (target, quant, backend): those this machine can export and serve in minutes.

    GGUF Q4_K_M on llama.cpp always; the merged model as float32 safetensors on vLLM when a vLLM environment
    exists. GPTQ and AWQ take ~1.5 minutes each to quantize the demo on 2 cores, but vLLM serves them only on an
    AVX-512 CPU or a GPU, so the demo leaves them to `qlora-bridge export --target awq|gptq` and to projects that
    ask for them. The demo carries no export options: `export --target X --merged MY_MERGE` runs X's defaults.
    """
    import os

    specs = [("gguf", "Q4_K_M", "llamacpp")]
    if os.environ.get("QLORA_BRIDGE_VLLM_PYTHON") or Path(".venv-vllm/bin/python").is_file():
        specs.append(("safetensors", "float32", "vllm"))
    return specs

