"""Models: the checkpoint format (safetensors + JSON, no pickle), the model list, and the bundled models.

Modules:
    checkpoint: save and load checkpoints; the bundled default model.
    registry: the list of known models, their download and import into the user cache (no torch; Slicer reads it).
"""
