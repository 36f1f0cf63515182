"""Where a GPTQ/AWQ export's loss sits: the smoke gate's instruments on the export as our reader dequantizes it
(float32), with chosen module kinds put back to the merged model's weights, i.e. what keeping them unquantized
would buy.

    python bench/quant_sensitivity.py EXPORT [KINDS ...]

EXPORT is a gptq or awq export folder of a merge with held-out answers; each KINDS is a '+'-joined list of module
names ("q_proj+k_proj+v_proj", "down_proj"; "" for none). One JSON line per KINDS: KL along the held-out answers
and on the reference text, perplexity ratio, task score, and whether the 4-bit bounds hold.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from qlora_bridge import manifest as mf
from qlora_bridge.divergence import full_scores
from qlora_bridge.logits import model_logits
from qlora_bridge.plugins import load_plugins
from qlora_bridge.smoke import gate_bounds, measure, merged_folder, reference_for


def main() -> None:
    folder, kinds_list = Path(sys.argv[1]), sys.argv[2:] or [""]
    torch.set_grad_enabled(False)
    registry = load_plugins()
    readback = importlib.import_module("qlora_bridge_plugin_gptq_awq.readback")
    checks = importlib.import_module("qlora_bridge_plugin_smoke_checks")
    manifest = mf.read(folder)
    merged = merged_folder(manifest, None)
    reference = reference_for(manifest, merged)
    tok = AutoTokenizer.from_pretrained(merged)
    bounds, _ = gate_bounds(registry, manifest)
    merged_state = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).state_dict()
    model = readback.dense_model(folder)
    dequantized = {k: v.clone() for k, v in model.state_dict().items()}
    for kinds in kinds_list:
        restored = [k for k in kinds.split("+") if k]
        model.load_state_dict({k: merged_state[k] if any(f".{r}." in k for r in restored) else v
                               for k, v in dequantized.items()})
        measured = measure(reference, tok, lambda seqs: map(full_scores, model_logits(model, seqs)))
        ctx = type("Ctx", (), {"measurements": lambda self: measured, "bounds": bounds})()
        d, t = checks.divergence(ctx), checks.task_score(ctx)
        print(json.dumps({"restored": restored, "kl_answers": d.get("kl_answers"), "kl_text": d.get("kl_text"),
                          "ppl_ratio": d.get("ppl_ratio"), "task": t.get("task_score"),
                          "interval": t.get("interval_95"), "within_bounds": d["passed"] and t["passed"]}),
              flush=True)


if __name__ == "__main__":
    main()
