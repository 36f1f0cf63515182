"""Quality of GPTQ/AWQ exports without a server: each export dequantized by our reader into the merged model's
architecture (float32), then held-out answers and perplexity against the merged model.

    python bench/quant_quality.py MERGED EXPORT [EXPORT ...]

What a vLLM smoke test measures, minus the serving kernels (which compute in bfloat16): useful on machines where
vLLM cannot run 4-bit models (x86 CPUs without AVX-512), and to calibrate the smoke thresholds.
"""

import json
import math
import sys
from pathlib import Path

import torch

from qlora_bridge.corpus import REFERENCE_TEXT
from qlora_bridge.data import HeldOut
from qlora_bridge.evaluate import exact_match
from qlora_bridge.plugins import load_plugins


def main() -> None:
    merged, exports = Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]]
    load_plugins()
    from qlora_bridge_plugin_gptq_awq.readback import dense_state
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(merged)
    report = json.loads((merged / "merge_report.json").read_text())
    answers = report["heldout"]["answers"]
    items = [HeldOut(a["prompt"], a["expected"], i) for i, a in enumerate(answers)]
    ids = tok(REFERENCE_TEXT, return_tensors="pt")["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()

    def ppl():
        with torch.no_grad():
            return math.exp(torch.nn.functional.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:]).item())

    base_ppl = ppl()
    print(f"{'export':<28}{'retention':>10}{'exact match':>12}{'PPL':>9}{'PPL delta':>11}")
    print(f"{'merged (float32)':<28}{'-':>10}{sum(a['correct'] for a in answers) / len(answers):>12.3f}"
          f"{base_ppl:>9.3f}{'-':>11}")
    for export in exports:
        model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
        model.load_state_dict(dense_state(export), strict=False)
        got = exact_match(model, tok, items).answers
        same = sum(g.got.strip() == a["got"].strip() for g, a in zip(got, answers)) / len(answers)
        em = sum(g.correct for g in got) / len(got)
        p = ppl()
        print(f"{export.name:<28}{same:>10.3f}{em:>12.3f}{p:>9.3f}{p / base_ppl - 1:>+11.1%}")


if __name__ == "__main__":
    main()
