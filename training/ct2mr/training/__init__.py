"""Training (thesis chapters 5-6): configuration, unpaired patch data, the CycleGAN trainer and the intensity law.

Modules:
    config: the run configuration (dataclasses, YAML presets, validation).
    data: volumes of each domain, the train/validation split, unpaired patch sampling.
    trainer: the CycleGAN trainer (losses, optimisers, checkpoints, resume, DDP) and ``train``.
    intensity_law: the unpaired CT -> MR intensity law fitted before training (issue 13).
"""
