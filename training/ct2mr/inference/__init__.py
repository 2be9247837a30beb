"""Inference: a trained generator applied to a whole volume, and what is built around it.

Modules:
    translate: sliding-window inference, ``translate_volume``/``translate_image``/``translate_file`` and outputs.
    fastpath: fused, reduced-precision inference networks.
    batch: ``ct2mr translate-batch``: many CTs, resumable, sharded over processes.
    cluster: which share of a case list this process takes (``RANK``/``WORLD_SIZE``), for batch and labeltransfer.
    harmonization: MR intensity harmonisation against reference MRs.
    uncertainty: test-time-augmentation uncertainty maps.
    ood: the out-of-distribution score of a CT against the model's training CTs.
    labeltransfer: synthetic MR datasets with the CT's labels (nnU-Net layout).
"""
