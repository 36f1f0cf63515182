"""The GPU path end to end (bench/gpu_e2e.sh sets up the environments and runs this): on a CUDA machine, train the
demo with bitsandbytes' CUDA kernels, merge it exactly (NF4 rebuilt on the GPU it was trained on), export GPTQ and
AWQ on the GPU, serve each with vLLM's CUDA build and run the smoke gate (a release), then print the planner's GPU
predictions beside the measured peaks.

GPU memory is measured as nvidia-smi sees it (every process: the exporters' and vLLM's too), sampled every 200 ms
during each stage, minus what was in use before it, and as torch's reserved peak in this process. The stages run in
one process: the first (train) pays for the CUDA context, the later ones find it there, so their nvidia-smi figure
lacks the plan's "CUDA context" term. vLLM is started with an explicit KV cache (the serving adapter's
kv_cache_gib), so what it holds is weights + that cache + its overhead, not 90% of the card.

    bench/gpu_e2e.sh                      # or: python bench/gpu_e2e.py --out DIR [--json] [--no-serve]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
MiB = 2**20
TARGETS = (("gptq", "int4"), ("awq", "int4"))


def gpu_used() -> int:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=30).stdout.split()
    return sum(int(x) for x in out) * MiB


class GpuPeak:
    """The largest GPU memory in use while the block runs, above what was in use when it began."""

    def __enter__(self):
        import torch

        # stages share this process's CUDA context and caching allocator: without this a stage reuses what the one
        # before it cached and reads as needing nothing
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        self.before, self.peak, self._stop = gpu_used(), 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, gpu_used() - self.before)

    def __exit__(self, *exc):
        import torch

        self._stop.set()
        self._thread.join()
        self.torch_reserved = torch.cuda.max_memory_reserved()


def table(rows: list[dict]) -> str:
    lines = [f"{'stage':<28}{'plan GPU MiB':>14}{'nvidia-smi':>12}{'ratio':>8}{'torch reserved':>16}  {'seconds':>8}"]
    for r in rows:
        ratio = f"{r['predicted_mib'] / r['measured_mib']:.2f}" if r["measured_mib"] else "-"
        lines.append(f"{r['stage']:<28}{r['predicted_mib']:>14.0f}{r['measured_mib']:>12.0f}{ratio:>8}"
                     f"{r['torch_reserved_mib']:>16.0f}  {r['seconds']:>8.0f}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for the release (emptied first)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-serve", action="store_true",
                   help="stop after the exports, on a machine that cannot hold vLLM (no package index, or an "
                        "environment carried under a size limit)")
    a = p.parse_args()
    if shutil.which("nvidia-smi") is None:
        print("no NVIDIA GPU here (nvidia-smi is missing): this script proves the CUDA path", file=sys.stderr)
        return 2
    import torch

    if not torch.cuda.is_available():
        print(f"torch {torch.__version__} has no CUDA here: install a CUDA build (bench/gpu_e2e.sh does)",
              file=sys.stderr)
        return 2

    from plan import longest_batch

    from qlora_bridge.host import load_plugins
    from qlora_bridge.pipeline import Pipeline
    from qlora_bridge.plan import hardware, merge_need, read_shape, train_need
    from qlora_bridge.project import ExportSpec, demo_project
    from qlora_bridge.records import read_merge_report, read_training_record
    from qlora_bridge.release import release
    from qlora_bridge.train_settings import TrainSettings

    started = time.time()
    out = Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    project = replace(demo_project(), out=out, exports=[ExportSpec(t, q, "vllm") for t, q in TARGETS])
    reg = load_plugins([])
    pipe = Pipeline(project, reg)
    hw = hardware(where=out)
    rows = []

    def row(stage: str, predicted: int, peak: GpuPeak, since: float):
        rows.append({"stage": stage, "predicted_mib": predicted / MiB, "measured_mib": peak.peak / MiB,
                     "torch_reserved_mib": peak.torch_reserved / MiB, "seconds": time.time() - since})
        print(f"gpu_e2e: {stage}: plan {predicted / MiB:.0f} MiB, measured {peak.peak / MiB:.0f} MiB (torch reserved "
              f"{peak.torch_reserved / MiB:.0f} MiB in this process), "
              f"{time.time() - since:.0f} s", file=sys.stderr, flush=True)

    t = time.time()
    with GpuPeak() as peak:
        adapter = pipe.adapter()
    record = read_training_record(adapter)
    base = record.base_path
    shape = read_shape(base)
    settings = TrainSettings(**{**project.train, "max_seq_len": longest_batch(base, project.train_data, project.train)})
    row("train", train_need(shape, settings, True).total("gpu"), peak, t)

    t = time.time()
    with GpuPeak() as peak:
        merged = pipe.merged()
    report = read_merge_report(merged)
    row("merge", merge_need(shape, "float32", "auto", hw)[0].total("gpu"), peak, t)

    merged_shape = replace(shape, dtype_bytes=4)
    for target, quant in TARGETS:
        exporter, _ = reg.exporter(target)
        t = time.time()
        with GpuPeak() as peak:
            pipe.export(ExportSpec(target, quant, "vllm"), merged)
        row(f"export {target} {quant}", exporter.memory(merged_shape, quant, True).total("gpu"), peak, t)

    result = {"rows": [], "passed": None}
    if not a.no_serve:
        t = time.time()
        with GpuPeak() as peak:  # serving each export with vLLM and the smoke gate (the stages above are reused)
            result = release(project, reg)
        vllm, _ = reg.server("vllm")
        weights = max(reg.exporter(target)[0].memory(merged_shape, quant, True).output for target, quant in TARGETS)
        row("serve (vLLM, both exports)", vllm.memory(merged_shape, weights, 2048, True, {}).total("gpu"), peak, t)

    summary = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": rows,
               "train": {"device": record.quantization["device"], "peak_cuda_mib": record.peak_cuda_mib,
                         "loss": [record.loss_curve[0], record.loss_curve[-1]]},
               "merge": {"nf4_rebuilt_on": report.nf4_rebuilt_on, "check": report.check},
               "release": [{k: r[k] for k in ("artifact", "status", "kl_answers", "kl_text", "task_score", "note")}
                           for r in result["rows"]],
               "passed": result["passed"], "seconds": round(time.time() - started, 1)}
    if a.json:
        print(json.dumps(summary, default=str))
    else:
        print(f"{summary['gpu']}, torch {summary['torch']}: {summary['seconds']:.0f} s in all")
        print(f"train on {summary['train']['device']}: loss {summary['train']['loss'][0]:.3f} -> "
              f"{summary['train']['loss'][1]:.3f}; merge NF4 rebuilt on {report.nf4_rebuilt_on}, check "
              f"{report.check['method']} rel. error {report.check['rel_error']:.1e}")
        print(table(rows))
        for r in summary["release"]:
            print(f"{r['status']:<7}{r['artifact']}: KL answers {r['kl_answers']}, KL text {r['kl_text']}, task "
                  f"{r['task_score']} {r['note']}")
    return 0 if result["passed"] is not False else 3


if __name__ == "__main__":
    sys.exit(main())
