"""The seed's scale: merge and every export of a synthetic model shape, memory sampled, beside the plan's figures.

    python bench/scale.py --shape 8b --layers 4          # Llama-3-8B's shape, 4 of its 32 decoder layers
    python bench/scale.py --shape 1.1b --baseline        # + the awq export through GPTQModel (the whole model)

Each stage runs in its own process; its whole process tree (llama.cpp's tools included) is sampled every 0.5 s for
anonymous resident memory (what must fit in RAM) and file-backed resident memory (pages of memory-mapped inputs:
clean, reclaimable under pressure, reported beside it). The plan's host figure for the same stage stands beside.
`--layers` cuts the decoder stack: the stages hold one layer (or one tensor) at a time, so their peak does not
depend on how many layers follow, while the time does (the table says how many ran). Calibration is small (a few
blocks of English prose): the point is memory; quality is judged on the demo (bench/quant_quality.py).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import SHAPES, build  # noqa: E402

MiB, GiB = 2**20, 2**30
EXPORTS = [("awq", None, {}), ("gptq", None, {}), ("gguf", "Q4_K_M", {})]  # the targets' defaults


def tree_memory(pid: int) -> tuple[int, int]:
    """(anonymous, file-backed) resident bytes of a process and its descendants."""
    import psutil

    anon = file = 0
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    for p in procs:
        try:
            status = Path(f"/proc/{p.pid}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        anon += int(fields.get("RssAnon", "0 kB").split()[0]) * 1024
        file += int(fields.get("RssFile", "0 kB").split()[0]) * 1024
    return anon, file


def measured(argv: list[str]) -> dict:
    """Run argv, sampling its tree; wall and CPU seconds, peak anonymous and file-backed memory."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.time()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    peak = {"anon": 0, "file": 0}

    def sample():
        while proc.poll() is None:
            anon, file = tree_memory(proc.pid)
            peak["anon"], peak["file"] = max(peak["anon"], anon), max(peak["file"], file)
            time.sleep(0.5)
    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    out, _ = proc.communicate()
    watcher.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise SystemExit(f"{' '.join(argv[:6])} failed with exit code {proc.returncode}")
    return {"wall_s": time.time() - start, "cpu_s": after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime,
            "anon_mib": peak["anon"] / MiB, "file_mib": peak["file"] / MiB, "result": json.loads(out or "{}")}


def child(stage: str, args: list[str]) -> None:
    """One stage, in this process: merge BASE ADAPTER OUT DTYPE, or export TARGET QUANT MERGED OUT OPTIONS."""
    if stage == "merge":
        from qlora_bridge.stages.merge import merge

        base, adapter, out, dtype = args
        merge(Path(base), Path(adapter), Path(out), dtype=dtype, check="layer", force=True, progress=False)
        print(json.dumps({}))
    else:
        from qlora_bridge.host import load_plugins
        from qlora_bridge.stages.export import export

        target, quant, merged, out, options = args
        manifest = export(load_plugins(), target, Path(merged), Path(out), quant=quant or None,
                          options=json.loads(options), force=True, progress=False)
        print(json.dumps({"engine": manifest["export"]["settings"].get("engine", "")}))


