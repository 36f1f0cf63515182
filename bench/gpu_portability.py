"""Device-only check: is NF4 built by bitsandbytes' CUDA kernels bit-identical to NF4 built on CPU?

The exact merge rebuilds nf4(W) on CPU and proves it against the fingerprint recorded in training. If training ran
on a GPU, that proof only holds when CUDA and CPU quantize identically. This script measures it per layer, then
trains a tiny adapter on the GPU (paged 8-bit AdamW) and merges it (NF4 rebuilt on the GPU, as the merge does
for adapters whose training record says cuda). Measured on an H200: CUDA and CPU NF4 differ in 13-14 of 14 layers
(up to 1.3e-3 relative); the merge with the CUDA rebuild matches the 4-bit + adapter model to 1.1e-6.
Prints one JSON object; writes it to $OUT/gpu_portability.json when OUT is set. Needs a CUDA GPU and bitsandbytes.
"""

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    from qlora_bridge.errors import BridgeError
    from qlora_bridge.stages.merge import merge
    from qlora_bridge.quant import state_digest
    from qlora_bridge.safetensors_io import SafetensorsReader
    from qlora_bridge.tinymodel import build_tiny_model
    from qlora_bridge.stages.train import TrainSettings, train

    import bitsandbytes

    out = {"torch": torch.__version__, "bitsandbytes": bitsandbytes.__version__,
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    work = Path(tempfile.mkdtemp())
    for dtype in ("float32", "bfloat16"):
        base = build_tiny_model(work / f"base-{dtype}", layers=2, hidden=512, intermediate=1536, dtype=dtype)
        reader = SafetensorsReader(base / "model.safetensors")
        same = differ = 0
        worst = 0.0
        for name, info in reader.tensors.items():
            if len(info.shape) != 2 or "embed" in name or "lm_head" in name:
                continue
            w = reader.read(name).float()
            p_cpu, q_cpu = quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
            p_gpu, q_gpu = quantize_4bit(w.cuda(), blocksize=64, compress_statistics=True, quant_type="nf4")
            if state_digest(p_cpu, q_cpu) == state_digest(p_gpu, q_gpu):
                same += 1
            else:
                differ += 1
            d_cpu = dequantize_4bit(p_cpu, q_cpu)
            d_gpu = dequantize_4bit(p_gpu, q_gpu).cpu()
            worst = max(worst, ((d_cpu - d_gpu).norm() / d_cpu.norm()).item())
        out[f"quantize_{dtype}"] = {"layers_identical": same, "layers_different": differ,
                                    "worst_rel_dequant_diff": worst}

    base = work / "base-float32"
    data = work / "d.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                     {"role": "assistant", "content": f"a{i}"}]}) + "\n"
                            for i in range(32)))
    t = time.time()
    rec = train(base, data, work / "adapter", TrainSettings(steps=20, batch_size=8, learning_rate=3e-3),
                progress=False).record
    out["gpu_training"] = {"seconds": round(time.time() - t, 2), "optimizer": rec.optimizer,
                           "loss_first_last": [rec.loss_curve[0], rec.loss_curve[-1]],
                           "peak_cuda_mib": rec.peak_cuda_mib}
    try:
        report = merge(base, work / "adapter", work / "merged", progress=False)
        out["merge_of_gpu_adapter"] = {"ok": True, "check": report.check}
    except BridgeError as e:
        out["merge_of_gpu_adapter"] = {"ok": False, "error": str(e)}
    text = json.dumps(out, indent=1, default=str)
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_portability.json").write_text(text)


if __name__ == "__main__":
    main()
