"""The CLI: JSON output, exit codes, error messages."""

import contextlib
import json
import os
import subprocess
import sys
import time

import pytest

from qlora_bridge.cli import main

from conftest import chat, write_jsonl


def run_json(capsys, *argv):
    code = main([*argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_train_json(tiny_model, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [chat("a", "b")] * 4)
    held = write_jsonl(tmp_path / "h.jsonl", [chat("a", "b")])
    code, out = run_json(capsys, "train", "--base", str(tiny_model), "--data", str(data), "--heldout", str(held),
                         "--out", str(tmp_path / "ad"), "--steps", "2", "--batch-size", "2", "--rank", "4")
    assert code == 0 and out["ok"] is True
    assert out["record"]["settings"]["rank"] == 4 and out["record"]["steps"] == 2
    assert set(out["record"]["heldout"]) == {"before", "after", "path"}


def test_bad_dataset_exits_2_with_file_line_and_fix(tiny_model, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [chat("a", "b"), "{oops"])
    code, out = run_json(capsys, "train", "--base", str(tiny_model), "--data", str(data),
                         "--out", str(tmp_path / "ad"))
    assert code == 2 and out["file"] == str(data) and "line 2" in out["problem"] and out["fix"]
    assert not (tmp_path / "ad").exists()


def test_console_script_help_and_exit_code(tmp_path):
    exe = [sys.executable, "-m", "qlora_bridge.cli"]
    help_text = subprocess.run([*exe, "train", "--help"], capture_output=True, text=True).stdout
    for option in ("--quant", "--rank", "--alpha", "--target-modules", "--grad-accum", "--truncate", "--json"):
        assert option in help_text
    proc = subprocess.run([*exe, "train", "--base", str(tmp_path), "--data", str(tmp_path / "x.jsonl")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "no config.json" in proc.stderr and "fix:" in proc.stderr


def test_a_killed_runs_partial_folder_is_removed_by_the_next_run_and_a_live_ones_kept(tiny_merged, tmp_path, capsys):
    out = tmp_path / "export"
    dead = subprocess.Popen(["sleep", "60"])
    dead.kill()
    dead.wait()
    left = {}
    for who, pid in (("dead", dead.pid), ("live", os.getppid())):  # the live one: the process that ran pytest
        left[who] = tmp_path / f".export.partial-{pid}"
        (left[who] / "export").mkdir(parents=True)
        (left[who] / "export" / "model.safetensors").write_bytes(b"\0" * 4096)
    code, _ = run_json(capsys, "export", "--target", "safetensors", "--quant", "float32", "--merged",
                       str(tiny_merged), "--out", str(out))
    assert code == 0 and (out / "manifest.json").is_file()
    assert not left["dead"].exists() and left["live"].exists()


def unshare_mount_works() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.parametrize("target", ["safetensors", "gguf"])
def test_a_full_disk_is_named_as_such(tiny_merged, tmp_path, target):
    """A real ENOSPC: the export goes to a 1 MiB tmpfs (mounted in a private user and mount namespace, so no
    privilege is needed) that the tiny model's ~4 MB do not fit."""
    if not unshare_mount_works():
        pytest.skip("this machine does not allow user namespaces (unshare -rm), so no small tmpfs can be mounted")
    disk = tmp_path / "disk"
    disk.mkdir()
    command = (f"mount -t tmpfs -o size=1m tmpfs {disk} && exec {sys.executable} -m qlora_bridge.cli export "
               f"--target {target} --merged {tiny_merged} --out {disk}/out --json")
    done = subprocess.run(["unshare", "-rm", "sh", "-c", command], capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr[-3000:]
    error = json.loads(done.stdout.strip().splitlines()[-1])
    assert error["problem"] == "the disk filled up while writing the export folder; nothing was kept"
    assert error["file"].endswith("/out") and "choose another --out" in error["fix"]
    assert "report this" not in done.stderr


def test_a_folder_no_exporter_recognizes_is_refused_naming_it(tmp_path, capsys):
    # no manifest, and nothing any registered exporter recognizes (Exporter.recognizes): no format is guessed
    (tmp_path / "weights.bin").write_bytes(b"\0")
    assert main(["serve", str(tmp_path), "--json"]) == 2
    err = json.loads(capsys.readouterr().out)
    assert "no exporter recognizes" in err["problem"] and err["file"] == str(tmp_path)


# ---------------------------------------------------------------------------------------------------- one writer
def cli(*argv: str) -> subprocess.Popen:
    """A real `qlora-bridge` process."""
    return subprocess.Popen([sys.executable, "-m", "qlora_bridge.cli", *argv, "--json"], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finished(proc: subprocess.Popen) -> tuple[int, dict, str]:
    out, err = proc.communicate(timeout=600)
    return proc.returncode, json.loads(out.strip().splitlines()[-1]), err


@contextlib.contextmanager
def held_by_another_process(out):
    """`out`'s writer lock, held by a separate process until the block ends."""
    code = ("import sys\nfrom qlora_bridge.files import writer_lock\nwith writer_lock(sys.argv[1]):\n"
            "    print('held', flush=True)\n    sys.stdin.read()\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder.pid
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)


def intact(folder) -> bool:
    from qlora_bridge import manifest as mf

    return mf.compare_outputs(folder, mf.read(folder))[0] == []


def export_argv(merged, out, *extra):
    return ("export", "--target", "safetensors", "--quant", "float32", "--merged", str(merged), "--out", str(out),
            *extra)


@pytest.mark.parametrize("apart", [0.0, 1.0])
def test_two_exports_to_one_folder_one_writes_and_the_other_exits_2(tiny_merged, tmp_path, apart):
    """Issue 35: started together one died with `Directory not empty` (exit 1); a second apart, the second silently
    replaced the first's finished folder. Now exactly one writes it and the other says why it did not."""
    out = tmp_path / "z"
    first = cli(*export_argv(tiny_merged, out))
    time.sleep(apart)
    second = cli(*export_argv(tiny_merged, out))
    results = [finished(first), finished(second)]
    assert sorted(code for code, _, _ in results) == [0, 2], [err[-2000:] for _, _, err in results]
    refused = next(out for code, out, _ in results if code == 2)
    assert refused["file"] == str(out) and ("is being written by pid" in refused["problem"]
                                            or refused["problem"] == "the export folder already exists")
    assert intact(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["z"]  # no lock, no partial folder left


def test_a_held_folder_is_refused_naming_the_holder_and_waited_for_when_asked(tiny_merged, tmp_path):
    out = tmp_path / "z"
    with held_by_another_process(out) as holder:
        code, refused, _ = finished(cli(*export_argv(tiny_merged, out)))
        assert code == 2 and f"is being written by pid {holder} (" in refused["problem"]
        assert "--wait" in refused["fix"] and not out.exists()
        waiting = cli(*export_argv(tiny_merged, out, "--wait"))
        said = next((line for line in waiting.stderr if line.startswith("waiting: ")), "")  # after any import noise
        assert said.startswith(f"waiting: the export folder {out} is being written by pid {holder} (")
    code, exported, _ = finished(waiting)
    assert code == 0 and intact(out)
    # after the wait an existing folder is still replaced only with --force, as if it had finished before
    code, refused, _ = finished(cli(*export_argv(tiny_merged, out, "--wait")))
    assert code == 2 and refused["problem"] == "the export folder already exists"


def test_train_and_merge_refuse_a_held_folder_before_any_work(tiny_model, tiny_adapter, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [chat("a", "b")] * 4)
    for argv in (("train", "--base", str(tiny_model), "--data", str(data), "--steps", "200"),
                 ("merge", "--base", str(tiny_model), "--adapter", str(tiny_adapter))):
        out = tmp_path / argv[0]
        with held_by_another_process(out) as holder:
            code, refused, _ = finished(cli(*argv, "--out", str(out)))
        assert code == 2 and f"is being written by pid {holder}" in refused["problem"], refused
        assert not out.exists()


def test_the_stage_record_keeps_what_other_runs_wrote(tmp_path):
    from qlora_bridge.pipeline import Pipeline
    from qlora_bridge.project import load

    (tmp_path / "qlora-bridge.toml").write_text('[[export]]\ntarget = "safetensors"\n')
    project = load(tmp_path / "qlora-bridge.toml")
    one, other = Pipeline(project), Pipeline(project)  # two runs of one project, both started before either wrote
    one.record("train", {"key": "a", "output": "x"})
    other.record("merge", {"key": "b", "output": "y"})
    assert set(one.recorded()) == {"train", "merge"}
    one.forget("merge")
    assert set(other.recorded()) == {"train"}


def test_an_error_inside_the_staging_folder_names_the_folder_the_user_named(tmp_path):
    """A plugin's error about a file it was writing named the hidden `.NAME.partial-PID/NAME/...` (seen in
    recipe=auto's "no recipe within max_bits"), a path that is gone when the user reads it."""
    from qlora_bridge.errors import BridgeError
    from qlora_bridge.files import output_folder

    out = tmp_path / "export"
    with pytest.raises(BridgeError) as e, output_folder(out, force=False) as staging:
        raise BridgeError("no recipe", file=staging / "model.safetensors")
    assert e.value.file == str(out / "model.safetensors") and not out.exists()
