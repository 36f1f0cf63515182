"""Shared loop of the export benchmarks: a plain copy of the shards as the floor, then each export in its own process.

Peak RSS is each child's own high-water mark; the manifest's settings split the time into the exporter's stages.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from synthetic import peak_rss_mib


def child(base: Path, out: Path, target: str, quant: str, options: dict) -> None:
    if quant == "copy":
        out.mkdir(parents=True)
        for f in base.glob("*.safetensors"):
            shutil.copyfile(f, out / f.name)
        os.sync()
        settings = {}
    else:
        from qlora_bridge.stages.export import export
        from qlora_bridge.host import load_plugins

        settings = export(load_plugins(), target, base, out, quant=quant, options=options,
                          progress=False)["export"]["settings"]
    cpu = os.times()
    print(json.dumps({"peak_rss_mib": peak_rss_mib(), "cpu_s": cpu.user + cpu.system, "settings": settings}))


def run(script: str, base: Path, work: Path, jobs: list[tuple[str, str]], options: dict, stages: dict) -> list[dict]:
    """jobs: (target, quant) pairs; stages: column title -> settings key holding that stage's seconds. Prints the
    table, returns its rows."""
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4], sys.argv[5], json.loads(sys.argv[6]))
        sys.exit(0)
    rows = []
    for target, quant in [("copy", "copy"), *jobs]:
        out = work / f"{target}-{quant}"
        shutil.rmtree(out, ignore_errors=True)
        t = time.time()
        proc = subprocess.run([sys.executable, script, "--child", str(base), str(out), target, quant,
                               json.dumps(options)], capture_output=True, text=True)
        wall = time.time() - t
        name = quant if target in ("copy", "gguf") else f"{target} {quant}"
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
            rows.append({"name": name, "ok": False})
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e9
        rows.append({"name": name, "ok": True, "wall_s": wall, "size_gb": size, **r,
                     **{title: r["settings"].get(key) for title, key in stages.items()}})
        shutil.rmtree(out, ignore_errors=True)
    floor = rows[0]["wall_s"]
    print(f"{os.cpu_count()} cores")
    print(f"{'export':<12}{'wall s':>8}{'x copy':>8}" + "".join(f"{t:>12}" for t in stages)
          + f"{'CPU s':>8}{'peak RSS MiB':>14}{'size GB':>9}")
    fmt = lambda v: f"{v:>12.1f}" if isinstance(v, (int, float)) else f"{'-':>12}"
    for r in rows:
        if not r["ok"]:
            print(f"{r['name']:<12} failed")
            continue
        print(f"{r['name']:<12}{r['wall_s']:>8.1f}{r['wall_s'] / floor:>8.1f}" + "".join(fmt(r[t]) for t in stages)
              + f"{r['cpu_s']:>8.1f}{r['peak_rss_mib']:>14.0f}{r['size_gb']:>9.2f}")
    return rows