def planned(folder: Path, dtype: str, tokens: int, jobs: list) -> dict[str, tuple[float, float]]:
    """The plan's (host, disk) GiB for the merge and each export job of this shape, on this machine; the 4-bit
    exports' calibration activations scaled from the default calibration's tokens to the `tokens` this run used."""
    from qlora_bridge.host import load_plugins
    from qlora_bridge.plan import export_need, hardware, merge_need, read_shape

    shape = read_shape(folder)
    hw = hardware()
    registry = load_plugins()
    merge, _ = merge_need(shape, dtype, "layer", hw)
    out = {"merge": (merge.total("host") / GiB, merge.total("disk") / GiB)}
    merged = replace(shape, dtype_bytes={"float32": 4}.get(dtype, 2))
    for name, target, quant, options in jobs:
        resolved = registry.resolve_export(target, quant=quant, options=options)
        exporter = resolved.exporter
        need = export_need(exporter, merged, resolved.quant, False, options)
        if "calibration activations" in need.host:
            module = importlib.import_module(exporter.export.__module__)
            need.host["calibration activations"] = int(need.host["calibration activations"] * tokens
                                                       / module.calibration_tokens(merged))
        out[name] = (need.total("host") / GiB, need.total("disk") / GiB)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=SHAPES, default="8b")
    p.add_argument("--layers", type=int, help="decoder layers to build (default: the shape's own)")
    p.add_argument("--dtype", default="float16", help="the merge's dtype (float16 halves the disk of float32)")
    p.add_argument("--samples", default="4", help="calibration blocks for the 4-bit exports")
    p.add_argument("--seq-len", default="256")
    p.add_argument("--baseline", action="store_true", help="also the awq export through GPTQModel (whole model)")
    p.add_argument("--work", default="/tmp/qlora-bridge-scale")
    p.add_argument("--targets", default="awq,gptq,gguf", help="the exports to run (default: all three)")
    p.add_argument("--reuse-merge", action="store_true", help="export the merge an earlier run left (no merge row)")
    a = p.parse_args()
    work = Path(a.work)
    base, adapter = build(a.shape, work / f"inputs-{a.shape}-{a.layers or 'all'}", layers=a.layers)
    from qlora_bridge.corpus import REFERENCE_TEXT

    calibration = work / "calibration.txt"
    calibration.write_text((REFERENCE_TEXT + "\n") * 2)  # ~2300 tokens: llama-imatrix wants two 512-token chunks
    # recipe=fixed: random weights have no fine-tune to measure; the targets' fixed recipes (groups of 32)
    quant_options = {"calibration": str(calibration), "samples": a.samples, "seq_len": a.seq_len, "recipe": "fixed"}
    me = [sys.executable, __file__, "--child"]
    merged = work / f"merged-{a.shape}"
    rows = {}
    if not (a.reuse_merge and (merged / "config.json").is_file()):
        rows["merge"] = measured([*me, "merge", str(base), str(adapter), str(merged), a.dtype])
        print(json.dumps({"merge": rows["merge"]}), flush=True)  # each stage as it ends: a long run keeps what it has
    jobs = [(f"export {t}", t, q, {**(quant_options if t != "gguf" else {"calibration": str(calibration),
                                                                         "text_tokens": "0"}), **o})
            for t, q, o in EXPORTS if t in a.targets.split(",")]
    if a.baseline:
        jobs.insert(1, ("export awq (GPTQModel, whole model)", "awq", None, {**quant_options, "engine": "gptqmodel"}))
    for name, target, quant, options in jobs:
        out = work / f"export-{target}"
        rows[name] = measured([*me, "export", target, quant or "", str(merged), str(out), json.dumps(options)])
        rows[name]["disk_gib"] = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / GiB
        print(json.dumps({name: rows[name]}), flush=True)
        shutil.rmtree(out, ignore_errors=True)
    if "merge" in rows:
        rows["merge"]["disk_gib"] = sum(f.stat().st_size for f in merged.rglob("*") if f.is_file()) / GiB
    plan = planned(merged, a.dtype, int(a.samples) * int(a.seq_len), jobs)
    layers = a.layers or SHAPES[a.shape]["layers"]
    print(f"\n{a.shape} shape, {layers} of {SHAPES[a.shape]['layers']} decoder layers, merge in {a.dtype}, "
          f"{os.cpu_count()} cores; calibration {a.samples} x {a.seq_len} tokens")
    print("| stage | wall s | CPU s | peak anonymous MiB | file-backed MiB (mapped inputs) | disk GiB | plan host MiB "
          "| measured / plan |\n|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        host = plan.get(name, (None,))[0]
        ratio = f"{r['anon_mib'] / (host * 1024):.2f}" if host else "-"
        print(f"| {name} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} | {r['anon_mib']:,.0f} | {r['file_mib']:,.0f} | "
              f"{r['disk_gib']:.2f} | {host * 1024:,.0f} | {ratio} |" if host else
              f"| {name} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} | {r['anon_mib']:,.0f} | {r['file_mib']:,.0f} | "
              f"{r['disk_gib']:.2f} | - | - |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2], sys.argv[3:])
    else:
        main()
