"""`qlora-bridge plan` against measurement: each stage runs in its own process on the models that run here, and its
peak host memory is printed beside the planner's prediction for the same shape and settings, in one run.

    python bench/plan.py                      # the tiny model and the demo: train, merge, exports, serving (~40 min)
    python bench/plan.py --shapes 1.1b        # adds synthetic shapes: merge, GGUF F16/Q4_K_M, awq and gptq
    python bench/plan.py --json

Measured peak: the largest sum of resident memory over the stage's process and everything it started (llama.cpp's
quantizer, a server), sampled every 50 ms, and never below the stage process's own high-water mark (VmHWM). The
prediction for training uses the longest micro-batch the data really has (the planner assumes --max-seq-len, an
upper bound); serving is measured after one request and predicted with that request's KV cache, since the cache
llama.cpp allocates for the whole context is not resident until used.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
# the 4-bit exports: awq at its defaults (the streamed engine, recipe=auto: each step an export, measured against the
# fine-tune's held-out answers) and the fixed recipes beside it
FOUR_BIT = {"tiny": [("awq", None, {}), ("gptq", None, {"recipe": "fixed"})],
            "demo": [("awq", None, {}), ("awq", None, {"recipe": "fixed"}), ("gptq", None, {"recipe": "fixed"})]}


def tree_rss(pid: int) -> int:
    import psutil

    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def measure(args: list[str]) -> dict:
    """Run `bench/plan.py --child ARGS...` and sample its process tree's memory."""
    proc = subprocess.Popen([sys.executable, __file__, "--child", *args], stdout=subprocess.PIPE, text=True)
    peak, started = 0, time.time()

    def sample():
        nonlocal peak
        while proc.poll() is None:
            peak = max(peak, tree_rss(proc.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"stage {args} failed (exit {proc.returncode})")
    child = json.loads(out.strip().splitlines()[-1])
    return {**child, "measured": max(peak, child["vmhwm"]), "seconds": round(time.time() - started, 1)}


def vmhwm() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def child(argv: list[str]) -> None:
    from qlora_bridge.files import quiet_libraries

    quiet_libraries()
    kind, *rest = argv
    extra = {}
    if kind == "train":
        from qlora_bridge.stages.train import TrainSettings, train

        base, data, heldout, out, settings = rest
        train(Path(base), Path(data), Path(out), TrainSettings(**json.loads(settings)),
              heldout_file=Path(heldout) if heldout != "-" else None, force=True, progress=False)
    elif kind == "merge":
        from qlora_bridge.stages.merge import merge

        base, adapter, out, check = rest
        merge(Path(base), Path(adapter), Path(out), check=check, force=True, progress=False)
    elif kind == "export":
        from qlora_bridge.stages.export import export
        from qlora_bridge.host import load_plugins

        target, quant, merged, out, options = rest
        export(load_plugins([]), target, Path(merged), Path(out), quant=None if quant == "-" else quant,
               options=json.loads(options), force=True, progress=False)
    elif kind == "serve":
        from qlora_bridge.host import load_plugins
        from qlora_bridge.stages.serve import serving
        from qlora_bridge.api import http_json

        backend, folder, prompt = rest
        with serving(load_plugins([]), backend, Path(folder), log=Path(folder).parent / "bench.log") as server:
            answer = http_json(f"{server.base_url}/v1/completions",
                               {"prompt": prompt, "max_tokens": 64, "temperature": 0})
            extra["tokens"] = answer["usage"]["total_tokens"]
            time.sleep(0.3)  # a sample of the tree with the server at its working size
    print(json.dumps({"vmhwm": vmhwm(), **extra}))


def longest_batch(base: Path, data: Path, settings: dict) -> int:
    """The longest micro-batch's padded length: collate pads each batch to its longest record."""
    from qlora_bridge.data import load_dataset
    from qlora_bridge.models import load_tokenizer

    ds = load_dataset(data, load_tokenizer(base), settings.get("max_seq_len", 512))
    return max(len(e.input_ids) for e in ds.examples)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="*", default=[], help="synthetic shapes to add (bench/synthetic.py): 1.1b 7b")
    p.add_argument("--work", default="/tmp/qlora-bridge-bench-plan")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()

    from dataclasses import replace

    from qlora_bridge import demo
    from qlora_bridge.default_model import resolve_base
    from qlora_bridge.host import load_plugins
    from qlora_bridge.plan import Hardware, export_need, merge_need, read_shape, train_need
    from qlora_bridge.tinymodel import build_tiny_model
    from qlora_bridge.train_settings import TrainSettings

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    reg = load_plugins([])
    hw = Hardware(ram=24 * 2**30, disk=2**40)
    rows = []

    def row(model: str, stage: str, predicted: int, measured: dict):
        rows.append({"model": model, "stage": stage, "predicted_mib": round(predicted / 2**20),
                     "measured_mib": round(measured["measured"] / 2**20), "seconds": measured["seconds"],
                     "ratio": round(predicted / measured["measured"], 3)})
        print(f"{model:<8}{stage:<26}{predicted / 2**20:>10.0f}{measured['measured'] / 2**20:>10.0f}"
              f"{predicted / measured['measured']:>8.2f}", file=sys.stderr, flush=True)

    def exports(model: str, merged: Path, targets):
        shape = replace(read_shape(merged), dtype_bytes=4)
        for target, quant, options in targets:
            label = " ".join([target, quant or "", *(f"{k}={v}" for k, v in options.items())]).replace("  ", " ")
            out = work / f"{model}-{label.replace(' ', '-').replace('=', '-')}"
            m = measure(["export", target, quant or "-", str(merged), str(out), json.dumps(options)])
            exporter, _ = reg.exporter(target)
            need = export_need(exporter, shape, quant, False, options)  # measured: all resident pages, mapped too
            row(model, f"export {label}", need.total("host") + need.total("mapped"), m)
        return shape

    tiny = build_tiny_model(work / "tiny", layers=2, hidden=256, intermediate=768)
    models = [("tiny", tiny, demo.train_file(), demo.heldout_file(), {"steps": 8, "batch_size": 8}),
              ("demo", resolve_base(None), demo.train_file(), demo.heldout_file(), dict(demo.TRAIN_OVERRIDES))]
    for name, base, data, heldout, settings in models:
        shape = read_shape(base)
        adapter, merged = work / f"{name}-adapter", work / f"{name}-merged"
        m = measure(["train", str(base), str(data), str(heldout), str(adapter), json.dumps(settings)])
        s = TrainSettings(**{**settings, "max_seq_len": longest_batch(base, data, settings)})
        row(name, "train", train_need(shape, s, False).total("host"), m)
        for check in ("full", "layer"):
            m = measure(["merge", str(base), str(adapter), str(merged), check])
            row(name, f"merge (check {check})", merge_need(shape, "float32", check, hw)[0].total("host"), m)
        merged_shape = exports(name, merged, [("gguf", "F16", {}), ("gguf", "Q4_K_M", {}),
                                              ("safetensors", "bfloat16", {}), *FOUR_BIT[name]])
        if name == "demo":
            folder = work / "demo-gguf-Q4_K_M"
            m = measure(["serve", "llamacpp", str(folder), "The capital of France is"])
            weights = sum(f.stat().st_size for f in folder.glob("*.gguf"))
            adapter_, _ = reg.server("llamacpp")
            row(name, "serve llamacpp Q4_K_M", adapter_.memory(merged_shape, weights, m["tokens"], False, {})
                .total("host"), m)

    for shape_name in a.shapes:
        from synthetic import build

        base, adapter = build(shape_name, work / f"synthetic-{shape_name}")
        merged = work / f"{shape_name}-merged"
        m = measure(["merge", str(base), str(adapter), str(merged), "layer"])
        row(shape_name, "merge (check layer)", merge_need(read_shape(base), "float32", "layer", hw)[0].total("host"), m)
        exports(shape_name, merged, [("gguf", "F16", {}), ("gguf", "Q4_K_M", {}),
                                     ("awq", None, {"recipe": "fixed"}), ("gptq", None, {"recipe": "fixed"})])
        shutil.rmtree(merged, ignore_errors=True)

    worst = max(abs(r["ratio"] - 1) for r in rows)
    if a.json:
        print(json.dumps({"rows": rows, "worst_error": worst}))
    else:
        print(f"{'model':<8}{'stage':<26}{'plan MiB':>10}{'measured':>10}{'ratio':>8}")
        for r in rows:
            print(f"{r['model']:<8}{r['stage']:<26}{r['predicted_mib']:>10}{r['measured_mib']:>10}{r['ratio']:>8.2f}")
        print(f"worst: {worst:.0%} off (the bound is 20%)")


if __name__ == "__main__":
    main()
