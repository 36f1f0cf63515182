"""Built-in serving adapter `llamacpp`: llama-cpp-python's OpenAI-compatible server for GGUF exports."""

import os
import sys
from pathlib import Path

from qlora_bridge.api import BridgeError, LaunchRequest, ServingAdapter, hookimpl, http_json

PLUGIN_API = 1  # the plugin API this module was written for


def gguf_file(folder: Path) -> Path:
    files = sorted(Path(folder).glob("*.gguf"))
    if len(files) != 1:
        raise BridgeError(f"expected one .gguf file, found {len(files)}", file=folder,
                          fix="serve a folder written by `qlora-bridge export --target gguf`")
    return files[0]


def command(req: LaunchRequest) -> list[str]:
    try:
        import llama_cpp.server  # noqa: F401
    except ImportError:
        raise BridgeError("the llamacpp backend needs llama-cpp-python with its server extra",
                          fix="pip install 'qlora-bridge[gguf]'") from None
    threads = req.options.get("threads", str(os.cpu_count() or 1))
    return [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf_file(req.artifact)),
            "--host", "127.0.0.1", "--port", str(req.port), "--n_ctx", req.options.get("n_ctx", "2048"),
            "--n_threads", threads, "--n_threads_batch", threads,
            # prompt log-probabilities (perplexity) need the logits of every position
            "--logits_all", "true"]


def tokenize(server, text: str) -> list[int]:
    return http_json(server.base_url + "/extras/tokenize", {"input": text})["tokens"]


def prompt_logprobs(server, text: str) -> list[float]:
    """Log-probability of each token after the first, from the served model's llama.cpp runtime.

    llama-cpp-python 0.3.36's server scores echoed prompt token i with the logits *at* position i instead of i-1,
    which makes any perplexity from it meaningless (~7000x). So the served numbers are checked against the same
    GGUF in the same llama.cpp build in this process, and the correctly shifted log-probabilities are returned.
    """
    import numpy as np
    from llama_cpp import Llama

    out = http_json(server.base_url + "/v1/completions", {"prompt": text, "max_tokens": 1, "temperature": 0.0,
                                                           "echo": True, "logprobs": 0})
    n = out["usage"]["prompt_tokens"]
    served_same_position = np.array(out["choices"][0]["logprobs"]["token_logprobs"][1:n], dtype=np.float64)
    model = Llama(str(gguf_file(server.artifact)), logits_all=True, n_ctx=max(512, n + 8), verbose=False)
    try:
        ids = model.tokenize(text.encode(), add_bos=model.metadata.get("tokenizer.ggml.add_bos_token") == "true",
                             special=True)
        model.eval(ids)
        scores = np.array(model.scores[: len(ids)], dtype=np.float64)
    finally:
        model.close()
    top = scores.max(axis=1, keepdims=True)
    logp = scores - top - np.log(np.exp(scores - top).sum(axis=1, keepdims=True))
    local_same_position = logp[np.arange(1, len(ids)), ids[1:]]
    if len(ids) != n or np.abs(local_same_position - served_same_position).max() > 1e-2:
        raise RuntimeError("the server's log-probabilities differ from llama.cpp's on the same file: it is not "
                           "serving this model as built")
    return logp[np.arange(len(ids) - 1), ids[1:]].tolist()


@hookimpl
def register_servers(register):
    register(ServingAdapter(backend="llamacpp", formats=("gguf",), command=command, ready_path="/v1/models",
                            tokenize=tokenize, prompt_logprobs=prompt_logprobs,
                            description="llama-cpp-python's OpenAI server (python -m llama_cpp.server)"))
