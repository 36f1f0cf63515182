"""GPTQ and AWQ export benchmark: time and peak RSS on a synthetic 1.1B-shaped model (random bf16 weights).

    python bench/export_quant.py                       # gptq and awq int4 at the targets' default calibration
    python bench/export_quant.py --samples 16 --seq-len 128 --targets awq

Calibration is a plain-text file of English prose built here, so the run needs no dataset; without --samples and
--seq-len each target takes its default amount of it (GPTQ: enough 512-token blocks for twice the widest layer
input, 22 on this shape). The quantize column is GPTQModel's own work; the check column is our read-back (every
layer dequantized and compared, then the whole dequantized model's logits against the merged one's).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export_runner import run  # noqa: E402
from synthetic import build  # noqa: E402

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="/tmp/qlora-bridge-bench", help="scratch folder")
    p.add_argument("--targets", default="gptq,awq")
    p.add_argument("--samples")
    p.add_argument("--seq-len")
    a, _ = p.parse_known_args()
    base, _ = build("1.1b", Path(a.work) / "inputs")
    calib = Path(a.work) / "calibration.txt"
    from qlora_bridge.corpus import REFERENCE_TEXT

    calib.write_text((REFERENCE_TEXT + "\n") * 40)
    run(__file__, base, Path(a.work), [(t, "int4") for t in a.targets.split(",")],
        {"calibration": str(calib), **({"samples": a.samples} if a.samples else {}),
         **({"seq_len": a.seq_len} if a.seq_len else {})},
        {"quantize s": "seconds_quantize", "check s": "seconds_check"})
