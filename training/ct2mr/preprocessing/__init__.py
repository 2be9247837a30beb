"""Preprocessing (thesis section 4.2): the chain from a scanner image to the network's [-1, 1] grid and back.

Modules:
    pipeline: orientation to a standard frame, resampling to an isotropic grid, CT windowing and MR percentile
        normalisation, padding to a multiple of the network's down-sampling factor, and the inverse to the input grid.
    orientation: direction cosines and the canonical RAS/LPS frame.
    masks: body, valid-region and evaluation masks.
    collections: a whole domain (every CT or every MR of files and folders) read and preprocessed
        (``load_domain``), for training, evaluation and the reference MRs of harmonisation.
    batch: ``ct2mr preprocess``: many volumes in parallel into the preprocessed-file format (resumable); the
        format itself is :mod:`ct2mr.io.preprocessed`.
"""
