"""pytest set-up for the CT2MRTranslation module: a real MRML scene from the ``slicer-core`` wheel.

The scene has the logics Slicer attaches at start-up that the module relies on: application logic, colour logic
(built-in colour tables), volumes logic and, unless a test asks otherwise, the layout logic. No MRML is mocked.
Real volumes come from ``<repo>/../shared/data`` (see its README); tests that need them skip when it is absent.
Helpers live in ``CT2MRTranslationTestHelpers.py`` (import them from there, not from ``conftest``).
"""

from __future__ import annotations

import sys

import pytest
from CT2MRTranslationTestHelpers import FAKE_ENGINE, closeScene, makeScene


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "engine: needs the real ct2mr engine package (skipped when not installed)")


@pytest.fixture
def mrml(tmp_path_factory: pytest.TempPathFactory):
    """A scene as Slicer sets it up: application, colour, volumes and layout logics attached."""
    fixture = makeScene(tmp_path_factory.mktemp("slicerHome"), withLayoutLogic=True)
    yield fixture
    closeScene(fixture)


@pytest.fixture
def mrmlWithoutLayoutLogic(tmp_path_factory: pytest.TempPathFactory):
    """A scene without layout logic (no layout node, no slice nodes), as in a bare Python script."""
    fixture = makeScene(tmp_path_factory.mktemp("slicerHome"), withLayoutLogic=False)
    yield fixture
    closeScene(fixture)


@pytest.fixture
def fakeEngineFactory():
    """Return ``factory(mode="ok")``: a process factory that runs the fake engine (a real subprocess)."""
    from CT2MRTranslationLib.runner import TranslationProcess

    started = []

    def factory(mode: str = "ok"):
        def makeProcess(engineArgs):
            process = TranslationProcess([sys.executable, str(FAKE_ENGINE), "--mode", mode, *engineArgs],
                                         cancelGracePeriod=1.0)
            started.append(process)
            return process

        return makeProcess

    yield factory
    for process in started:  # never leave a process behind, even when a test fails
        if process.poll() is None:
            process.cancel()
