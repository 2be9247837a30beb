"""Model registry: the model list (JSON with a JSON Schema), downloads into the user cache, offline import.

The list (``models/models.json``, validated against ``models/models.schema.json``) names every model with its
version, description, training data, licence, URL or bundled file, SHA-256 and size. Extra lists (an institution's
own models) are read from the files given to :func:`load_registry` or named in the environment variable
``CT2MR_MODEL_REGISTRY`` (paths separated by ``os.pathsep``).

Where models live:

* the bundled default model: next to the list, inside the installed package (always available, never downloaded);
* downloaded and imported models: ``<cache>/models/<name>/<version>/<file>.safetensors`` with ``model.json`` (the
  entry, its source and when it was added) beside it, ``<cache>`` being ``$CT2MR_CACHE`` or
  ``platformdirs.user_cache_dir("ct2mr")``. Never the install tree. A new version goes into its own folder: older
  versions stay until :func:`clear` removes them.

Downloads go through :func:`ct2mr.io.sampledata.fetch` (temporary file, SHA-256 check, atomic rename: a bad or
interrupted download leaves nothing under the final name). Imported checkpoints are checked with
:func:`ct2mr.models.checkpoint.read_metadata` (which needs torch) and copied with their SHA-256.

This module itself imports neither torch nor anything of a front end: the Slicer module reads the list in its own
process. The schema is enforced with ``jsonschema`` when it is installed, else by :func:`validate_document`, a small
validator for the keywords the schema uses.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from ct2mr.io.cache import cache_dir, sha256sum

__all__ = [
    "MODELS_DIR",
    "MODELS_JSON",
    "read_model_list",
    "SCHEMA_JSON",
    "REGISTRY_ENV",
    "RegistryError",
    "ModelEntry",
    "CachedModel",
    "Registry",
    "load_schema",
    "validate_document",
    "load_registry",
    "version_key",
    "models_cache_dir",
    "model_dir",
    "cached_models",
    "model_path",
    "download",
    "import_checkpoint",
    "clear",
    "list_models",
    "models_table",
]

MODELS_DIR = Path(__file__).resolve().parent
#: The bundled model list.
MODELS_JSON = MODELS_DIR / "models.json"
#: JSON Schema (draft 2020-12) of model lists.
SCHEMA_JSON = MODELS_DIR / "models.schema.json"
#: Environment variable naming extra model lists (paths separated by ``os.pathsep``).
REGISTRY_ENV = "CT2MR_MODEL_REGISTRY"
#: Name of the sidecar file written beside every cached model.
SIDECAR = "model.json"

ProgressCallback = Callable[[int, int], None]


class RegistryError(ValueError):
    """A model list is invalid, a model is unknown, or a cached model is damaged; the message says what to do."""


@dataclass(frozen=True)
class ModelEntry:
    """One model of a list.

    Attributes:
        name: model name (letters, digits, ``.``, ``_``, ``-``).
        version: model version; versions of a name are ordered by :func:`version_key`.
        sha256: hex SHA-256 of the ``.safetensors`` file.
        size: file size in bytes.
        description: what it is and what it is for.
        training_data: what it was trained on (with the data licences).
        licence: licence of the weights.
        file: bundled models: the file name beside the list (``None`` otherwise).
        url: downloadable models: where to fetch the file (``None`` for bundled ones).
        model_card: model card file name (beside the list) or URL.
        architecture: short summary of the architecture.
        homepage: project page.
        source: the list the entry came from (a path), or ``"imported"``.
    """

    name: str
    version: str
    sha256: str
    size: int
    description: str = ""
    training_data: str = ""
    licence: str = ""
    file: str | None = None
    url: str | None = None
    model_card: str | None = None
    architecture: str | None = None
    homepage: str | None = None
    source: str = ""

    @property
    def key(self) -> str:
        """``"<name>/<version>"``."""
        return f"{self.name}/{self.version}"

    @property
    def bundled(self) -> bool:
        """The file lies beside its list (the package's default model, or a list on a shared drive): no download."""
        return self.file is not None and self.source not in ("", "imported") and not self.source.endswith(SIDECAR)

    @property
    def local_path(self) -> Path | None:
        """For bundled entries, the file beside the list; else ``None``."""
        return Path(self.source).parent / self.file if self.bundled and self.file else None

    @property
    def file_name(self) -> str:
        """The file name the model has on disk: ``file``, else the URL's last part, else ``<name>-<version>``."""
        if self.file:
            return self.file
        if self.url:
            tail = self.url.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0]
            if tail.endswith(".safetensors") and re.fullmatch(r"[A-Za-z0-9._+-]+", tail):
                return tail
        return f"{self.name}-{self.version}.safetensors"

    def to_dict(self) -> dict[str, Any]:
        """The entry as a list item (``None`` fields and ``source`` left out)."""
        return {k: v for k, v in asdict(self).items() if v is not None and k != "source"}


