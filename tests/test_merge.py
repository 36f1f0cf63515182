"""The exact streaming merge: exactness, the nf4/original difference, the fingerprint, and bad inputs."""

import errno
import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import chat, write_jsonl

from qlora_bridge.errors import BridgeError, CheckFailed
from qlora_bridge.files import digest_folder
from qlora_bridge.stages.merge import merge
from qlora_bridge.records import MERGE_REPORT as REPORT
from qlora_bridge.records import TRAINING_RECORD as RECORD
from qlora_bridge.tinymodel import build_tiny_model
from qlora_bridge.stages.train import TrainSettings, train


@pytest.fixture(scope="module")
def adapter(tiny_adapter):
    return tiny_adapter


def logits_4bit_adapter(base, adapter, ids):
    from peft import PeftModel

    from qlora_bridge.models import load_model

    model = PeftModel.from_pretrained(load_model(base, TrainSettings(compute_dtype="float32")), adapter).eval()
    with torch.no_grad():
        return model(ids).logits


def logits_plain(folder, ids):
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(ids).logits


def rel(a, b):
    return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)).item()


IDS = torch.randint(3, 440, (2, 96), generator=torch.Generator().manual_seed(0))


def test_nf4_merge_is_exact_and_original_is_not(tiny_model, adapter, tmp_path):
    ref = logits_4bit_adapter(tiny_model, adapter, IDS)
    rep = merge(tiny_model, adapter, tmp_path / "nf4", progress=False)
    # fp32 summation order (fused weight vs factored adapter) gives ~1e-6; the limit is 1e-4.
    assert rel(logits_plain(tmp_path / "nf4", IDS), ref) <= 1e-4
    assert rep.check["passed"] and rep.check["rel_error"] <= 1e-4 and rep.fingerprint_verified
    merge(tiny_model, adapter, tmp_path / "orig", base_weights="original", progress=False)
    # merging into the original weights gives a different model from the one trained (~0.2 here)
    assert rel(logits_plain(tmp_path / "orig", IDS), ref) > 1e-2


