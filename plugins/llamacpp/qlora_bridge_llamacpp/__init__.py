"""Built-in serving adapter `llamacpp`: llama-cpp-python's OpenAI-compatible server for GGUF exports."""

import os
import sys
from pathlib import Path

from qlora_bridge.api import (REFERENCE_TEXT, BridgeError, LaunchRequest, ModelShape, Need, ServingAdapter,
                              TokenScores, hookimpl, http_json)

from .build import refuse_faulting_build

PLUGIN_API = 4  # the plugin API this module was written for


def gguf_file(folder: Path) -> Path:
    files = sorted(Path(folder).glob("*.gguf"))
    if len(files) != 1:
        raise BridgeError(f"expected one .gguf file, found {len(files)}", file=folder,
                          fix="serve a folder written by `qlora-bridge export --target gguf`")
    return files[0]


OPTIONS = {"threads": "CPU threads for generation and prompt processing (default: every core)",
           "n_ctx": "context length in tokens (default 2048)"}


def command(req: LaunchRequest) -> list[str]:
    try:
        import llama_cpp.server  # noqa: F401
    except ImportError:
        raise BridgeError("the llamacpp backend needs llama-cpp-python with its server extra",
                          fix="pip install 'qlora-bridge[gguf]'") from None
    refuse_faulting_build()  # the server and this process's scorer (logprobs) run the same library
    threads = req.options.get("threads", str(os.cpu_count() or 1))
    return [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf_file(req.artifact)),
            "--host", "127.0.0.1", "--port", str(req.port), "--n_ctx", req.options.get("n_ctx", "2048"),
            "--n_threads", threads, "--n_threads_batch", threads,
            # prompt log-probabilities (perplexity) need the logits of every position
            "--logits_all", "true"]


def tokenize(server, text: str) -> list[int]:
    """The ids of `text` alone: the server puts BOS first where the GGUF says to add it (Gemma), which is what it
    answers for the empty text."""
    url = server.base_url + "/extras/tokenize"
    added, ids = http_json(url, {"input": ""})["tokens"], http_json(url, {"input": text})["tokens"]
    return ids[len(added):] if ids[:len(added)] == added else ids


# nats, the most a token's log-probability from the server may differ from this process's: a fresh server agrees to
# 5e-5, but after other requests it reuses BOS from the cache, computed in a longer batch by another kernel path,
# and for k-quants that moved Gemma 3's Q4_K_M by up to 0.075; a misaligned echo or another model is off by nats
AGREEMENT = 0.2


def logprobs(server, sequences: list[list[int]]):
    """Next-token log-probabilities over the full vocabulary along each token sequence, from the served GGUF in
    this process's llama.cpp (the same build as the server's).

    llama-cpp-python 0.3.36's server scores echoed prompt token i with the logits *at* position i instead of i-1,
    which makes any perplexity from it meaningless (~7000x); where the GGUF adds BOS, the echo leaves BOS out and
    the same slip lands each token on its right position. So the server's numbers are first checked against the
    same GGUF in this process on a short text, in either alignment, which proves the server serves this model as
    built, and the distributions come from here. (Short: the server's echo log-probabilities cost ~0.25 s a token.)
    """
    import numpy as np
    import torch
    from llama_cpp import Llama

    text = REFERENCE_TEXT.split(". ")[0] + "."
    out = http_json(server.base_url + "/v1/completions", {"prompt": text, "max_tokens": 1, "temperature": 0.0,
                                                           "echo": True, "logprobs": 0})
    n, echoed = out["usage"]["prompt_tokens"], out["choices"][0]["logprobs"]["token_logprobs"]
    longest = max([n, *map(len, sequences)])
    model = Llama(str(gguf_file(server.artifact)), logits_all=True, n_ctx=max(512, longest + 8),
                  n_threads=os.cpu_count() or 1, n_threads_batch=os.cpu_count() or 1, verbose=False)

    def scores(ids):
        # keep what the previous sequence shares with this one (held-out prompts share their system prompt, a
        # record's two answers their prompt): llama.cpp keeps those positions' cache and logits
        shared = 0
        for a, b in zip(model.input_ids[: model.n_tokens], ids[:-1]):
            if a != b:
                break
            shared += 1
        model.n_tokens = shared
        model.eval(ids[shared:])
        return torch.log_softmax(torch.from_numpy(np.array(model.scores[: len(ids)], dtype=np.float32)), -1)

    try:
        adds_bos = model.metadata.get("tokenizer.ggml.add_bos_token") == "true"
        ids = model.tokenize(text.encode(), add_bos=adds_bos, special=True)
        skipped = int(adds_bos)  # the echo leaves out the BOS llama.cpp put first
        served = np.array(echoed[1:n - skipped], dtype=np.float64)
        model.reset()
        local = scores(ids)
        at = torch.arange(1 + skipped, len(ids))
        same, previous = (local[at - shift, ids[1 + skipped:]].double().numpy() for shift in (0, 1))
        if len(ids) != n or min(np.abs(same - served).max(), np.abs(previous - served).max()) > AGREEMENT:
            raise RuntimeError("the server's log-probabilities differ from llama.cpp's on the same file: it is not "
                               "serving this model as built")
        for ids in sequences:
            yield TokenScores(scores(ids)[:-1])
    finally:
        model.close()


# the server process (Python, uvicorn, llama-cpp-python and libllama loaded): measured serving the demo (bench/plan.py)
RUNTIME = 180 * 2**20


def memory(shape: ModelShape, weight_bytes: int, kv_tokens: int, gpu: bool, options: dict) -> Need:
    """llama.cpp maps the GGUF (every page resident once a token has gone through all layers), keeps an f16 KV cache
    and, with --logits_all, a float32 row of logits for every position; its compute buffer holds one batch's
    activations (up to 512 tokens: the feed-forward's and the vocabulary's widths dominate). This build runs on
    the CPU whatever the machine has."""
    batch = min(kv_tokens, 512)
    return Need(host={"runtime": RUNTIME, "weights (mapped)": weight_bytes, "KV cache (f16)": shape.kv_bytes(kv_tokens),
                      "logits of every position": kv_tokens * shape.vocab * 4,
                      "compute buffer": batch * (shape.vocab + 3 * shape.intermediate + 4 * shape.hidden) * 4})


@hookimpl
def register_servers(register):
    register(ServingAdapter(backend="llamacpp", formats=("gguf",), command=command, ready_path="/v1/models",
                            tokenize=tokenize, logprobs=logprobs, options=OPTIONS, memory=memory,
                            description="llama-cpp-python's OpenAI server (python -m llama_cpp.server)"))