@dataclass(frozen=True)
class CachedModel:
    """A model file in the user cache (downloaded or imported).

    Attributes:
        entry: its entry (for imported models: made from the checkpoint's metadata).
        path: the ``.safetensors`` file.
        origin: ``"download"`` (with the URL in ``entry.url``) or ``"import"``.
        added: when it was added (ISO 8601, UTC).
        imported_from: for imports, the original file.
    """

    entry: ModelEntry
    path: Path
    origin: str
    added: str = ""
    imported_from: str | None = None


@dataclass
class Registry:
    """The merged model lists.

    Attributes:
        default: name of the default model.
        models: every entry, in list order (the bundled list first).
        sources: the list files read.
    """

    default: str
    models: list[ModelEntry] = field(default_factory=list)
    sources: list[Path] = field(default_factory=list)

    def names(self) -> list[str]:
        """Model names, each once, in list order."""
        return list(dict.fromkeys(m.name for m in self.models))

    def versions(self, name: str) -> list[ModelEntry]:
        """Entries of ``name``, newest version first."""
        return sorted((m for m in self.models if m.name == name), key=lambda m: version_key(m.version), reverse=True)

    def get(self, name: str, version: str | None = None) -> ModelEntry:
        """The entry of ``name`` (its newest version unless ``version`` is given).

        Raises:
            RegistryError: no such model or version; the message lists what exists.
        """
        candidates = self.versions(name)
        if not candidates:
            raise RegistryError(f"Unknown model {name!r}; known models: {', '.join(self.names()) or 'none'} "
                                "(`ct2mr models list`).")
        if version is None:
            return candidates[0]
        for entry in candidates:
            if entry.version == version:
                return entry
        raise RegistryError(f"Model {name!r} has no version {version!r}; versions: "
                            f"{', '.join(m.version for m in candidates)}.")

    def default_entry(self) -> ModelEntry:
        """The entry of the default model."""
        return self.get(self.default)

    def by_sha256(self, sha256: str) -> ModelEntry | None:
        """The entry whose file has this SHA-256, if any."""
        return next((m for m in self.models if m.sha256 == sha256), None)


# --- schema ---------------------------------------------------------------------------------------------------------


def load_schema() -> dict[str, Any]:
    """The JSON Schema of model lists (``models/models.schema.json``)."""
    return json.loads(SCHEMA_JSON.read_text(encoding="utf-8"))


_TYPES: dict[str, tuple[type, ...]] = {"object": (dict,), "array": (list,), "string": (str,), "integer": (int,),
                                       "number": (int, float), "boolean": (bool,), "null": (type(None),)}


