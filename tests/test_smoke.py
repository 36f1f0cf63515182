"""The llama.cpp serving adapter and the smoke-test gate, against real llama.cpp servers on 127.0.0.1."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import FULL_PARITY
from damage import permute_layer, scale_rope, with_base_weights

from qlora_bridge.cli import main
from qlora_bridge.errors import BridgeError
from qlora_bridge.stages.export import export
from qlora_bridge.host import load_plugins
from qlora_bridge.stages.serve import ServerFailed, serving
from qlora_bridge.stages.smoke import smoke

pytest.importorskip("llama_cpp", reason="llama-cpp-python is the GGUF extra: pip install '.[gguf]'")
pytestmark = pytest.mark.slow  # starts real servers


@pytest.fixture(scope="module")
def registry():
    return load_plugins()


@pytest.fixture(scope="module")
def gguf_f16(registry, tiny_release, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "export-gguf-F16"
    export(registry, "gguf", tiny_release, out, quant="F16", progress=False)
    return out


def servers_for(folder) -> list:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "llama_cpp.server" in cmd and str(folder) in cmd:
            found.append(p)
    return found


def test_smoke_passes_records_and_resigns(gguf_f16, tmp_path, capsys):
    from qlora_bridge.signing import keygen

    folder = tmp_path / gguf_f16.name
    shutil.copytree(gguf_f16, folder)
    private, public = keygen(tmp_path / "k")
    code = main(["smoke", str(folder), "--sign-key", str(private), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["passed"], {k: v for k, v in out["checks"].items() if not v["passed"]}
    checks = out["checks"]
    assert checks["tokenization"]["parity"] == FULL_PARITY
    assert checks["chat-template"]["prompt_tokens_served"] == checks["chat-template"]["prompt_tokens_hf"]
    assert checks["task-score"]["agreement"] >= 0.9 and checks["golden"]["pass_rate"] >= 0.9
    # F16 against the float32 merge, the full vocabulary through llama.cpp
    assert checks["divergence"]["kl_text"] < 1e-3 and abs(checks["divergence"]["ppl_ratio"] - 1) < 0.01
    assert checks["divergence"]["text_tokens"] > 8000
    assert checks["speed"]["completion_tokens"] == 128 and checks["speed"]["tokens_per_second"] > 0
    assert out["reference"].startswith("the merged model") and "declared by exporter 'gguf'" in out["bounds_source"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["verification"]["smoke-llamacpp"]["passed"] is True
    assert "smoke-report.md" in {o["path"] for o in manifest["outputs"]}
    assert main(["verify", str(folder), "--public-key", str(public)]) == 0
    assert not servers_for(folder)


def test_smoke_on_a_signed_folder_without_key_leaves_the_signature_stale(gguf_f16, tmp_path, capsys):
    from qlora_bridge.signing import keygen, sign

    folder = tmp_path / gguf_f16.name
    shutil.copytree(gguf_f16, folder)
    private, public = keygen(tmp_path / "k")
    sign(folder, private)
    assert main(["smoke", str(folder), "--json"]) == 0
    assert "stale" in json.loads(capsys.readouterr().out)["signature"]
    assert main(["verify", str(folder), "--public-key", str(public)]) == 3


def test_a_gguf_of_the_base_model_fails(registry, gguf_f16, tiny_model, tmp_path, capsys):
    """The export that forgot the adapter: same lineage and tokenizer, base weights."""
    base_export = tmp_path / "base"
    export(registry, "gguf", tiny_model, base_export, quant="F16", progress=False)
    folder = tmp_path / gguf_f16.name
    shutil.copytree(gguf_f16, folder)
    with_base_weights(folder, base_export)
    code = main(["smoke", str(folder), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 3 and not out["passed"]
    assert not out["checks"]["divergence"]["passed"]
    assert "mean KL along the held-out answers" in out["checks"]["divergence"]["why"]
    assert out["checks"]["task-score"]["agreement"] < 0.5
    assert out["checks"]["tokenization"]["passed"]  # same tokenizer: only the fine-tune is missing


@pytest.mark.parametrize("damage,instrument", [
    (lambda folder: permute_layer(folder, 1), "mean KL on the reference text"),
    # on the tiny model's short windows a wrong rope base shows along the answers and in perplexity
    (lambda folder: scale_rope(folder, 0.05), "mean KL along the held-out answers"),
], ids=["layer-permuted", "rope-base-wrong"])
def test_damaged_ggufs_fail_the_divergence_check(gguf_f16, tmp_path, damage, instrument):
    folder = tmp_path / gguf_f16.name
    shutil.copytree(gguf_f16, folder)
    damage(folder)
    result = smoke(load_plugins(), folder, "llamacpp")
    assert not result["passed"] and not result["checks"]["divergence"]["passed"]
    assert instrument in result["checks"]["divergence"]["why"]


def test_an_export_of_an_unproven_merge_is_held_against_the_trained_model(registry, tiny_release, tmp_path):
    """The adapter merged into the original weights: its merge check fails, so the reference is the 4-bit base +
    adapter itself, and the export is measurably not the model that was trained."""
    from qlora_bridge.stages.merge import merge

    report = json.loads((tiny_release / "merge_report.json").read_text())
    original = tmp_path / "merged-original"
    merge(Path(report["base"]["path"]), Path(report["adapter"]["path"]), original, base_weights="original",
          heldout_file=Path(report["heldout"]["path"]), gate=False, progress=False)
    folder = tmp_path / "export-gguf-F32"
    export(registry, "gguf", original, folder, quant="F32", progress=False)
    result = smoke(registry, folder, "llamacpp")
    assert result["reference"].startswith("the trained model (4-bit base")
    assert not result["passed"] and not result["checks"]["divergence"]["passed"]


def test_a_folder_with_a_copied_merge_report_cannot_vouch_for_itself(tiny_model, tiny_release, tmp_path):
    """The base model with the fine-tune's merge report and training record copied in: were it its own reference,
    every export of it would measure KL 0. Its shards are not the ones the report says merge wrote."""
    from qlora_bridge.records import lineage
    from qlora_bridge.measure.reference import reference_for

    assert reference_for({"inputs": lineage(tiny_release).to_json()}, tiny_release).label.startswith("the merged model")
    impostor = tmp_path / "impostor"
    shutil.copytree(tiny_model, impostor)
    for name in ("merge_report.json", "training_record.json"):
        shutil.copy2(tiny_release / name, impostor / name)
    reference = reference_for({"inputs": lineage(impostor).to_json()}, impostor)
    assert reference.label.startswith("the trained model (4-bit base")
    assert "not the ones its merge wrote" in reference.label


def test_a_folder_changed_since_export_is_refused(registry, gguf_f16, tmp_path):
    from qlora_bridge.errors import CheckFailed

    folder = tmp_path / gguf_f16.name
    shutil.copytree(gguf_f16, folder)
    with open(folder / "model-F16.gguf", "ab") as f:
        f.write(b"\0")
    with pytest.raises(CheckFailed, match="no longer matches its manifest: manifest digest mismatch: model-F16.gguf"):
        smoke(registry, folder, "llamacpp")


def test_a_server_that_dies_on_start_is_reported_with_its_log(registry, gguf_f16, tmp_path):
    folder = tmp_path / gguf_f16.name
    shutil.copytree(gguf_f16, folder)
    (folder / "model-F16.gguf").write_bytes(b"GGUF" + b"\0" * 64)  # a corrupt model file
    with pytest.raises(ServerFailed) as e:
        with serving(registry, "llamacpp", folder, log=tmp_path / "server.log", timeout=120):
            pass
    assert "exited with code" in str(e.value) and "last lines of" in str(e.value)
    assert e.value.exit_code == 3 and (tmp_path / "server.log").stat().st_size > 0
    assert not servers_for(folder)


def test_serve_runs_until_interrupted_and_leaves_nothing(gguf_f16, tmp_path):
    # SIGINT back to its default in the child: a suite started in the background by a non-interactive shell
    # inherits it ignored (POSIX), and the child would then never see the Ctrl-C this test sends (it hung so)
    proc = subprocess.Popen([sys.executable, "-m", "qlora_bridge.cli", "serve", str(gguf_f16), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    ready = json.loads(proc.stdout.readline())
    assert ready["url"].startswith("http://127.0.0.1:") and psutil.pid_exists(ready["pid"])
    import urllib.request

    with urllib.request.urlopen(ready["url"] + "/v1/models", timeout=10) as r:
        assert r.status == 200
    proc.send_signal(signal.SIGINT)
    try:  # communicate, not wait: a child blocked on a full stderr pipe would look like a hang
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"serve did not stop within 60 s of SIGINT; its stderr ends:\n{proc.communicate()[1][-3000:]}")
    assert proc.returncode == 0, err[-3000:]
    deadline = time.time() + 10
    while psutil.pid_exists(ready["pid"]) and psutil.Process(ready["pid"]).status() != psutil.STATUS_ZOMBIE:
        assert time.time() < deadline, "the server outlived the serve command"
        time.sleep(0.2)


def test_serve_refuses_a_folder_changed_since_export(gguf_f16, tmp_path):
    folder = tmp_path / gguf_f16.name
    shutil.copytree(gguf_f16, folder)
    path = folder / "model-F16.gguf"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # same size, one bit: only the digest can tell
    path.write_bytes(data)
    # in a child with a deadline: a serve that does not check would serve until interrupted
    done = subprocess.run([sys.executable, "-m", "qlora_bridge.cli", "serve", str(folder), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr[-2000:]
    err = json.loads(done.stdout)
    assert err["exit_code"] == 3 and "manifest digest mismatch: model-F16.gguf" in err["problem"]
    assert not servers_for(folder)


def test_a_killed_serve_leaves_no_server(gguf_f16):
    """kill -9 of the CLI gives it no chance to stop its server; the kernel's parent-death signal does."""
    proc = subprocess.Popen([sys.executable, "-m", "qlora_bridge.cli", "serve", str(gguf_f16), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    server = json.loads(proc.stdout.readline())["pid"]
    assert psutil.pid_exists(server)
    proc.kill()
    proc.wait(10)
    deadline = time.time() + 10
    while psutil.pid_exists(server) and psutil.Process(server).status() != psutil.STATUS_ZOMBIE:
        assert time.time() < deadline, "the llama.cpp server outlived the killed serve command"
        time.sleep(0.2)


def test_a_backend_that_cannot_serve_the_format_is_refused(registry, tiny_merged, tmp_path):
    export(registry, "safetensors", tiny_merged, tmp_path / "st", progress=False)
    with pytest.raises(BridgeError, match="backend 'llamacpp' does not serve safetensors artifacts: it serves gguf"):
        with serving(registry, "llamacpp", tmp_path / "st", log=tmp_path / "log"):
            pass


def test_suite_file_with_match_rules(registry, gguf_f16, tmp_path):
    suite = tmp_path / "suite.yaml"
    suite.write_text(
        "min_pass_rate: 1.0\n"
        "prompts:\n"
        "  - {prompt: [{role: user, content: colour}], expected: blue}\n"
        "  - {prompt: [{role: user, content: day one}], expected: 'Mon', match: contains}\n"
        "  - {prompt: [{role: user, content: day two}], expected: '^Tue', match: regex}\n")
    folder = tmp_path / gguf_f16.name
    shutil.copytree(gguf_f16, folder)
    result = smoke(registry, folder, "llamacpp", suite_file=suite)
    assert result["checks"]["golden"]["pass_rate"] == 1.0 and result["passed"]
    suite.write_text(suite.read_text().replace("expected: blue", "expected: green"))
    result = smoke(registry, folder, "llamacpp", suite_file=suite)
    assert result["checks"]["golden"]["pass_rate"] == pytest.approx(2 / 3, abs=1e-3) and not result["passed"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(BridgeError, match="entry 1 needs 'prompt' and 'expected'"):
        smoke(registry, folder, "llamacpp", suite_file=bad)


def with_check_before(registry, name: str, before):
    """The registry with `before(server)` run at the start of check `name`, inside the real check."""
    from qlora_bridge.api import SmokeCheck

    checks = registry.items["register_smoke_checks"]
    check, plugin = checks[name]

    def run(ctx):
        before(ctx.server)
        return check.run(ctx)
    checks[name] = (SmokeCheck(check.name, run, check.gate, check.description), plugin)
    return registry


def test_a_server_that_dies_during_the_smoke_test_is_named_once_with_signal_and_log(gguf_f16, tmp_path):
    """What an AMX fault in llama.cpp looks like from outside (signal 11 at the first 4-bit product), made here
    with a real SIGSEGV to the real server in the middle of the golden check."""
    folder = tmp_path / gguf_f16.name
    shutil.copytree(gguf_f16, folder)

    def segfault(server):
        server.process.send_signal(signal.SIGSEGV)
        server.process.wait(10)
    registry = with_check_before(load_plugins(), "golden", segfault)
    started = time.time()
    out = smoke(registry, folder, "llamacpp")
    died = out["server_failure"]
    assert not out["passed"] and died.startswith("the llamacpp server died: killed by signal SIGSEGV (11); CPU flags:")
    log_lines = (folder.parent / f"{folder.name}.llamacpp.log").read_text().splitlines()
    assert log_lines and log_lines[-1] in died  # the log's last lines, in the report
    checks = out["checks"]
    assert checks["serves"]["passed"] and checks["tokenization"]["passed"]  # before the crash: measured as usual
    assert checks["golden"]["error"] == "the server died during this check"
    assert all(checks[c]["not_run"] == "the server died" for c in ("divergence", "task-score", "speed"))
    assert time.time() - started < 60  # no check waited on a dead server
    report = (folder / "smoke-report.md").read_text()
    assert "**the llamacpp server died: killed by signal SIGSEGV (11)" in report and log_lines[-1] in report
    assert not servers_for(folder)


def test_a_server_that_stops_answering_is_stopped_and_named(gguf_f16, tmp_path, monkeypatch):
    from qlora_bridge.stages import serve

    folder = tmp_path / gguf_f16.name
    shutil.copytree(gguf_f16, folder)
    monkeypatch.setattr(serve, "HANG_WAIT", 3.0)
    registry = with_check_before(load_plugins(), "golden", lambda server: server.process.send_signal(signal.SIGSTOP))
    out = smoke(registry, folder, "llamacpp", request_timeout=5)
    assert not out["passed"]
    assert out["server_failure"].startswith("the llamacpp server stopped answering (/v1/models unanswered for 3 s; "
                                            "stopped); CPU flags:")
    assert out["checks"]["golden"]["error"] == "the server died during this check"
    assert out["checks"]["divergence"]["not_run"] == "the server died"
    assert not servers_for(folder)
