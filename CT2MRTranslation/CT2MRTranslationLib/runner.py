"""The CT-to-MR translation engine as a background process.

Inference from Slicer runs in a separate process (DESIGN.md, "Choices already made"): the GUI never freezes,
Cancel kills the whole process tree and GPU memory is freed when the process ends. The engine reports progress as
one JSON object per stdout line (``ct2mr translate --progress json``); this module turns those lines into event
dictionaries that the Logic drains without blocking.

No Qt here: this module runs inside Slicer and in plain Python (pytest with the ``slicer-core`` wheel).
"""

from __future__ import annotations

import collections
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "DEVICE_QUERY_CODE",
    "EngineEvent",
    "ProcessFactory",
    "TranslationProcess",
    "TranslationProcessProtocol",
    "defaultPythonExecutable",
    "deviceQueryCommand",
    "engineCommand",
    "parseEventLine",
]

EngineEvent = dict[str, Any]
"""One engine event, e.g. ``{"event": "progress", "stage": "G", "fraction": 0.4, "message": "..."}``."""


@runtime_checkable
class TranslationProcessProtocol(Protocol):
    """What the Logic needs from a running translation process.

    :class:`TranslationProcess` implements it; tests inject a real small process through the same interface
    (dependency injection as in SlicerNNUNet, DESIGN.md "Style anchors").
    """

    @property
    def returncode(self) -> int | None:
        """Exit status once finished, else ``None``."""
        ...

    @property
    def stderrTail(self) -> str:
        """The last lines the process wrote to stderr (for error messages)."""
        ...

    def events(self) -> list[EngineEvent]:
        """Return the events received since the last call, without blocking."""
        ...

    def poll(self) -> int | None:
        """Return the exit status once the process has ended and its output is read, else ``None``."""
        ...

    def wait(self, timeout: float | None = None) -> int:
        """Block until the process has ended and its output is read; return the exit status."""
        ...

    def cancel(self) -> None:
        """Stop the process and every process it started."""
        ...


ProcessFactory = Callable[[Sequence[str]], TranslationProcessProtocol]
"""Builds a running process from the engine's arguments (``["translate", INPUT, "-o", OUT_DIR, ...]``)."""


def defaultPythonExecutable() -> str:
    """Return the Python interpreter that should run the engine.

    Inside Slicer ``sys.executable`` is the Slicer application itself, so the launcher ``PythonSlicer`` (which sets
    up Slicer's Python environment) is preferred when it is on ``PATH``; in plain Python ``sys.executable`` is used.

    Returns:
        Path or command name of the interpreter.
    """
    return shutil.which("PythonSlicer") or sys.executable


def engineCommand(args: Sequence[str], python: str | None = None) -> list[str]:
    """Build the command line that runs the ``ct2mr`` engine as a module.

    Args:
        args: engine arguments, e.g. ``["translate", "in.nrrd", "-o", "out", "--progress", "json"]``.
        python: interpreter to use; ``None`` means :func:`defaultPythonExecutable`.

    Returns:
        ``[python, "-m", "ct2mr", *args]``.
    """
    return [python or defaultPythonExecutable(), "-m", "ct2mr", *[str(a) for a in args]]


DEVICE_QUERY_CODE = """
import json
try:
    import torch
except Exception as error:
    print(json.dumps({"event": "error", "message": f"PyTorch cannot be imported: {error}"}), flush=True)
    raise SystemExit(1)
devices = []
if torch.cuda.is_available():
    for index in range(torch.cuda.device_count()):
        properties = torch.cuda.get_device_properties(index)
        devices.append({"device": f"cuda:{index}", "name": properties.name,
                        "memoryGiB": round(properties.total_memory / 2 ** 30, 1)})
print(json.dumps({"event": "done", "torch": torch.__version__, "cuda": torch.version.cuda, "devices": devices}),
      flush=True)
"""
"""Python code that reports the CUDA devices PyTorch sees as one ``done`` event (``devices``: ``device``, ``name``,
``memoryGiB``). It runs in a separate process so that the GUI process never creates a CUDA context (which would keep
GPU memory for as long as Slicer runs)."""


def deviceQueryCommand(python: str | None = None) -> list[str]:
    """Build the command line that lists the CUDA devices (:data:`DEVICE_QUERY_CODE`).

    Args:
        python: interpreter to use; ``None`` means :func:`defaultPythonExecutable`.
    """
    return [python or defaultPythonExecutable(), "-c", DEVICE_QUERY_CODE]


def parseEventLine(line: str) -> EngineEvent | None:
    """Turn one stdout line of the engine into an event dictionary.

    Args:
        line: one line of text, with or without its line ending.

    Returns:
        The parsed JSON object when the line is a JSON object with an ``"event"`` key; ``None`` for an empty line;
        otherwise ``{"event": "log", "message": line}`` (engines and libraries also print plain text).
    """
    text = line.rstrip("\r\n")
    if not text.strip():
        return None
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if isinstance(value, dict) and isinstance(value.get("event"), str):
        return value
    return {"event": "log", "message": text}