def _resolve(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if ref is None:
        return schema
    if not ref.startswith("#/"):
        raise RegistryError(f"Only local $ref are supported by the built-in validator, got {ref!r}.")
    node: Any = root
    for part in ref[2:].split("/"):
        node = node[part]
    return node


def _errors(value: Any, schema: dict[str, Any], root: dict[str, Any], where: str) -> list[str]:
    """The problems of ``value`` against ``schema`` (keywords: type, required, properties, additionalProperties,
    items, minItems, pattern, minLength, minimum, enum, anyOf, $ref)."""
    schema = _resolve(schema, root)
    problems: list[str] = []
    expected = schema.get("type")
    if expected is not None:
        types = _TYPES[expected]
        if not isinstance(value, types) or (expected in ("integer", "number") and isinstance(value, bool)):
            return [f"{where}: expected {expected}, got {type(value).__name__}"]
    if "enum" in schema and value not in schema["enum"]:
        problems.append(f"{where}: {value!r} is not one of {schema['enum']}")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            problems.append(f"{where}: shorter than {schema['minLength']} characters")
        if "pattern" in schema and re.search(schema["pattern"], value) is None:
            problems.append(f"{where}: {value!r} does not match {schema['pattern']!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and "minimum" in schema:
        if value < schema["minimum"]:
            problems.append(f"{where}: {value} is less than {schema['minimum']}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            problems.append(f"{where}: needs at least {schema['minItems']} item(s)")
        if "items" in schema:
            for i, item in enumerate(value):
                problems += _errors(item, schema["items"], root, f"{where}[{i}]")
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                problems.append(f"{where}: '{key}' is required")
        properties = schema.get("properties", {})
        for key, item in value.items():
            if key in properties:
                problems += _errors(item, properties[key], root, f"{where}.{key}")
            elif schema.get("additionalProperties", True) is False:
                problems.append(f"{where}: unknown key '{key}'")
    if "anyOf" in schema and all(_errors(value, option, root, where) for option in schema["anyOf"]):
        problems.append(f"{where}: must match one of {json.dumps(schema['anyOf'])}")
    return problems


def validate_document(document: Any, schema: dict[str, Any] | None = None, use_jsonschema: bool | None = None
                      ) -> None:
    """Check a model list against the schema, then the rules a schema cannot state.

    Beyond the schema: the default names a listed model, and no name/version pair appears twice.

    Args:
        document: the parsed JSON.
        schema: the schema; ``None`` loads :data:`SCHEMA_JSON`.
        use_jsonschema: ``True`` requires the ``jsonschema`` package, ``False`` uses the built-in validator,
            ``None`` uses ``jsonschema`` when it is installed.

    Raises:
        RegistryError: every problem found, one per line.
        ImportError: ``use_jsonschema=True`` and ``jsonschema`` is not installed.
    """
    schema = schema or load_schema()
    if use_jsonschema is None:
        try:
            import jsonschema  # noqa: F401
            use_jsonschema = True
        except ImportError:
            use_jsonschema = False
    if use_jsonschema:
        import jsonschema

        validator = jsonschema.Draft202012Validator(schema)
        problems = [f"{'.'.join(['$', *map(str, e.absolute_path)])}: {e.message}"
                    for e in sorted(validator.iter_errors(document), key=lambda e: list(map(str, e.absolute_path)))]
    else:
        problems = _errors(document, schema, schema, "$")
    if not problems and isinstance(document, dict):
        models = document.get("models", [])
        names = {m.get("name") for m in models}
        if "default" in document and document["default"] not in names:
            problems.append(f"$.default: {document['default']!r} is not one of the models ({', '.join(sorted(names))})")
        seen: set[tuple[str, str]] = set()
        for i, model in enumerate(models):
            key = (model.get("name"), model.get("version"))
            if key in seen:
                problems.append(f"$.models[{i}]: {key[0]} version {key[1]} is listed twice")
            seen.add(key)
    if problems:
        raise RegistryError("Invalid model list:\n" + "\n".join(problems))


def read_model_list(path: str | os.PathLike = MODELS_JSON) -> dict[str, Any]:
    """One model-list file as its JSON document (``{"default": ..., "models": [...]}``), validated against the schema.

    Args:
        path: the list (default: the bundled ``models/models.json``).

    Raises:
        RegistryError: the file is missing, not JSON, or against the schema.
    """
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise RegistryError(f"Model list {path} does not exist.") from exc
    except json.JSONDecodeError as exc:
        raise RegistryError(f"Model list {path} is not valid JSON ({exc}).") from exc
    try:
        validate_document(document)
    except RegistryError as exc:
        raise RegistryError(f"{path}: {exc}") from None
    return document


def _entry(item: dict[str, Any], source: Path) -> ModelEntry:
    fields = {k: item[k] for k in ("name", "version", "sha256", "size", "description", "training_data", "licence",
                                   "file", "url", "model_card", "architecture", "homepage") if k in item}
    return ModelEntry(**fields, source=str(source))


def load_registry(extra: Sequence[str | os.PathLike] | None = None, include_env: bool = True) -> Registry:
    """Read the bundled model list and any extra lists.

    Args:
        extra: further list files (same format); their ``default`` is ignored, the bundled default stays.
        include_env: also read the files named in ``$CT2MR_MODEL_REGISTRY``.

    Returns:
        The merged :class:`Registry`. An extra list may add versions of a bundled name but not repeat one.

    Raises:
        RegistryError: a list is missing, not JSON, against the schema, or repeats a name/version pair.
    """
    paths = [MODELS_JSON, *(Path(p) for p in (extra or ()))]
    if include_env and os.environ.get(REGISTRY_ENV):
        paths += [Path(p) for p in os.environ[REGISTRY_ENV].split(os.pathsep) if p]
    registry: Registry | None = None
    for path in dict.fromkeys(Path(p).resolve() for p in paths):
        document = read_model_list(path)
        if registry is None:
            registry = Registry(default=document.get("default") or document["models"][0]["name"])
        for item in document["models"]:
            entry = _entry(item, path)
            if any(m.key == entry.key for m in registry.models):
                raise RegistryError(f"{path}: {entry.key} is already listed in another model list; give it a new "
                                    "version.")
            registry.models.append(entry)
        registry.sources.append(path)
    assert registry is not None
    return registry


def version_key(version: str) -> tuple:
    """Sort key of a version: numeric parts compare as numbers (``"0.10" > "0.9"``), text parts as text and before
    numbers (``"1.0-beta" < "1.0.1"``)."""
    return tuple((1, int(part), "") if part.isdigit() else (0, 0, part) for part in re.split(r"[.+_-]", version))


# --- cache ----------------------------------------------------------------------------------------------------------


def models_cache_dir() -> Path:
    """``$CT2MR_CACHE/models``, else ``platformdirs.user_cache_dir("ct2mr")/models`` (never the install tree)."""
    return cache_dir("models")


def _safe(part: str, what: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", part or ""):
        raise RegistryError(f"Invalid model {what} {part!r}: use letters, digits, '.', '_', '+' and '-'.")
    return part


def model_dir(name: str, version: str) -> Path:
    """The cache folder of one model version: ``<cache>/models/<name>/<version>``."""
    return models_cache_dir() / _safe(name, "name") / _safe(version, "version")


def _write_sidecar(folder: Path, entry: ModelEntry, origin: str, imported_from: str | None = None) -> None:
    data = {"entry": entry.to_dict(), "origin": origin, "added": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if imported_from:
        data["imported_from"] = imported_from
    from ct2mr.io.images import write_json

    write_json(folder / SIDECAR, data)


def cached_models(name: str | None = None) -> list[CachedModel]:
    """Models in the user cache (downloaded or imported), newest version first per name.

    Folders without a readable ``model.json`` or without their file (an interrupted copy) are skipped.

    Args:
        name: only this model.
    """
    root = models_cache_dir()
    found: list[CachedModel] = []
    if not root.is_dir():
        return found
    for sidecar in sorted(root.glob(f"*/*/{SIDECAR}")):
        try:
            data = json.loads(sidecar.read_text(encoding="utf-8"))
            entry = ModelEntry(**data["entry"], source=str(sidecar))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if name is not None and entry.name != name:
            continue
        path = sidecar.parent / entry.file_name
        if path.is_file():
            found.append(CachedModel(entry, path, data.get("origin", "download"), data.get("added", ""),
                                     data.get("imported_from")))
    found.sort(key=lambda c: (c.entry.name, version_key(c.entry.version)), reverse=True)
    found.sort(key=lambda c: c.entry.name)
    return found


def model_path(name: str | None = None, version: str | None = None, registry: Registry | None = None,
               download_missing: bool = False, progress: ProgressCallback | None = None) -> Path:
    """The local file of a model: bundled, cached (downloaded or imported), or downloaded now.

    Args:
        name: model name; ``None`` means the default model.
        version: version; ``None`` means the newest version available locally (cached or bundled) or, with
            ``download_missing``, the newest listed one.
        registry: the lists; ``None`` loads them.
        download_missing: download a listed version that is not cached yet.
        progress: download progress ``callback(bytes_done, bytes_total)``.

    Returns:
        The ``.safetensors`` path.

    Raises:
        RegistryError: unknown model, a damaged bundled file, or not available locally and ``download_missing`` is
            false (the message says how to download or import it).
        OSError, ct2mr.io.sampledata.ChecksumError: the download failed.
    """
    registry = registry or load_registry()
    name = name or registry.default
    cached = [c for c in cached_models(name) if version is None or c.entry.version == version]
    listed = [m for m in registry.versions(name) if version is None or m.version == version]
    local: list[tuple[tuple, Path, ModelEntry]] = [(version_key(c.entry.version), c.path, c.entry) for c in cached]
    for entry in listed:
        if entry.local_path is not None:
            local.append((version_key(entry.version), entry.local_path, entry))
    newest_listed = listed[0] if listed else None
    if local and download_missing and newest_listed is not None:
        if version_key(newest_listed.version) > max(item[0] for item in local):
            local = []  # a newer version is listed: fetch it
    if local:
        _, path, entry = max(local, key=lambda item: item[0])
        if entry.bundled and (not path.is_file() or path.stat().st_size != entry.size):
            raise RegistryError(f"The bundled model {entry.key} is missing or damaged at {path} (expected "
                                f"{entry.size} bytes); reinstall ct2mr, or fix the model list {entry.source}.")
        return path
    if not listed:
        registry.get(name, version)  # raises with the known names/versions
        raise RegistryError(f"Model {name} version {version} is neither listed nor cached.")
    entry = listed[0]
    if not download_missing:
        raise RegistryError(f"Model {entry.key} is not downloaded yet: run `ct2mr models download {entry.name} "
                            f"--version {entry.version}`, or import the file on an offline machine with "
                            "`ct2mr models import FILE`.")
    return download(entry, progress=progress)


def download(entry: ModelEntry, progress: ProgressCallback | None = None, timeout: float = 60.0) -> Path:
    """Download a listed model into its cache folder, verified against its SHA-256.

    Args:
        entry: a downloadable entry (with ``url``); for a bundled entry its file is returned as it is.
        progress: ``callback(bytes_done, bytes_total)``; ``bytes_total`` is the entry's size when the server does
            not say.
        timeout: seconds to wait for the server.

    Returns:
        The cached file. A file already there with the right SHA-256 is not downloaded again.

    Raises:
        RegistryError: the entry has neither a URL nor a bundled file.
        ct2mr.io.sampledata.ChecksumError: the bytes do not match the SHA-256 (nothing is kept).
        OSError: the server cannot be reached (nothing is kept).
    """
    from ct2mr.io.sampledata import fetch

    if entry.local_path is not None:
        return entry.local_path
    if not entry.url:
        raise RegistryError(f"Model {entry.key} has no URL to download from; import its file with "
                            "`ct2mr models import FILE`.")
    folder = model_dir(entry.name, entry.version)
    created = not folder.exists()

    def report(done: int, total: int) -> None:
        if progress is not None:
            progress(done, total or entry.size)

    try:
        path = fetch(entry.url, entry.sha256, folder / entry.file_name, timeout=timeout, progress=report)
        _write_sidecar(folder, entry, "download")
    except BaseException:
        if created:
            shutil.rmtree(folder, ignore_errors=True)
            _remove_empty(folder.parent)
        raise
    return path


def import_checkpoint(path: str | os.PathLike, name: str | None = None, version: str | None = None,
                      description: str | None = None) -> CachedModel:
    """Copy a local checkpoint into the cache, for machines that cannot download.

    The file is validated with :func:`ct2mr.models.checkpoint.verify_checkpoint` (a ct2mr safetensors checkpoint of a
    format this version understands, valid inference settings, and every tensor its architecture needs present with
    the right shape; needs torch), hashed, and copied atomically (:func:`ct2mr.io.images.atomic_write`: fsynced, header and
    size read back, SHA-256 compared). A file whose SHA-256 is listed takes that
    entry's name and version (an offline copy of a published model); otherwise the name comes from ``name``, the
    checkpoint's training name or the file stem, and the version from ``version`` or ``local-<first 12 hex digits
    of the SHA-256>``.

    Args:
        path: the ``.safetensors`` checkpoint.
        name: model name to file it under.
        version: version to file it under.
        description: description shown in model lists.

    Returns:
        The cached model.

    Raises:
        FileNotFoundError: no such file.
        ct2mr.models.checkpoint.CheckpointError: not a usable ct2mr checkpoint (e.g. a missing tensor, named).
        RegistryError: invalid name or version, or that name/version already holds a different file.
        ct2mr.io.images.OutputWriteError: the cache's disk is full (nothing left under the final name).
    """
    from ct2mr.models.checkpoint import verify_checkpoint
    from ct2mr.io.images import atomic_write

    source = Path(path)
    metadata = verify_checkpoint(source)
    sha256 = sha256sum(source)
    listed = load_registry().by_sha256(sha256)
    training = metadata.get("training") or {}
    if listed is not None and name is None and version is None:
        entry = ModelEntry(**{**listed.to_dict(), "file": listed.file_name}, source="imported")
    else:
        stem = re.sub(r"[^A-Za-z0-9._+-]+", "-", str(training.get("name") or source.stem)).strip("-.") or "model"
        name = _safe(name or stem, "name")
        version = _safe(version or f"local-{sha256[:12]}", "version")
        architecture = (metadata.get("architecture") or {}).get("generator") or {}
        entry = ModelEntry(
            name=name, version=version, sha256=sha256, size=source.stat().st_size,
            description=description or f"Imported from {source.name} ({training.get('preset') or 'ct2mr'} "
            f"checkpoint, {training.get('steps', '?')} training steps).",
            training_data=str(training.get("data") or "not recorded in the checkpoint"),
            licence=str(training.get("licence") or "unknown (imported file)"), file=f"{name}-{version}.safetensors",
            architecture=str(architecture.get("name") or architecture.get("type") or "") or None, source="imported")
    folder = model_dir(entry.name, entry.version)
    target = folder / entry.file_name
    if target.is_file():
        if sha256sum(target) != sha256:
            raise RegistryError(f"{entry.key} already holds a different file ({target}); import under another "
                                "--version, or `ct2mr models clear` it first.")
    else:
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_write(target) as tmp:
            shutil.copyfile(source, tmp)
            if sha256sum(tmp) != sha256:
                raise RegistryError(f"The copy of {source} does not match its SHA-256; the disk may be failing.")
    _write_sidecar(folder, entry, "import", str(source.resolve()))
    return next(c for c in cached_models(entry.name) if c.entry.version == entry.version)


def _remove_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def clear(name: str | None = None, version: str | None = None, keep_latest: bool = False) -> list[Path]:
    """Remove cached model versions (the bundled model is never touched).

    Args:
        name: only this model; ``None``: every cached model.
        version: only this version (needs ``name``).
        keep_latest: keep the newest cached version of each name (clear the old ones).

    Returns:
        The folders removed.

    Raises:
        ValueError: ``version`` without ``name``.
    """
    if version is not None and name is None:
        raise ValueError("Give the model name together with --version.")
    root = models_cache_dir()
    if not root.is_dir():
        return []
    removed: list[Path] = []
    names = [name] if name else sorted(p.name for p in root.iterdir() if p.is_dir())
    for model in names:
        base = root / _safe(model, "name")
        if not base.is_dir():
            continue
        folders = sorted((p for p in base.iterdir() if p.is_dir()), key=lambda p: version_key(p.name), reverse=True)
        if keep_latest:
            folders = folders[1:]
        for folder in folders:
            if version is None or folder.name == version:
                shutil.rmtree(folder)
                removed.append(folder)
        _remove_empty(base)
    return removed


# --- listing --------------------------------------------------------------------------------------------------------


def list_models(registry: Registry | None = None) -> list[dict[str, Any]]:
    """Every model version known here: listed ones (bundled, cached or downloadable) and imported ones.

    Returns:
        One dictionary per version (newest first within a name): the entry's fields plus ``status``
        (``"bundled"``, ``"cached"``, ``"imported"`` or ``"downloadable"``), ``path`` (``None`` when not local)
        and ``default`` (bool).
    """
    registry = registry or load_registry()
    cached = {(c.entry.name, c.entry.version): c for c in cached_models()}
    rows: list[dict[str, Any]] = []
    for name in registry.names():
        for entry in registry.versions(name):
            hit = cached.pop((entry.name, entry.version), None)
            if entry.local_path is not None:
                status, path = "bundled", entry.local_path
            elif hit is not None:
                status, path = ("imported" if hit.origin == "import" else "cached"), hit.path
            else:
                status, path = "downloadable", None
            rows.append({**entry.to_dict(), "status": status, "path": str(path) if path else None,
                         "default": entry.name == registry.default})
    for (name, version), hit in sorted(cached.items(), key=lambda kv: (kv[0][0], version_key(kv[0][1]))):
        rows.append({**hit.entry.to_dict(), "status": "imported" if hit.origin == "import" else "cached",
                     "path": str(hit.path), "default": False})
    return rows


def models_table(rows: Iterable[dict[str, Any]]) -> str:
    """A plain-text table of :func:`list_models` rows (name, version, size, status, licence, description)."""
    lines = [("NAME", "VERSION", "SIZE", "STATUS", "LICENCE", "DESCRIPTION")]
    for row in rows:
        size = f"{row['size'] / 1e6:.1f} MB"
        name = row["name"] + (" *" if row.get("default") else "")
        description = row.get("description", "")
        lines.append((name, row["version"], size, row["status"], row.get("licence", ""),
                      description if len(description) <= 60 else description[:57] + "..."))
    widths = [max(len(line[i]) for line in lines) for i in range(5)]
    text = "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)) + "  " + line[5]
                     for line in lines)
    return text + "\n(* default model)"
