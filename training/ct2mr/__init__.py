"""ct2mr: unpaired 3D CT -> MR translation for thoracic imaging (the engine of CT2MRTranslation).

Founding specification: Arifette, "CT to MRI Translation using CycleGAN for Medical Imaging Applications" (thesis).
The engine knows no front end: it never imports ``slicer`` or ``qt``.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
