"""Plugin discovery from all three sources, failure isolation, conflicts, and the API version."""

import json
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest

from qlora_bridge.cli import main
from qlora_bridge.errors import BridgeError
from qlora_bridge.stages.export import PluginFailed, export
from qlora_bridge.host import load_plugins
from qlora_bridge.stages.smoke import gate_bounds

ROOT = Path(__file__).resolve().parent.parent

COPY_PLUGIN = '''
import shutil
from qlora_bridge.api import Exporter, ExportResult, ServingAdapter, SmokeCheck, hookimpl

PLUGIN_API = {api}
__version__ = "0.3"

def export(req):
    shutil.copy(req.merged / "config.json", req.out / "config.json")
    return ExportResult(settings={{"copied": 1}})

@hookimpl
def register_exporters(register):
    register(Exporter(target="{target}", export=export, format="config-only"))

@hookimpl
def register_servers(register):
    register(ServingAdapter(backend="echo", formats=("config-only",), command=lambda req: ["true"]))

@hookimpl
def register_smoke_checks(register):
    register(SmokeCheck(name="always-passes", run=lambda ctx: {{"passed": True}}))
'''


def plugin_file(tmp_path, name, body) -> Path:
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(body))
    return path


def test_first_party_plugins_load_through_their_entry_points_like_any_other():
    reg = load_plugins()
    exporter, info = reg.exporter("safetensors")
    assert info.source == "entry point" and info.origin == "qlora-bridge-safetensors (qlora_bridge_safetensors)"
    assert exporter.quant_types == ("float16", "bfloat16", "float32") and not reg.problems and not reg.missing


def test_the_core_runs_without_a_first_party_plugin_and_says_which_is_missing(monkeypatch, capsys):
    """plugins/llamacpp not installed: the other targets work, `plugins` names what is missing and how to install
    it, and asking for its target says so."""
    import qlora_bridge.host as host

    installed = host.entry_points(group=host.ENTRY_POINT_GROUP)
    monkeypatch.setattr(host, "entry_points", lambda group: [ep for ep in installed
                                                             if ep.name not in ("gguf", "llamacpp_server")])
    reg = load_plugins()
    assert reg.exporter("safetensors") and not reg.problems
    assert [m.split(":")[0] for m in reg.missing] == ["gguf", "llamacpp_server"]
    with pytest.raises(BridgeError, match="no export target named 'gguf'.*gguf: pip install -e plugins/llamacpp"):
        reg.exporter("gguf")
    assert main(["plugins"]) == 0
    assert "not installed: gguf: pip install -e plugins/llamacpp" in capsys.readouterr().out


def test_local_plugin_by_path_and_by_env(tmp_path, monkeypatch, tiny_merged):
    path = plugin_file(tmp_path, "copyconf", COPY_PLUGIN.format(api=1, target="copyconf"))
    reg = load_plugins([str(path)])
    info = reg.plugins["copyconf"]
    assert (info.source, info.version) == ("local", "0.3")
    assert info.provides == ["exporter copyconf", "servingadapter echo", "smokecheck always-passes"]
    manifest = export(reg, "copyconf", tiny_merged, tmp_path / "out", progress=False)
    assert [o["path"] for o in manifest["outputs"]] == ["README.md", "config.json"]  # the model card is added
    assert manifest["plugin"]["name"] == "copyconf" and manifest["export"]["settings"]["copied"] == 1

    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("QLORA_BRIDGE_PLUGINS", "copyconf")  # a module name this time
    assert "copyconf" in load_plugins().items["register_exporters"]


