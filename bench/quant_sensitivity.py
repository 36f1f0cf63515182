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
from gate import figures, judged  # bench/gate.py: the gate's checks on any logits
from transformers import AutoModelForCausalLM

from qlora_bridge import manifest as mf
from qlora_bridge.host import load_plugins
from qlora_bridge.measure.logits import model_logits
from qlora_bridge.stages.smoke import merged_folder


def main() -> None:
    folder, kinds_list = Path(sys.argv[1]), sys.argv[2:] or [""]
    torch.set_grad_enabled(False)
    registry = load_plugins()
    readback = importlib.import_module("qlora_bridge_gptq_awq.readback")
    merged = merged_folder(mf.read(folder), None)
    merged_state = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).state_dict()
    model = readback.dense_model(folder)
    dequantized = {k: v.clone() for k, v in model.state_dict().items()}
    for kinds in kinds_list:
        restored = [k for k in kinds.split("+") if k]
        model.load_state_dict({k: merged_state[k] if any(f".{r}." in k for r in restored) else v
                               for k, v in dequantized.items()})
        result = judged(registry, folder, lambda seqs: model_logits(model, seqs))
        print(json.dumps({"restored": restored, **figures(result), "within_bounds": result["passed"]}), flush=True)


if __name__ == "__main__":
    main()
