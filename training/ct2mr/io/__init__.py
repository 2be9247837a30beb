"""Files in and out: image formats, DICOM series, HDF5, atomic writes, sample-data downloads, the nnU-Net layout.

Light on purpose: importing ``ct2mr.io`` loads nothing; each module names its own dependencies (the Slicer module
reads the model list through :mod:`ct2mr.io.cache` without NumPy or SimpleITK).

Modules:
    images: read/write images (NIfTI, NRRD, MHA, DICOM series, HDF5), atomic writes, listing input files.
    preprocessed: the preprocessed-volume HDF5 format of ``ct2mr preprocess``: recognise, read, lay out, up-to-date
        stamps.
    cache: the user cache folder and the SHA-256 of a file (standard library only).
    sampledata: the public sample volumes and their download.
    nnunet: the nnU-Net raw-dataset layout (image and label names, dataset.json).
"""