def test_broken_plugins_are_named_and_the_others_keep_working(tmp_path, tiny_merged, capsys):
    bad_import = plugin_file(tmp_path, "badimport", "import does_not_exist\nPLUGIN_API = 1\n")
    bad_hook = plugin_file(tmp_path, "badhook", """
        from qlora_bridge.api import hookimpl
        PLUGIN_API = 1
        @hookimpl
        def register_exporters(register):
            raise RuntimeError("registry offline")
    """)
    raises = plugin_file(tmp_path, "raises", """
        from qlora_bridge.api import Exporter, hookimpl
        PLUGIN_API = 1
        def export(req):
            raise ZeroDivisionError("oops")
        @hookimpl
        def register_exporters(register):
            register(Exporter(target="explodes", export=export, format="x"))
    """)
    reg = load_plugins([str(bad_import), str(bad_hook), str(raises)])
    problems = "\n".join(reg.problems)
    assert "plugin 'badimport'" in problems and "No module named 'does_not_exist'" in problems
    assert "plugin 'badhook'" in problems and "registry offline" in problems
    assert "safetensors" in reg.items["register_exporters"]  # unaffected
    with pytest.raises(PluginFailed) as e:
        export(reg, "explodes", tiny_merged, tmp_path / "out", progress=False)
    assert "plugin 'raises'" in str(e.value) and "ZeroDivisionError: oops" in str(e.value)
    assert not (tmp_path / "out").exists()

    code = main(["plugins", "--plugin", str(bad_import), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 3 and any("badimport" in p for p in out["problems"])


def test_two_plugins_claiming_one_target(tmp_path, tiny_merged):
    a = plugin_file(tmp_path, "first", COPY_PLUGIN.format(api=1, target="dup"))
    b = plugin_file(tmp_path, "second", COPY_PLUGIN.format(api=1, target="dup"))
    reg = load_plugins([str(a), str(b)])
    with pytest.raises(BridgeError, match="export target 'dup' is claimed by two plugins: 'first' and 'second'"):
        export(reg, "dup", tiny_merged, tmp_path / "out", progress=False)
    assert any("'first' and 'second'" in p for p in reg.problems)


def test_plugin_api_version(tmp_path):
    old = plugin_file(tmp_path, "oldapi", COPY_PLUGIN.format(api=0, target="old"))
    none = plugin_file(tmp_path, "noapi", "from qlora_bridge.api import hookimpl\n")
    reg = load_plugins([str(old), str(none)])
    assert "written for plugin API 0; this qlora-bridge 0.1.0 supports 1" in reg.plugins["oldapi"].error
    assert "does not declare PLUGIN_API" in reg.plugins["noapi"].error
    with pytest.raises(BridgeError, match="no export target named 'old'.*broken plugins that may have offered it"):
        reg.exporter("old")


@pytest.fixture
def inhouse_installed():
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run([*pip, "install", "--no-deps", str(ROOT / "examples" / "inhouse-exporter")], check=True,
                   capture_output=True)
    yield
    subprocess.run([*pip, "uninstall", "-y", "acme-registry-bundle"], check=True, capture_output=True)


def test_inhouse_example_installs_and_exports_through_its_entry_point(inhouse_installed, tiny_merged, tmp_path):
    cli = [sys.executable, "-m", "qlora_bridge.cli"]
    listing = json.loads(subprocess.run([*cli, "plugins", "--json"], capture_output=True, text=True).stdout)
    row = next(p for p in listing["plugins"] if p["name"] == "acme-registry")
    assert row["source"] == "entry point" and row["version"] == "1.2.0"
    assert row["origin"].startswith("acme-registry-bundle")
    out = tmp_path / "bundle"
    proc = subprocess.run([*cli, "export", "--target", "acme-registry", "--quant", "gz", "--merged",
                           str(tiny_merged), "--out", str(out), "--option", "team=search", "--json"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert {o["path"] for o in manifest["outputs"]} == {"model.tar.gz", "registry.json", "README.md"}
    assert manifest["plugin"] == {"name": "acme-registry", "version": "1.2.0", "source": "entry point",
                                  "origin": "acme-registry-bundle (acme_registry_bundle)"}
    assert json.loads((out / "registry.json").read_text())["team"] == "search"
    proc = subprocess.run([*cli, "export", "--target", "acme-registry", "--merged", str(tiny_merged),
                           "--out", str(tmp_path / "b2")], capture_output=True, text=True)
    assert proc.returncode == 2 and "--option team: ACME's registry needs an owning team" in proc.stderr


def test_options_a_plugin_does_not_declare_are_refused_before_work(tmp_path, tiny_merged, capsys):
    reg = load_plugins()
    with pytest.raises(BridgeError, match="export target 'safetensors' takes no option 'bogus'") as e:
        export(reg, "safetensors", tiny_merged, tmp_path / "out", options={"bogus": "1"}, progress=False)
    assert e.value.field == "--option bogus" and "max_shard_size" in e.value.fix
    assert not (tmp_path / "out").exists()
    # serve: a port the user picked would be ignored (the adapter chooses a free one), so it is refused
    folder = tmp_path / "st"
    export(reg, "safetensors", tiny_merged, folder, progress=False)
    assert main(["serve", str(folder), "--backend", "vllm", "--option", "port=18777", "--json"]) == 2
    assert json.loads(capsys.readouterr().out)["field"] == "--option port"
    # a plugin that declares no options (older than the field) gets whatever is given, as before
    path = plugin_file(tmp_path, "copyconf", COPY_PLUGIN.format(api=2, target="copyconf"))
    manifest = export(load_plugins([str(path)]), "copyconf", tiny_merged, tmp_path / "c", options={"any": "1"},
                      progress=False)
    assert manifest["export"]["settings"]["options"] == {"any": "1"}
    listed = json.loads(subprocess.run([sys.executable, "-m", "qlora_bridge.cli", "plugins", "--json"],
                                       capture_output=True, text=True).stdout)["options"]
    assert set(listed["exporter awq"]) >= {"keep", "group_size", "calibration"} and "server vllm" in listed


def test_an_inhouse_target_is_known_to_release_smoke_and_the_card_from_its_registration(inhouse_installed,
                                                                                        tiny_model, tmp_path):
    """No core change for a new target: ACME's quant types, gate bounds, bits per weight, model-card library and
    file option come from its registration alone. Nothing serves a tar bundle, so its release stops at the gate,
    unverified and unsigned, with ACME's figures in the report."""
    from conftest import chat, write_jsonl

    write_jsonl(tmp_path / "train.jsonl", [chat("ping", "pong")] * 8)
    (tmp_path / "OWNERS.txt").write_text("ada\n")
    (tmp_path / "qlora-bridge.toml").write_text(f'''[model]
base = "{tiny_model}"
[data]
train = "train.jsonl"
[train]
steps = 2
batch_size = 4
[[export]]
target = "acme-registry"
quant = "gz"
options = {{ team = "search", owners = "OWNERS.txt" }}
''')
    elsewhere = tmp_path / "cwd"  # the owners file is found relative to the project file, not the working directory
    elsewhere.mkdir()
    proc = subprocess.run([sys.executable, "-m", "qlora_bridge.cli", "release", "--project",
                           str(tmp_path / "qlora-bridge.toml"), "--json"], capture_output=True, text=True, cwd=elsewhere)
    assert proc.returncode == 3, proc.stderr
    row = json.loads(proc.stdout)["rows"][0]
    assert row["status"] == "FAILED" and "no serving backend serves tar-bundle" in row["note"]
    assert row["bits_per_weight"] == 32 and row["format"] == "tar-bundle gz"  # ACME's declaration, float32 merge
    folder = Path(row["path"])
    with tarfile.open(folder / "model.tar.gz") as tar:
        assert tar.extractfile("OWNERS").read() == b"ada\n"
    card = (folder / "README.md").read_text()
    assert "library_name: acme-registry" in card and "tags: [qlora-bridge, tar-bundle, gz," in card
    manifest = json.loads((folder / "manifest.json").read_text())
    bounds, source, _ = gate_bounds(load_plugins(), manifest)
    assert bounds.reason == "lossless: the bundle holds the merged files byte for byte" and "'acme-registry'" in source
    # and `plan` plans its export from its registration; nothing serves it, which the plan says instead of failing
    proc = subprocess.run([sys.executable, "-m", "qlora_bridge.cli", "plan", "--project",
                           str(tmp_path / "qlora-bridge.toml"), "--json"], capture_output=True, text=True, cwd=elsewhere)
    plan = json.loads(proc.stdout)
    assert plan["stages"]["export acme-registry-gz"]["host"]["terms"] == {"tarfile buffers": 16 * 2**20}
    assert plan["unplanned"] == ["serve acme-registry-gz: no installed backend serves tar-bundle"]