def test_merged_folder_is_plain_transformers(tiny_model, adapter, tmp_path):
    out = tmp_path / "m"
    merge(tiny_model, adapter, out, max_shard_bytes=1_500_000, progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded as asked
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "float32" and "quantization_config" not in config
    assert {"tokenizer.json", "generation_config.json", "README.md", REPORT} <= {p.name for p in out.iterdir()}
    report = json.loads((out / REPORT).read_text())
    for key in ("base_weights", "dtype", "layers", "check", "wall_seconds", "peak_rss_mib", "bytes_read",
                "bytes_written"):
        assert key in report
    assert len(report["layers"]) == 14 and report["bytes_written"] == sum(
        p.stat().st_size for p in out.glob("*.safetensors")) - sum(8 + int.from_bytes(
            p.read_bytes()[:8], "little") for p in out.glob("*.safetensors"))
    assert report["weights"] == digest_folder(out, "*.safetensors")  # hashed while written
    # generate in a process where peft and bitsandbytes cannot be imported
    code = (f"import sys; sys.modules['peft'] = None; sys.modules['bitsandbytes'] = None\n"
            f"from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f"tok = AutoTokenizer.from_pretrained({str(out)!r}); m = AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
            f"ids = tok('request 3', return_tensors='pt')\n"
            f"print(len(m.generate(**ids, max_new_tokens=5, do_sample=False)[0]) - ids['input_ids'].shape[1])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] in {str(n) for n in range(1, 6)}


def test_dtype_report(tiny_model, adapter, tmp_path):
    rep = merge(tiny_model, adapter, tmp_path / "bf16", dtype="bfloat16", progress=False)
    layer = next(iter(rep.layers.values()))
    assert layer["delta_kept"]["float32"] == 1.0
    assert layer["delta_kept"]["bfloat16"] < layer["delta_kept"]["float16"] < 1.0
    assert rep.delta_kept_overall == pytest.approx(
        sum(v["delta_norm"] * v["delta_kept"]["bfloat16"] for v in rep.layers.values())
        / sum(v["delta_norm"] for v in rep.layers.values()))
    assert rep.check["limit"] is None and rep.check["fine_tune_retained"] > 0.9


def scaled_adapter(adapter, tmp_path, factor):
    """A copy of the adapter with lora_B scaled, so the delta is `factor` times as large."""
    from safetensors.torch import load_file, save_file

    small = tmp_path / f"scaled-{factor}"
    shutil.copytree(adapter, small)
    tensors = load_file(small / "adapter_model.safetensors")
    save_file({k: v * factor if ".lora_B" in k else v for k, v in tensors.items()}, small / "adapter_model.safetensors")
    return small


def test_small_delta_in_bf16_warns(tiny_model, adapter, tmp_path, capsys):
    from qlora_bridge.cli import main

    small = scaled_adapter(adapter, tmp_path, 0.01)
    code = main(["merge", "--base", str(tiny_model), "--adapter", str(small), "--out", str(tmp_path / "m"),
                 "--dtype", "bfloat16", "--check", "layer", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["report"]["delta_kept_overall"] < 0.5
    assert "bfloat16 keeps only" in out["warnings"][0]


def test_untrained_adapter_is_an_error(tiny_model, adapter, tmp_path):
    with pytest.raises(CheckFailed, match="every LoRA delta is zero"):
        merge(tiny_model, scaled_adapter(adapter, tmp_path, 0.0), tmp_path / "m", progress=False)
    assert not (tmp_path / "m").exists()


def test_fingerprint_mismatch_names_the_bitsandbytes_versions(tiny_model, adapter, tmp_path):
    other = tmp_path / "other-bnb"
    shutil.copytree(adapter, other)
    rec = json.loads((other / RECORD).read_text())
    rec["environment"]["libraries"]["bitsandbytes"] = "0.49.2"
    first = next(iter(rec["quantization"]["fingerprint"]["layers"]))
    rec["quantization"]["fingerprint"]["layers"][first]["sha256"] = "0" * 64
    (other / RECORD).write_text(json.dumps(rec))
    with pytest.raises(CheckFailed) as e:
        merge(tiny_model, other, tmp_path / "m", progress=False)
    assert "training used bitsandbytes 0.49.2 and this is 0.50.2" in str(e.value) and first in str(e.value)
    assert e.value.exit_code == 3 and not (tmp_path / "m").exists()


def test_adapter_from_another_base(tiny_model, adapter, tmp_path):
    wider = build_tiny_model(tmp_path / "wider", hidden=512, intermediate=1024)
    with pytest.raises(BridgeError, match="shape mismatch at model.layers.0"):
        merge(wider, adapter, tmp_path / "m", progress=False)
    shallow = build_tiny_model(tmp_path / "shallow", layers=1)
    with pytest.raises(BridgeError, match=r"missing target modules: .*model.layers.1.* \(7 of 14\)"):
        merge(shallow, adapter, tmp_path / "m", progress=False)
    reseeded = build_tiny_model(tmp_path / "reseeded", seed=1)  # same shapes, other weights
    with pytest.raises(BridgeError, match="digest mismatch: .*model.safetensors: trained on sha256"):
        merge(reseeded, adapter, tmp_path / "m", progress=False)
    with pytest.raises(CheckFailed, match="base weights differ from the ones the adapter was trained on"):
        merge(reseeded, adapter, tmp_path / "m", ignore_base_digests=True, progress=False)
    assert not (tmp_path / "m").exists()


def test_corrupt_and_incomplete_bases(tiny_model, adapter, tmp_path):
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_model, truncated)
    shard = truncated / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(BridgeError, match="corrupt or truncated safetensors file: tensor .* ends at byte"):
        merge(truncated, adapter, tmp_path / "m", ignore_base_digests=True, progress=False)
    garbage = tmp_path / "garbage"
    shutil.copytree(tiny_model, garbage)
    (garbage / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(BridgeError, match="header is not valid JSON"):
        merge(garbage, adapter, tmp_path / "m", ignore_base_digests=True, progress=False)
    notok = tmp_path / "notok"
    shutil.copytree(tiny_model, notok)
    (notok / "tokenizer.json").unlink()
    with pytest.raises(BridgeError, match="no tokenizer"):
        merge(notok, adapter, tmp_path / "m", progress=False)


def test_pickle_adapter_refused(tiny_model, adapter, tmp_path):
    pickled = tmp_path / "pickled"
    shutil.copytree(adapter, pickled)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    with pytest.raises(BridgeError, match="only a pickle .bin, which is never loaded"):
        merge(tiny_model, pickled, tmp_path / "m", progress=False)


def test_existing_output_full_disk_and_interruption(tiny_model, adapter, tmp_path, monkeypatch):
    from qlora_bridge import safetensors_io

    out = tmp_path / "m"
    out.mkdir()
    with pytest.raises(BridgeError, match="already exists"):
        merge(tiny_model, adapter, out, progress=False)
    out.rmdir()

    calls = {"n": 0}
    real_write = safetensors_io.ShardWriter.write

    def disk_fills_up(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, name, tensor)

    monkeypatch.setattr(safetensors_io.ShardWriter, "write", disk_fills_up)
    with pytest.raises(BridgeError, match="the disk filled up"):
        merge(tiny_model, adapter, out, progress=False)
    assert list(tmp_path.iterdir()) == []

    def interrupted(self, name, tensor):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors_io.ShardWriter, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        merge(tiny_model, adapter, out, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_bf16_base_fingerprint_and_exactness(tmp_path):
    """A bf16 checkpoint is upcast before bitsandbytes quantizes it; the merge must rebuild exactly that."""
    base = build_tiny_model(tmp_path / "bf16", dtype="bfloat16")
    data = write_jsonl(tmp_path / "d.jsonl", [chat(f"q {i}", f"a {i}") for i in range(8)])
    adapter = train(base, data, tmp_path / "ad", TrainSettings(steps=3, batch_size=4, learning_rate=3e-3),
                    progress=False).adapter
    rep = merge(base, adapter, tmp_path / "m", progress=False)
    assert rep.check["rel_error"] <= 1e-4


def test_gpu_trained_adapter_needs_a_gpu_or_an_explicit_inexact_rebuild(tiny_model, adapter, tmp_path):
    """bitsandbytes' CUDA and CPU kernels round NF4 differently (measured on an H200: 13 of 14 layers)."""
    gpu = tmp_path / "gpu-trained"
    shutil.copytree(adapter, gpu)
    rec = json.loads((gpu / RECORD).read_text())
    rec["quantization"]["device"] = "cuda"
    (gpu / RECORD).write_text(json.dumps(rec))
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the rebuild would run on it (bench/gpu_portability.py checks that)")
    with pytest.raises(CheckFailed, match="trained on a CUDA GPU.*needs a CUDA GPU"):
        merge(tiny_model, gpu, tmp_path / "m", progress=False)
    rep = merge(tiny_model, gpu, tmp_path / "m", inexact_nf4=True, progress=False)
    assert rep.fingerprint_verified is False and rep.nf4_rebuilt_on == "cpu"


def test_an_unchecked_merge_says_so_and_proves_nothing(tiny_model, adapter, tmp_path, capsys):
    """--check none writes the merge and says it is unchecked (issue 35: it used to exit 1 on a TypeError); an
    export of it is held against the trained model, since nothing proved the merge equal to it."""
    from qlora_bridge.cli import main
    from qlora_bridge.measure.reference import reference_for
    from qlora_bridge.records import lineage

    out = tmp_path / "m"
    code = main(["merge", "--base", str(tiny_model), "--adapter", str(adapter), "--out", str(out), "--check", "none"])
    assert code == 0 and "unchecked (--check none)" in capsys.readouterr().out
    report = json.loads((out / REPORT).read_text())
    assert report["check"]["method"] == "unchecked (--check none)" and report["check"]["limit"] is None
    assert reference_for({"inputs": lineage(out).to_json()}, out).label.startswith("the trained model")


def test_force_replaces_only_a_folder_this_tool_wrote(tiny_model, adapter, tmp_path):
    """--force replaced a regular file named by --out with the merge folder (issue 35): never a file, nor a folder
    without the stage's own record in it."""
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    with pytest.raises(BridgeError, match="would replace a file"):
        merge(tiny_model, adapter, a_file, force=True, progress=False)
    assert a_file.read_text() == "keep me"
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(BridgeError, match="has no merge_report.json"):
        merge(tiny_model, adapter, foreign, force=True, progress=False)
    assert [p.name for p in foreign.iterdir()] == ["cat.jpg"]
    merge(tiny_model, adapter, tmp_path / "m", check="layer", progress=False)
    merge(tiny_model, adapter, tmp_path / "m", check="layer", force=True, progress=False)  # ours: replaced
    assert (tmp_path / "m" / REPORT).is_file()


def test_a_config_naming_another_base_is_said_and_another_bases_files_refused(tiny_model, adapter, tmp_path, capsys):
    """Issue 35: merge settled silently on the training record's base when adapter_config.json named another."""
    from qlora_bridge.cli import main

    config = json.loads((adapter / "adapter_config.json").read_text())
    recorded = json.loads((adapter / RECORD).read_text())["base"]["path"]
    assert config["base_model_name_or_path"] == recorded  # what train writes: the two agree
    other = build_tiny_model(tmp_path / "other", seed=1)
    edited = tmp_path / "adapter"
    shutil.copytree(adapter, edited)
    (edited / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(other)}))
    code = main(["merge", "--adapter", str(edited), "--out", str(tmp_path / "m"), "--check", "layer", "--json"])
    said = json.loads(capsys.readouterr().out)
    assert code == 0 and said["warnings"] == said["report"]["warnings"]
    assert f"names the base {other}, the training record {recorded}: merged into {recorded}" in said["warnings"][0]
    code = main(["merge", "--adapter", str(edited), "--base", str(other), "--out", str(tmp_path / "m2"), "--json"])
    refused = json.loads(capsys.readouterr().out)
    assert code == 2 and refused["problem"].startswith("digest mismatch") and refused["file"] == str(other)
