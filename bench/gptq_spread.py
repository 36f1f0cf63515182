"""How far float-equivalent GPTQ exports land apart under the gate: the streamed engine's export of one merge with
the calibration run through each layer in forwards of different sizes (the same sums in another order), each
served by vLLM and judged by the smoke gate.

    python bench/gptq_spread.py MERGED [--target awq] [--batches 2048,1024,512]

GPTQ's rounding decisions cascade, so float-level differences move the figures; on the demo (docs/gptq-awq.md,
"One decoder layer at a time") the awq export's KL along the answers spread 0.0059-0.0070 and its task score
0.50-0.54 over three such runs, and one of them failed the task ratio. A difference between two engines smaller
than this spread is not evidence.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("merged", type=Path)
    ap.add_argument("--target", default="awq", choices=("awq", "gptq"))
    ap.add_argument("--batches", default="2048,1024,512", help="calibration tokens per forward, one export each")
    ap.add_argument("--out", type=Path, default=Path("gptq-spread"))
    ap.add_argument("--vllm-python", default=".venv-vllm/bin/python")
    a = ap.parse_args()
    from gate import figures  # bench/gate.py

    import qlora_bridge_gptq_awq.streamed as streamed
    from qlora_bridge.host import load_plugins
    from qlora_bridge.stages.export import export
    from qlora_bridge.stages.smoke import smoke

    registry = load_plugins()
    for batch in map(int, a.batches.split(",")):
        streamed.BATCH_TOKENS = batch
        out = a.out / f"{a.target}-{batch}"
        export(registry, a.target, a.merged, out, options={}, progress=False, force=True)
        result = smoke(registry, out, "vllm", options={"python": a.vllm_python})
        print(json.dumps({"batch_tokens": batch, **figures(result), "passed": result["passed"]}), flush=True)


if __name__ == "__main__":
    main()
