"""The guard against bitsandbytes' CPU packed layout (research README, fact 1)."""

import pytest
import torch

from qlora_bridge.quant import assert_standard_layout, fingerprint, linear4bit_modules
from qlora_bridge.models import load_model
from qlora_bridge.train_settings import TrainSettings


def has_avx512_bf16() -> bool:
    try:
        return "avx512_bf16" in open("/proc/cpuinfo").read()
    except OSError:
        return False


def dequantized(model):
    from bitsandbytes.functional import dequantize_4bit

    return {n: dequantize_4bit(m.weight.data, m.weight.quant_state).clone() for n, m in linear4bit_modules(model)}


def test_guarded_model_survives_eval_forward(tiny_model):
    model = load_model(tiny_model, TrainSettings())
    before, fp = dequantized(model), fingerprint(model)
    model.eval()
    with torch.no_grad():
        model(torch.tensor([[5, 6, 7, 8]]))
    assert_standard_layout(model)
    assert fingerprint(model) == fp
    after = dequantized(model)
    assert all(torch.equal(before[n], after[n]) for n in before)


@pytest.mark.skipif(not has_avx512_bf16(), reason="bitsandbytes only repacks on CPUs with avx512_bf16; "
                    "this CPU cannot show the corruption the guard prevents")
def test_unguarded_model_is_corrupted_and_the_check_catches_it(tiny_model):
    model = load_model(tiny_model, TrainSettings())
    before = dequantized(model)
    for _, m in linear4bit_modules(model):
        m.support_avx512bf16_for_cpu = True  # undo the guard, as a plain from_pretrained would leave it
    model.eval()
    with torch.no_grad():
        model(torch.tensor([[5, 6, 7, 8]]))
    with pytest.raises(RuntimeError, match="CPU packed layout"):
        assert_standard_layout(model)
    with pytest.raises(RuntimeError, match="CPU packed layout"):
        fingerprint(model)
    name = next(iter(before))
    m = dict(linear4bit_modules(model))[name]
    from bitsandbytes.functional import dequantize_4bit

    garbage = dequantize_4bit(m.weight.data, m.weight.quant_state).float()  # no error is raised...
    assert garbage.shape != before[name].shape or not torch.allclose(garbage, before[name], atol=1e-3)  # ...but