class TranslationProcess:
    """Run a command in the background and collect its JSON event lines.

    The process starts in a new session (its own process group on POSIX, a new process group on Windows) so that
    :meth:`cancel` can stop it together with every process it started (data loader workers, ``torchrun`` children).
    A reader thread parses each stdout line with :func:`parseEventLine` into a queue; another keeps the tail of
    stderr so that a failure can be reported with the engine's own words. Both pipes are drained continuously, so
    a chatty process can never block on a full pipe.

    Args:
        command: program and arguments, e.g. from :func:`engineCommand`.
        env: environment for the process; ``None`` means a copy of this process's environment. ``PYTHONUNBUFFERED=1``
            is always set so that progress lines arrive as they are printed.
        cwd: working directory of the process.
        cancelGracePeriod: seconds :meth:`cancel` waits after SIGTERM before it sends SIGKILL.
        stderrLines: how many of the last stderr lines to keep.

    Raises:
        FileNotFoundError: the program does not exist (raised by ``subprocess.Popen``).
    """

    def __init__(
        self,
        command: Sequence[str],
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        cancelGracePeriod: float = 5.0,
        stderrLines: int = 50,
    ) -> None:
        self.command = [str(c) for c in command]
        self.cancelGracePeriod = float(cancelGracePeriod)
        self.cancelled = False
        self._events: queue.SimpleQueue[EngineEvent] = queue.SimpleQueue()
        self._stderr: collections.deque[str] = collections.deque(maxlen=stderrLines)
        processEnv = dict(os.environ if env is None else env)
        processEnv["PYTHONUNBUFFERED"] = "1"
        kwargs: dict[str, Any] = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            kwargs["start_new_session"] = True
        self._process = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            env=processEnv,
            cwd=cwd,
            **kwargs,
        )
        self._readers = [
            threading.Thread(target=self._readStdout, name="CT2MR-stdout", daemon=True),
            threading.Thread(target=self._readStderr, name="CT2MR-stderr", daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    # ------------------------------------------------------------------ readers (background threads)

    def _readStdout(self) -> None:
        assert self._process.stdout is not None
        with self._process.stdout as stream:
            for line in stream:
                event = parseEventLine(line)
                if event is not None:
                    self._events.put(event)

    def _readStderr(self) -> None:
        assert self._process.stderr is not None
        with self._process.stderr as stream:
            for line in stream:
                self._stderr.append(line.rstrip("\r\n"))

    # ------------------------------------------------------------------ public interface

    @property
    def pid(self) -> int:
        """Process id of the started command (on POSIX also the id of its process group)."""
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        """Exit status once the process has ended (negative signal number on POSIX when killed), else ``None``."""
        return self._process.returncode

    @property
    def stderrTail(self) -> str:
        """The last ``stderrLines`` lines written to stderr, joined with newlines."""
        return "\n".join(self._stderr)

    def events(self) -> list[EngineEvent]:
        """Return every event received since the previous call, in order, without blocking."""
        drained = []
        while True:
            try:
                drained.append(self._events.get_nowait())
            except queue.Empty:
                return drained

    def poll(self, readerTimeout: float = 0.0) -> int | None:
        """Return the exit status once the process has ended and both pipes are read to the end, else ``None``.

        Args:
            readerTimeout: seconds to wait for the reader threads after the process has ended.
        """
        if self._process.poll() is None:
            return None
        for reader in self._readers:
            reader.join(readerTimeout)
        if any(reader.is_alive() for reader in self._readers):
            # A child that inherited the pipes can keep them open after the main process ended.
            return None
        return self._process.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Block until the process has ended and its output is read.

        Args:
            timeout: seconds to wait at most; ``None`` waits forever.

        Returns:
            The exit status.

        Raises:
            subprocess.TimeoutExpired: the process is still running after ``timeout`` seconds.
        """
        start = time.monotonic()
        returnCode = self._process.wait(timeout)
        remaining = None if timeout is None else max(0.0, timeout - (time.monotonic() - start))
        for reader in self._readers:
            reader.join(remaining)
        return returnCode

    def cancel(self) -> None:
        """Stop the process and every process in its group.

        On POSIX the group receives SIGTERM; after ``cancelGracePeriod`` seconds (or as soon as the main process has
        ended) it receives SIGKILL, so children that ignore SIGTERM are stopped too. On Windows the tree is killed
        with ``taskkill /T /F``, falling back to killing the main process. Calling it on a finished process only
        makes sure that no child of it is left.
        """
        self.cancelled = True
        if os.name == "nt":
            self._cancelWindows()
        else:
            self._signalGroup(signal.SIGTERM)
            try:
                self._process.wait(self.cancelGracePeriod)
            except subprocess.TimeoutExpired:
                pass
            self._signalGroup(signal.SIGKILL)
        try:
            self._process.wait(self.cancelGracePeriod)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        for reader in self._readers:
            reader.join(1.0)

    def _signalGroup(self, signalNumber: int) -> None:
        try:
            # start_new_session=True makes the process the leader of a group whose id is its pid.
            os.killpg(self._process.pid, signalNumber)
        except (ProcessLookupError, PermissionError):
            pass

    def _cancelWindows(self) -> None:
        if self._process.poll() is not None:
            return
        try:
            subprocess.run(
                ["taskkill", "/T", "/F", "/PID", str(self._process.pid)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=30,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            pass
        if self._process.poll() is None:
            self._process.kill()

    def __repr__(self) -> str:
        return f"TranslationProcess(pid={self.pid}, returncode={self.returncode}, command={self.command!r})"
