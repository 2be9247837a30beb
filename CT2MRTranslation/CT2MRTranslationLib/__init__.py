"""Qt-free part of the CT2MRTranslation Slicer module.

Runs inside Slicer and in plain Python with the ``slicer-core`` wheel (DESIGN.md): it never imports ``qt`` or
``ctk`` and never uses ``slicer.app``.

Modules:
    runner: the ``ct2mr`` engine as a background process (JSON progress events, cancel of the process tree).
    nodes: volume nodes to files and back with exact geometry; display; placement in subject hierarchy.
    views: the compare layout (CT | synthetic MR | round-trip CT | error map) with linked slice views and cursors.
    plots: histogram table and plot chart (synthetic MR vs a reference MR), cycle metrics table.
    parameters: the module's parameters in a parameter node (saved and restored with the scene).
    install: dependency check and the pinned install plan (torch via the PyTorch extension, pip for the rest).
    export: label transfer (segmentation over the synthetic MR, training pairs).
    logic: ``CT2MRTranslationLogic``, which ties them together (single, batch and sequence translations, models).
"""

from __future__ import annotations

__all__ = ["export", "install", "logic", "nodes", "parameters", "plots", "runner", "views"]
