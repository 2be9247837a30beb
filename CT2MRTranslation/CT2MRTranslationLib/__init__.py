"""Qt-free part of the CT2MRTranslation Slicer module.

Runs inside Slicer and in plain Python with the ``slicer-core`` wheel (DESIGN.md): it never imports ``qt`` or
``ctk``, never uses ``slicer.app``, and never imports torch (the engine runs in its own process).

Modules:
    logic: ``CT2MRTranslationLogic``, the small public face (translate, batches, models, devices, dependencies).
    options: one typed options object; vocabularies, ranges and defaults read from the engine's schema.
    jobs: a translation or a batch as background engine processes: start, events, progress, cancel, result.
    engine: the engine's command lines and failure messages.
    runner: the engine as a background process (JSON progress events, cancel of the process tree).
    models: model list, downloads and imports through the engine's registry.
    nodes: volume nodes to files and back with exact geometry; the outputs as nodes, display, subject hierarchy.
    views: the compare layouts (registered at module start-up), fitted views, the user's previous views.
    plots: histogram plot and metrics table from the engine's analysis JSON (nothing computed here).
    parameters: the module's parameters in a parameter node (saved and restored with the scene).
    install: the supported Slicer range; dependency check, pinned install plan, background installs.
    export: label transfer (segmentation over the synthetic MR, training pairs).
"""

from __future__ import annotations

__all__ = ["engine", "export", "install", "jobs", "logic", "models", "nodes", "options", "parameters", "plots",
           "runner", "views"]
