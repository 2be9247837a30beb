"""Model registry: list + schema, downloads from a real HTTP server on 127.0.0.1, cache, offline import, clear."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest

from ct2mr.models import registry
from ct2mr.models.checkpoint import CheckpointError, default_model_path
from ct2mr.cli import main
from ct2mr.io.sampledata import ChecksumError

BUNDLED = json.loads(registry.MODELS_JSON.read_text())


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """Every test gets its own user cache, and no extra model list from the environment."""
    monkeypatch.setenv("CT2MR_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(registry.REGISTRY_ENV, raising=False)
    return tmp_path / "cache" / "models"


@pytest.fixture()
def server(http_server):
    """The local HTTP server of conftest.py."""
    url, root = http_server
    return url, root


def publish(root: Path, url: str, name: str, version: str, payload: bytes, sha256: str | None = None) -> dict:
    """Put a model file on the server and return its list entry."""
    file_name = f"{name}-{version}.safetensors"
    (root / file_name).write_bytes(payload)
    return {"name": name, "version": version, "url": f"{url}/{file_name}", "size": len(payload),
            "sha256": sha256 or hashlib.sha256(payload).hexdigest(), "description": f"{name} {version} for tests",
            "training_data": "none (random bytes)", "licence": "CC0-1.0"}


def write_list(path: Path, *models: dict) -> Path:
    path.write_text(json.dumps({"format_version": 1, "models": list(models)}))
    return path


# --- the list and its schema ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_jsonschema", [False, True], ids=["built-in validator", "jsonschema"])
def test_bundled_list_is_valid(use_jsonschema):
    if use_jsonschema:
        pytest.importorskip("jsonschema", reason="jsonschema is not installed; the built-in validator is used")
    registry.validate_document(BUNDLED, use_jsonschema=use_jsonschema)
    reg = registry.load_registry()
    entry = reg.default_entry()
    assert entry.name == BUNDLED["default"] and entry.bundled and entry.url is None
    assert entry.licence and entry.training_data and entry.description and entry.size == entry.local_path.stat().st_size
    assert registry.model_path() == entry.local_path == default_model_path()  # the checkpoint module agrees


def _broken(change) -> dict:
    document = copy.deepcopy(BUNDLED)
    change(document)
    return document


INVALID = {
    "missing sha256": (lambda d: d["models"][0].pop("sha256"), "'sha256' is required"),
    "short sha256": (lambda d: d["models"][0].update(sha256="abc"), "does not match"),
    "upper-case sha256": (lambda d: d["models"][0].update(sha256="A" * 64), "does not match"),
    "size zero": (lambda d: d["models"][0].update(size=0), "less than 1"),
    "size as text": (lambda d: d["models"][0].update(size="4 MB"), "expected integer"),
    "unknown key": (lambda d: d["models"][0].update(weights="x"), "unknown key 'weights'"),
    "neither file nor url": (lambda d: d["models"][0].pop("file"), "must match one of"),
    "ftp url": (lambda d: d["models"][0].update(url="ftp://host/m.safetensors"), "does not match"),
    "file with a folder": (lambda d: d["models"][0].update(file="../m.safetensors"), "does not match"),
    "name with a slash": (lambda d: d["models"][0].update(name="a/b"), "does not match"),
    "no models": (lambda d: d.update(models=[]), "at least 1"),
    "default not listed": (lambda d: d.update(default="nope"), "'nope' is not one of the models"),
    "listed twice": (lambda d: d["models"].append(dict(d["models"][0])), "listed twice"),
}


@pytest.mark.parametrize("case", list(INVALID), ids=list(INVALID))
def test_invalid_lists_are_refused_with_the_reason(case):
    change, message = INVALID[case]
    with pytest.raises(registry.RegistryError, match="Invalid model list") as error:
        registry.validate_document(_broken(change), use_jsonschema=False)
    assert message in str(error.value)


@pytest.mark.parametrize("case", list(INVALID), ids=list(INVALID))
def test_jsonschema_agrees_with_the_built_in_validator(case):
    pytest.importorskip("jsonschema", reason="jsonschema is not installed; the built-in validator is used")
    with pytest.raises(registry.RegistryError):
        registry.validate_document(_broken(INVALID[case][0]), use_jsonschema=True)


def test_extra_lists_from_arguments_and_environment(tmp_path, monkeypatch):
    entry = {"name": "m", "size": 3, "sha256": "0" * 64, "description": "d", "training_data": "t", "licence": "MIT"}
    first = write_list(tmp_path / "a.json", {**entry, "version": "0.9", "url": "https://example.org/m-0.9.safetensors"})
    second = write_list(tmp_path / "b.json", {**entry, "version": "0.10", "url": "https://example.org/m.safetensors"})
    monkeypatch.setenv(registry.REGISTRY_ENV, str(second))
    reg = registry.load_registry([first])
    assert reg.default == BUNDLED["default"]  # an extra list never changes the default
    assert reg.names() == [*(m["name"] for m in BUNDLED["models"]), "m"]
    assert [m.version for m in reg.versions("m")] == ["0.10", "0.9"]
    assert reg.get("m").version == "0.10" and reg.get("m", "0.9").url.endswith("m-0.9.safetensors")
    assert reg.get("m").file_name == "m.safetensors" and reg.get("m", "0.9").file_name == "m-0.9.safetensors"
    with pytest.raises(registry.RegistryError, match="no version '2.0'; versions: 0.10, 0.9"):
        reg.get("m", "2.0")
    with pytest.raises(registry.RegistryError, match="Unknown model 'x'"):
        reg.get("x")
    with pytest.raises(registry.RegistryError, match="already listed"):
        registry.load_registry([first, write_list(tmp_path / "c.json", reg.get("m", "0.9").to_dict())])
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(registry.RegistryError, match="not valid JSON"):
        registry.load_registry([tmp_path / "bad.json"])


@pytest.mark.parametrize(("older", "newer"), [("0.9", "0.10"), ("1.0", "1.0.1"), ("2024.06", "2025.01"),
                                              ("1.0-beta", "1.0.1")])
def test_version_order(older, newer):
    assert registry.version_key(older) < registry.version_key(newer)


# --- downloads ------------------------------------------------------------------------------------------------------


def test_download_with_a_good_checksum_into_the_cache_keeps_old_versions(server, tmp_path, cache):
    url, root = server
    old = publish(root, url, "lung", "1.0", b"old weights" * 1000)
    new = publish(root, url, "lung", "1.1", b"new weights" * 2000)
    reg = registry.load_registry([write_list(tmp_path / "list.json", old, new)])
    with pytest.raises(registry.RegistryError, match="not downloaded yet: run `ct2mr models download lung"):
        registry.model_path("lung", registry=reg)
    assert [r["status"] for r in registry.list_models(reg) if r["name"] == "lung"] == ["downloadable"] * 2

    seen = []
    path_old = registry.download(reg.get("lung", "1.0"), progress=lambda done, total: seen.append((done, total)))
    assert path_old == cache / "lung" / "1.0" / "lung-1.0.safetensors"
    assert path_old.read_bytes() == b"old weights" * 1000
    assert seen[-1] == (old["size"], old["size"])
    sidecar = json.loads((cache / "lung" / "1.0" / "model.json").read_text())
    assert sidecar["origin"] == "download" and sidecar["entry"]["sha256"] == old["sha256"]

    path_new = registry.model_path("lung", registry=reg, download_missing=True)  # the newest listed version
    assert path_new == cache / "lung" / "1.1" / "lung-1.1.safetensors" and path_old.is_file()
    assert registry.model_path("lung", "1.0", registry=reg) == path_old
    rows = {(r["name"], r["version"]): r for r in registry.list_models(reg)}
    assert rows["lung", "1.1"]["status"] == rows["lung", "1.0"]["status"] == "cached"
    assert rows["lung", "1.1"]["path"] == str(path_new)
    assert [c.entry.version for c in registry.cached_models("lung")] == ["1.1", "1.0"]

    (root / "lung-1.0.safetensors").unlink()  # cached: no request needed any more
    assert registry.download(reg.get("lung", "1.0")) == path_old
    assert not list(cache.rglob("*.part"))


def test_download_with_a_bad_checksum_keeps_nothing(server, tmp_path, cache):
    url, root = server
    entry = publish(root, url, "lung", "2.0", b"tampered" * 100, sha256="0" * 64)
    reg = registry.load_registry([write_list(tmp_path / "list.json", entry)])
    with pytest.raises(ChecksumError, match="expected 0000"):
        registry.download(reg.get("lung"))
    assert not cache.exists() or not any(cache.rglob("*"))
    assert registry.cached_models() == []


def test_unreachable_server_keeps_nothing(tmp_path, cache):
    entry = {"name": "gone", "version": "1", "url": "http://127.0.0.1:9/gone.safetensors", "size": 10,
             "sha256": "0" * 64, "description": "d", "training_data": "t", "licence": "MIT"}
    reg = registry.load_registry([write_list(tmp_path / "list.json", entry)])
    with pytest.raises(OSError):
        registry.download(reg.get("gone"), timeout=5)
    assert not cache.exists() or not any(cache.rglob("*"))


# --- offline import and clear ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory) -> Path:
    """A real ct2mr checkpoint (untrained, 2-channel generators): written by save_checkpoint."""
    import torch

    from ct2mr.models.checkpoint import save_checkpoint
    from ct2mr.networks import build_generator
    from ct2mr.preprocessing.pipeline import PreprocessingConfig

    spec = {"name": "resnet", "base_channels": 2, "n_blocks": 1, "norm": "instance"}
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "my model.safetensors"
    save_checkpoint(path, {"G": build_generator(spec), "F": build_generator(spec)},
                    {"generator": spec, "discriminator": {}}, PreprocessingConfig(), {"roi_size": [32, 32, 32]},
                    {"name": "unit-m1", "steps": 3, "preset": "m1"})
    return path


def test_import_a_local_checkpoint(small_checkpoint, cache):
    cached = registry.import_checkpoint(small_checkpoint)
    sha = hashlib.sha256(small_checkpoint.read_bytes()).hexdigest()
    assert cached.entry.name == "unit-m1" and cached.entry.version == f"local-{sha[:12]}"
    assert cached.path == cache / "unit-m1" / cached.entry.version / f"unit-m1-local-{sha[:12]}.safetensors"
    assert cached.path.read_bytes() == small_checkpoint.read_bytes() and cached.entry.sha256 == sha
    assert cached.origin == "import" and cached.imported_from == str(small_checkpoint.resolve())
    assert "3 training steps" in cached.entry.description
    row = next(r for r in registry.list_models() if r["name"] == "unit-m1")
    assert row["status"] == "imported" and row["path"] == str(cached.path) and not row["default"]
    assert registry.model_path("unit-m1") == cached.path

    again = registry.import_checkpoint(small_checkpoint)  # idempotent
    assert again.path == cached.path
    named = registry.import_checkpoint(small_checkpoint, name="lung-m1", version="1.0", description="mine")
    assert named.path == cache / "lung-m1" / "1.0" / "lung-m1-1.0.safetensors" and named.entry.description == "mine"


def test_import_a_copy_of_a_listed_model_takes_its_name(cache, tmp_path):
    copy_path = tmp_path / "usb stick copy.safetensors"
    copy_path.write_bytes(default_model_path().read_bytes())
    cached = registry.import_checkpoint(copy_path)
    assert (cached.entry.name, cached.entry.version) == (BUNDLED["default"], BUNDLED["models"][0]["version"])
    assert cached.entry.licence == BUNDLED["models"][0]["licence"]


def test_import_refuses_what_is_not_a_checkpoint(tmp_path, cache, small_checkpoint):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError):
        registry.import_checkpoint(junk)
    with pytest.raises(FileNotFoundError):
        registry.import_checkpoint(tmp_path / "absent.safetensors")
    with pytest.raises(registry.RegistryError, match="Invalid model version"):
        registry.import_checkpoint(small_checkpoint, name="m", version="../up")
    assert not cache.exists() or not any(p.is_file() for p in cache.rglob("*"))


def test_clear(small_checkpoint, cache):
    for version in ("1.0", "1.1", "2.0"):
        registry.import_checkpoint(small_checkpoint, name="m", version=version)
    registry.import_checkpoint(small_checkpoint, name="other", version="1")
    assert registry.clear("m", keep_latest=True) == [cache / "m" / "1.1", cache / "m" / "1.0"]
    assert [c.entry.version for c in registry.cached_models("m")] == ["2.0"]
    assert registry.clear("m", "2.0") == [cache / "m" / "2.0"] and not (cache / "m").exists()
    with pytest.raises(ValueError, match="together with --version"):
        registry.clear(version="1")
    assert registry.clear() == [cache / "other" / "1"]
    assert registry.clear() == []
    assert default_model_path().is_file()  # the bundled model is never touched


def test_models_command(server, tmp_path, cache, capsys, small_checkpoint):
    url, root = server
    entry = publish(root, url, "lung", "1.0", b"weights" * 100)
    extra = write_list(tmp_path / "list.json", entry)

    assert main(["models", "--registry", str(extra), "list"]) == 0
    table = capsys.readouterr().out
    assert "ct2mr-default-v1.5 *" in table and "ct2mr-default-v1.0 " in table and "ct2mr-default-v0.2 " in table
    assert "bundled" in table and "downloadable" in table

    assert main(["models", "--registry", str(extra), "download", "lung", "--progress", "json"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["event"] for e in events][0] == "start" and events[-1]["event"] == "done"
    assert events[-2]["event"] == "progress" and events[-2]["fraction"] == 1.0 and events[-2]["stage"] == "download"
    assert events[-1]["path"] == str(cache / "lung" / "1.0" / "lung-1.0.safetensors")

    assert main(["models", "import", str(small_checkpoint), "--name", "mine", "--version", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["path"] == str(cache / "mine" / "3" / "mine-3.safetensors")

    assert main(["models", "--registry", str(extra), "list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert (rows["lung"]["status"], rows["mine"]["status"], rows["ct2mr-default-v1.5"]["status"]) == (
        "cached", "imported", "bundled")

    assert main(["models", "clear"]) == 0
    assert capsys.readouterr().out.count("Removed ") == 2
    assert main(["models", "--registry", str(extra), "download", "nope", "--progress", "json"]) == 1
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["message"].startswith("Unknown model 'nope'")
