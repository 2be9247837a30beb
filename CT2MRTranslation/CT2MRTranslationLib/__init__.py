"""Qt-free part of the CT2MRTranslation Slicer module.

Runs inside Slicer and in plain Python with the ``slicer-core`` wheel (DESIGN.md): it never imports ``qt`` or
``ctk`` and never uses ``slicer.app``.

Modules:
    runner: the ``ct2mr`` engine as a background process (JSON progress events, cancel of the process tree).
    nodes: volume nodes to files and back with exact geometry; display; placement in subject hierarchy.
    views: the compare layout (CT | synthetic MR | round-trip CT | error map) with linked slice views.
    logic: ``CT2MRTranslationLogic``, which ties them together.
"""

from __future__ import annotations

__all__ = ["logic", "nodes", "runner", "views"]
