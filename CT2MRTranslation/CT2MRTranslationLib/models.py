"""Models: the list, downloads, imports and clearing, all through the engine's registry (``ct2mr.models.registry``).

The model list, local paths and clearing read the engine's registry in this process (``ct2mr.models.registry`` needs no
torch). What reads a checkpoint or the network runs as an engine process: a download
(``ct2mr models download NAME --progress json``, in the background, SHA-256 checked, its partial file removed by the
engine itself when cancelled) and an import (``ct2mr models import FILE --json``, which checks the file is a ct2mr
checkpoint). The front end never touches the cache's layout.

No Qt here: runs inside Slicer and in plain Python with the ``slicer-core`` wheel.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import engine
from .runner import EngineEvent, TranslationProcessProtocol, engineCommand

__all__ = [
    "CT2MRModelDownloadJob",
    "clearModels",
    "importModel",
    "modelList",
    "modelPath",
]


def _registry(registryFiles: Sequence[str]):
    from ct2mr.models import registry  # the engine's registry: no torch

    return registry, registry.load_registry(list(registryFiles))


def modelList(registryFiles: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Every model version known (``ct2mr.models.registry.list_models``): name, version, description, training data,
    licence, URL, SHA-256, size, ``status`` (bundled, cached, imported, downloadable), ``path``.

    Raises:
        ImportError: the engine is not installed in this Python yet.
    """
    registry, listed = _registry(registryFiles)
    return registry.list_models(listed)


def modelPath(name: str | None = None, version: str | None = None, registryFiles: Sequence[str] = ()) -> str:
    """The local file of a model of the list (``None``: the default model).

    Raises:
        ValueError: unknown model, or not downloaded yet (the message says how to download or import it).
    """
    registry, listed = _registry(registryFiles)
    return str(registry.model_path(name or None, version or None, listed))


def clearModels(name: str | None = None, version: str | None = None, keepLatest: bool = False) -> list[str]:
    """Remove cached model versions (never the bundled model), through the engine's registry.

    Returns:
        The folders removed.
    """
    from ct2mr.models import registry

    return [str(p) for p in registry.clear(name or None, version or None, keepLatest)]


def importModel(path: str, name: str | None = None, version: str | None = None, python: str | None = None,
                timeout: float = 600.0) -> dict[str, Any]:
    """Copy a local checkpoint into the user cache (offline computers) with ``ct2mr models import FILE --json``,
    which checks that it is a ct2mr checkpoint (in an engine process: reading it needs torch).

    Args:
        path: the ``.safetensors`` file.
        name: model name (default: the listed name for a known SHA-256, else the file's).
        version: version (default: the listed one, else ``local-<SHA-256 prefix>``).
        python: interpreter that runs the engine (see :func:`runner.engineCommand`).
        timeout: seconds to wait.

    Returns:
        The cached model's entry with its ``path`` and ``status`` ``"imported"``.

    Raises:
        ValueError: not a ct2mr checkpoint, an invalid name/version, or the engine failed (its message).
    """
    arguments = ["import", str(path), "--json"]
    if name:
        arguments += ["--name", name]
    if version:
        arguments += ["--version", version]
    completed = subprocess.run(engineCommand(engine.modelsArguments(*arguments), python), capture_output=True,
                               text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if completed.returncode != 0:
        message = (completed.stderr.strip().splitlines() or ["the engine failed"])[-1]
        raise ValueError(f"Importing {path} failed: {message}")
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    return {**json.loads(lines[-1]), "status": "imported"}


@dataclass
class CT2MRModelDownloadJob:
    """A model download running in the background (``python -m ct2mr models download NAME --progress json``).

    Attributes:
        name: model name.
        version: model version (``None``: the newest listed).
        process: the engine process.
        progressCallback: ``progressCallback(fraction, message)``.
        fraction: latest progress in [0, 1].
        message: latest message.
        path: the downloaded file, once done.
        errorMessage: the engine's error, if any.
        state: ``"running"``, ``"finished"``, ``"failed"`` or ``"cancelled"``.
        log: every event.
    """

    name: str
    version: str | None
    process: TranslationProcessProtocol
    progressCallback: Callable[[float, str], None] | None = None
    fraction: float = 0.0
    message: str = "Starting the download"
    path: str | None = None
    errorMessage: str | None = None
    state: str = "running"
    log: list[EngineEvent] = field(default_factory=list)

    @staticmethod
    def arguments(name: str, version: str | None = None, registryFiles: Sequence[str] = ()) -> list[str]:
        """The engine arguments of a download."""
        extra = ["--version", version] if version else []
        return engine.modelsArguments("download", name, "--progress", "json", *extra, registryFiles=registryFiles)

    def update(self) -> bool:
        """Handle new events; ``True`` once the process has ended."""
        finished = self.process.poll() is not None
        for event in self.process.events():
            self.log.append(event)
            kind = event.get("event")
            if kind == "progress":
                self.fraction = min(max(float(event.get("fraction") or 0.0), 0.0), 1.0)
                self.message = f"Downloading {self.name}: {event.get('message', '')}"
            elif kind == "start" and event.get("version"):
                self.version = str(event["version"])
            elif kind == "done":
                self.path, self.fraction, self.message = event.get("path"), 1.0, f"Downloaded {self.name}"
            elif kind == "error":
                self.errorMessage = str(event.get("message") or "unknown error")
            if self.progressCallback is not None and kind in ("progress", "done"):
                self.progressCallback(self.fraction, self.message)
        return finished

    def finish(self) -> str:
        """Wait for the download to end and return the model file.

        Raises:
            RuntimeError: the download failed (unreachable server, wrong SHA-256: nothing is kept) or was cancelled.
        """
        if self.state != "running":
            raise RuntimeError(f"This download is {self.state}.")
        self.process.wait()
        self.update()
        if self.process.returncode != 0 or self.path is None:
            self.state = "failed"
            message = self.errorMessage or (self.process.stderrTail.strip().splitlines() or ["unknown error"])[-1]
            raise RuntimeError(f"Downloading model {self.name} failed: {message}")
        self.state = "finished"
        return self.path

    def cancel(self) -> None:
        """Stop the download; the engine removes its partial file (it handles the SIGTERM of the cancel)."""
        if self.state != "running":
            return
        self.process.cancel()
        self.state = "cancelled"
