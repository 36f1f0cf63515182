"""What `keep_freed_memory` (glibc mallopt: one arena, freed memory kept) buys GPTQModel's AWQ on a CPU.

    python bench/quant_malloc.py                  # AWQ of the embedded model's first two layers, 8 x 256 tokens

Each variant runs in its own process (a glibc setting cannot be undone): glibc's defaults, then the exporter's
setting. Only layers 0-1 are quantized (GPTQModel's `dynamic` skips the rest), which keeps a run near a minute while
exercising the same clipping search a whole export repeats per layer. Printed: wall, user and kernel CPU seconds,
minor page faults, and each as a ratio to the defaults. Measured on the 2-core project machine: 87.5 s -> 61.1 s
wall (0.70x), 41.7 s -> 2.6 s in the kernel, 17.3M -> 0.3M page faults.
"""

import argparse
import importlib
import json
import resource
import subprocess
import sys
import time

VARIANTS = ("glibc defaults", "keep_freed_memory")


def child(variant: str, samples: int, seq_len: int) -> None:
    import os

    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from qlora_bridge.host import load_plugins

    load_plugins()
    plugin = importlib.import_module("qlora_bridge_gptq_awq.engines")
    if variant == VARIANTS[1]:
        plugin.keep_freed_memory()
    import tempfile

    import torch
    from gptqmodel import GPTQModel
    from gptqmodel.quantization import FORMAT, AWQConfig
    from gptqmodel.utils.backend import BACKEND
    from transformers import AutoTokenizer

    from qlora_bridge import demo
    from qlora_bridge.api import token_sequences
    from qlora_bridge.default_model import default_model_dir

    base = default_model_dir()
    stream = [t for s in token_sequences(demo.train_file(), AutoTokenizer.from_pretrained(base), seq_len) for t in s]
    blocks = [stream[i: i + seq_len] for i in range(0, samples * seq_len, seq_len)]
    config = AWQConfig(bits=4, group_size=64, format=FORMAT.GEMM, sym=False, fallback=None,
                       dynamic={r"-:.*layers\.(?:[2-9]|[1-9]\d)\..*": {}})
    started = time.time()
    with tempfile.TemporaryDirectory() as scratch:
        os.chdir(scratch)  # GPTQModel writes ./logs
        model = GPTQModel.load(str(base), config, device="cpu", dtype=torch.float16, trust_remote_code=False)
        model.quantize([{"input_ids": b, "attention_mask": [1] * len(b)} for b in blocks], batch_size=1,
                       backend=BACKEND.AWQ_TORCH)
    print(json.dumps({"quantize_s": time.time() - started}))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a.child, a.samples, a.seq_len)
        sys.exit(0)
    rows = []
    for variant in VARIANTS:
        before, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.time()
        out = subprocess.run([sys.executable, __file__, "--child", variant, "--samples", str(a.samples),
                              "--seq-len", str(a.seq_len)], check=True, capture_output=True, text=True).stdout
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        rows.append({"variant": variant, "wall_s": time.time() - t0,
                     "quantize_s": json.loads(out.strip().splitlines()[-1])["quantize_s"],
                     "user_s": after.ru_utime - before.ru_utime, "kernel_s": after.ru_stime - before.ru_stime,
                     "page_faults": after.ru_minflt - before.ru_minflt})
    base = rows[0]
    print(f"AWQ, embedded model layers 0-1, {a.samples} x {a.seq_len} tokens")
    print(f"{'variant':<20}{'wall s':>9}{'quantize s':>12}{'user s':>9}{'kernel s':>10}{'page faults':>13}{'x wall':>8}"
          f"{'x kernel':>10}")
    for r in rows:
        print(f"{r['variant']:<20}{r['wall_s']:>9.1f}{r['quantize_s']:>12.1f}{r['user_s']:>9.1f}{r['kernel_s']:>10.1f}"
              f"{r['page_faults']:>13,}{r['wall_s'] / base['wall_s']:>8.2f}{r['kernel_s'] / base['kernel_s']:>10.2f}")
