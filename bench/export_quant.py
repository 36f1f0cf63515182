"""GPTQ and AWQ export benchmark: time and peak RSS on a synthetic 1.1B-shaped model (random bf16 weights).

    python bench/export_quant.py                       # gptq and awq int4, 16 calibration samples of 128 tokens
    python bench/export_quant.py --samples 128 --seq-len 512 --targets awq

Calibration is a plain-text file of English prose built here, so the run needs no dataset. The quantize column is
GPTQModel's own work; the check column is our read-back (every layer dequantized and compared, then the whole
dequantized model's logits against the merged one's). Reference on the 135M embedded model (research notes,
quality-anchors-smollm2.md, 64 x 256 calibration, quiet 2-core machine): GPTQ 95-135 s, AWQ 664 s.
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
    p.add_argument("--samples", default="16")
    p.add_argument("--seq-len", default="128")
    a, _ = p.parse_known_args()
    base, _ = build("1.1b", Path(a.work) / "inputs")
    calib = Path(a.work) / "calibration.txt"
    from qlora_bridge.corpus import REFERENCE_TEXT

    calib.write_text((REFERENCE_TEXT + "\n") * 40)
    run(__file__, base, Path(a.work), [(t, "int4") for t in a.targets.split(",")],
        {"samples": a.samples, "seq_len": a.seq_len, "calibration": str(calib)},
        {"quantize s": "seconds_quantize", "check s": "seconds_check"})
