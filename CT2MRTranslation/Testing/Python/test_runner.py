"""TranslationProcess with real subprocesses: JSON events, stderr, cancel of the whole process group."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
from CT2MRTranslationTestHelpers import processIsGone

from CT2MRTranslationLib.runner import (
    TranslationProcess,
    TranslationProcessProtocol,
    defaultPythonExecutable,
    engineCommand,
    parseEventLine,
)


def pythonScript(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def waitForEvents(process: TranslationProcess, count: int, timeout: float = 10.0) -> list[dict]:
    events: list[dict] = []
    deadline = time.monotonic() + timeout
    while len(events) < count and time.monotonic() < deadline:
        events += process.events()
        time.sleep(0.02)
    assert len(events) >= count, f"{count} events expected in {timeout} s, got {events}; stderr: {process.stderrTail}"
    return events


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('{"event": "progress", "fraction": 0.5}\n', {"event": "progress", "fraction": 0.5}),
        ('{"event": "done", "outputs": {}}', {"event": "done", "outputs": {}}),
        ("Loading weights...\n", {"event": "log", "message": "Loading weights..."}),
        ('{"fraction": 0.5}', {"event": "log", "message": '{"fraction": 0.5}'}),
        ("[1, 2]", {"event": "log", "message": "[1, 2]"}),
        ('{"event": 3}', {"event": "log", "message": '{"event": 3}'}),
        ("   \n", None),
        ("", None),
    ],
)
def test_parseEventLine(line, expected):
    assert parseEventLine(line) == expected


def test_engineCommand():
    assert engineCommand(["translate", "in.nrrd", "-o", "out"], python="/opt/py") == [
        "/opt/py", "-m", "ct2mr", "translate", "in.nrrd", "-o", "out"]
    command = engineCommand(["translate"])
    assert command[0] == (shutil.which("PythonSlicer") or sys.executable) == defaultPythonExecutable()
    assert command[1:] == ["-m", "ct2mr", "translate"]


def test_events_in_order_and_exit_status():
    process = TranslationProcess(pythonScript("""
        import json, sys
        print(json.dumps({"event": "start", "device": "cpu"}))
        print("a plain line")
        print(json.dumps({"event": "progress", "stage": "G", "fraction": 0.5, "message": "half"}))
        print("something went sideways", file=sys.stderr)
        print(json.dumps({"event": "done", "outputs": {"synthetic_mr": "x.nii.gz"}, "seconds": 1.5}))
    """))
    assert isinstance(process, TranslationProcessProtocol)
    assert process.wait(timeout=30) == 0
    assert process.poll() == 0 and process.returncode == 0
    events = process.events()
    assert [e["event"] for e in events] == ["start", "log", "progress", "done"]
    assert events[1]["message"] == "a plain line"
    assert events[2]["fraction"] == 0.5
    assert events[3]["outputs"] == {"synthetic_mr": "x.nii.gz"}
    assert process.events() == []  # drained
    assert process.stderrTail == "something went sideways"


def test_failure_keeps_stderr_tail():
    process = TranslationProcess(pythonScript("""
        import sys
        for i in range(100):
            print(f"line {i}", file=sys.stderr)
        sys.exit(3)
    """), stderrLines=5)
    assert process.wait(timeout=30) == 3
    assert process.stderrTail.splitlines() == [f"line {i}" for i in range(95, 100)]


def test_large_output_on_both_pipes_does_not_block():
    process = TranslationProcess(pythonScript("""
        import json, sys
        sys.stderr.write("x" * 2_000_000 + "\\n")
        for i in range(2000):
            print(json.dumps({"event": "progress", "fraction": i / 2000}))
        print(json.dumps({"event": "done", "outputs": {}}))
    """))
    assert process.wait(timeout=30) == 0
    events = process.events()
    assert len(events) == 2001 and events[-1]["event"] == "done"


def test_poll_is_none_while_running_and_wait_times_out():
    process = TranslationProcess(pythonScript("import time; time.sleep(30)"), cancelGracePeriod=1.0)
    try:
        assert process.poll() is None
        with pytest.raises(subprocess.TimeoutExpired):
            process.wait(timeout=0.2)
    finally:
        process.cancel()
    assert process.returncode is not None


@pytest.mark.skipif(os.name == "nt", reason="process groups and signals are POSIX")
@pytest.mark.parametrize("childIgnoresSigterm", [False, True])
def test_cancel_kills_the_whole_process_group(childIgnoresSigterm):
    # The child reports itself on the shared stdout once its SIGTERM handler is in place.
    childCode = (
        "import json, os, signal, time; "
        + ("signal.signal(signal.SIGTERM, signal.SIG_IGN); " if childIgnoresSigterm else "")
        + "print(json.dumps({'event': 'progress', 'child_pid': os.getpid()}), flush=True); time.sleep(120)"
    )
    process = TranslationProcess(pythonScript(f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", {childCode!r}])
        time.sleep(120)
    """), cancelGracePeriod=0.5)
    childPid = waitForEvents(process, 1)[0]["child_pid"]
    assert not processIsGone(process.pid) and not processIsGone(childPid)

    start = time.monotonic()
    process.cancel()
    assert time.monotonic() - start < 10
    assert process.cancelled
    assert process.returncode == -15  # SIGTERM reached the main process
    assert processIsGone(process.pid)
    deadline = time.monotonic() + 5
    while not processIsGone(childPid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processIsGone(childPid), "a child of the engine survived cancel()"
    assert process.poll() == -15


def test_cancel_after_exit_is_harmless():
    process = TranslationProcess(pythonScript("print('bye')"))
    assert process.wait(timeout=30) == 0
    process.cancel()
    assert process.returncode == 0
    assert process.events() == [{"event": "log", "message": "bye"}]


def test_missing_program_raises():
    with pytest.raises(FileNotFoundError):
        TranslationProcess(["/nonexistent/PythonSlicer", "-m", "ct2mr"])


def test_environment_is_unbuffered():
    process = TranslationProcess(pythonScript("""
        import json, os
        print(json.dumps({"event": "log", "message": os.environ.get("PYTHONUNBUFFERED")}))
    """), env={"PATH": os.environ.get("PATH", "")})
    assert process.wait(timeout=30) == 0
    assert process.events() == [{"event": "log", "message": "1"}]
    assert json.dumps(process.command)  # plain strings
