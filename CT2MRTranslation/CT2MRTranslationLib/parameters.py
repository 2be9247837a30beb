"""The module's parameters in a parameter node, saved with the scene and restored with it.

Every choice of the panel (input CT, batch inputs, reference MR, model, device, sliding-window settings,
harmonisation, analysis and warp check, export) lives in one ``vtkMRMLScriptedModuleNode``: the singleton of the
scene tagged ``"CT2MRTranslation"`` with the attribute ``ModuleName``, as Slicer's
``ScriptedLoadableModuleLogic.getParameterNode`` creates it. Values are strings (``SetParameter``), nodes are node
references (``SetNodeReferenceID``), so the scene file holds them and re-imports them.
:class:`CT2MRTranslationParameters` wraps the node with typed, validated
attributes (like Slicer's ``parameterNodeWrapper``, which needs Qt and is absent from the ``slicer-core`` wheel).

No Qt here: runs inside Slicer and in plain Python with the ``slicer-core`` wheel.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import slicer

__all__ = [
    "DEVICE_CHOICES",
    "HARMONIZATIONS",
    "MODULE_NAME",
    "PRECISIONS",
    "CT2MRTranslationParameters",
    "NodeReference",
    "NodeReferenceList",
    "Parameter",
    "getParameterNode",
]

MODULE_NAME = "CT2MRTranslation"
"""Singleton tag and ``ModuleName`` attribute of the parameter node."""

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
"""``ct2mr translate --precision`` values: auto = bf16/fp16 on CUDA, fp32 on the CPU."""

HARMONIZATIONS = ("none", "histogram", "nyul", "zscore")
"""``ct2mr translate --harmonize`` values (thesis 7.6); histogram and nyul need a reference MR."""

DEVICE_CHOICES = ("auto", "cuda", "cpu")
"""Device names always accepted; ``"cuda:N"`` (GPU number N) is accepted as well."""

_log = logging.getLogger(__name__)


class Parameter:
    """A typed value stored as a string parameter of the node.

    Args:
        key: parameter name in the node (and in the scene file).
        default: value when unset or unreadable.
        kind: ``bool``, ``int``, ``float`` or ``str``.
        choices: accepted values (``str`` parameters).
        minimum: smallest accepted value (numbers).
        maximum: largest accepted value (numbers).
        pattern: a callable that accepts further string values (e.g. ``"cuda:1"`` for the device).
        doc: what it means (shown by ``help``).
    """

    def __init__(self, key: str, default: Any, kind: type, choices: Sequence[Any] | None = None,
                 minimum: float | None = None, maximum: float | None = None, pattern=None, doc: str = "") -> None:
        self.key, self.default, self.kind = key, default, kind
        self.choices, self.minimum, self.maximum, self.pattern = choices, minimum, maximum, pattern
        self.__doc__ = doc

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def validate(self, value: Any) -> Any:
        """Return ``value`` converted to the parameter's type.

        Raises:
            ValueError: not convertible, not among the choices, or outside [minimum, maximum].
        """
        if self.kind is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(f"{self.name} must be true or false, got {value!r}.")
                value = value.lower() in ("true", "1")
            converted: Any = bool(value)
        else:
            try:
                converted = self.kind(value)
            except (TypeError, ValueError) as error:
                raise ValueError(f"{self.name} must be a {self.kind.__name__}, got {value!r}.") from error
        if self.choices is not None and converted not in self.choices and not (
                self.pattern is not None and self.pattern(converted)):
            raise ValueError(f"{self.name} must be one of {', '.join(map(str, self.choices))}"
                             f"{' (or cuda:N)' if self.pattern else ''}, got {converted!r}.")
        if self.minimum is not None and converted < self.minimum:
            raise ValueError(f"{self.name} must be >= {self.minimum}, got {converted!r}.")
        if self.maximum is not None and converted > self.maximum:
            raise ValueError(f"{self.name} must be <= {self.maximum}, got {converted!r}.")
        return converted

    def __get__(self, wrapper, owner=None):
        if wrapper is None:
            return self
        text = wrapper.node.GetParameter(self.key)
        if not text:
            return self.default
        try:
            return self.validate(text)
        except ValueError as error:
            _log.warning("Parameter node: %s; using the default %r.", error, self.default)
            return self.default

    def __set__(self, wrapper, value) -> None:
        value = self.validate(value)
        text = ("true" if value else "false") if self.kind is bool else (f"{value:g}" if self.kind is float
                                                                          else str(value))
        wrapper.node.SetParameter(self.key, text)


class NodeReference:
    """One referenced node (e.g. the input CT), stored as a node reference of the parameter node.

    Args:
        role: node reference role.
        doc: what it means.
    """

    def __init__(self, role: str, doc: str = "") -> None:
        self.role = role
        self.__doc__ = doc

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __get__(self, wrapper, owner=None):
        if wrapper is None:
            return self
        return wrapper.node.GetNodeReference(self.role)

    def __set__(self, wrapper, node) -> None:
        wrapper.node.SetNodeReferenceID(self.role, node.GetID() if node is not None else None)


class NodeReferenceList:
    """Several referenced nodes in order (e.g. the batch inputs), stored as numbered node references.

    Args:
        role: node reference role.
        doc: what it means.
    """

    def __init__(self, role: str, doc: str = "") -> None:
        self.role = role
        self.__doc__ = doc

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __get__(self, wrapper, owner=None):
        if wrapper is None:
            return self
        node = wrapper.node
        found = (node.GetNthNodeReference(self.role, i) for i in range(node.GetNumberOfNodeReferences(self.role)))
        return [n for n in found if n is not None]

    def __set__(self, wrapper, nodes) -> None:
        wrapper.node.RemoveNodeReferenceIDs(self.role)
        for node in nodes or ():
            wrapper.node.AddNodeReferenceID(self.role, node.GetID())


def _isCudaIndex(value: Any) -> bool:
    text = str(value)
    return text.startswith("cuda:") and text[5:].isdigit()


def getParameterNode(scene: slicer.vtkMRMLScene, moduleName: str = MODULE_NAME) -> slicer.vtkMRMLScriptedModuleNode:
    """Return the module's parameter node, creating it (with the defaults) when the scene has none.

    The node is what Slicer's ``ScriptedLoadableModuleLogic.getParameterNode`` returns: a singleton
    ``vtkMRMLScriptedModuleNode`` tagged ``moduleName`` with the attribute ``ModuleName``.

    Args:
        scene: the MRML scene.
        moduleName: the module's name.
    """
    node = scene.GetSingletonNode(moduleName, "vtkMRMLScriptedModuleNode")
    if node is not None:
        return node
    node = scene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
    node.UnRegister(None)  # CreateNodeByClass returns a new reference that Python already holds
    node.SetSingletonTag(moduleName)
    node.SetName(scene.GenerateUniqueName(moduleName))
    node.SetAttribute("ModuleName", moduleName)
    CT2MRTranslationParameters(node).setDefaults()
    return scene.AddNode(node)


class CT2MRTranslationParameters:
    """Typed view of the parameter node: read and assign attributes; the node (and the scene) keep the values.

    Args:
        node: the parameter node (see :func:`getParameterNode`).

    Example::

        parameters = CT2MRTranslationParameters.get(slicer.mrmlScene)
        parameters.overlap = 0.5
        logic.translate(parameters.inputVolume, **parameters.translateKeywords())
    """

    inputVolume = NodeReference("InputVolume", "CT volume to translate (HU).")
    batchInputs = NodeReferenceList("BatchInput", "CT volumes and sequences translated one after another in batch.")
    referenceMR = NodeReference("ReferenceMR", "Reference MR: histogram plot, W1 distance and harmonisation.")
    segmentation = NodeReference("Segmentation", "Segmentation of the CT, shown over the synthetic MR.")

    batchMode = Parameter("BatchMode", False, bool, doc="Translate the batch inputs instead of the input volume.")
    modelName = Parameter("ModelName", "", str, doc="Model of the model list; empty: the default model.")
    modelVersion = Parameter("ModelVersion", "", str, doc="Version of the model; empty: the newest local one.")
    modelPath = Parameter("ModelPath", "", str, doc="A checkpoint file used instead of the model list; empty: none.")
    device = Parameter("Device", "auto", str, choices=DEVICE_CHOICES, pattern=_isCudaIndex,
                       doc="auto (CUDA when available), cuda, cuda:N or cpu.")
    overlap = Parameter("Overlap", 0.25, float, minimum=0.0, maximum=0.95,
                        doc="Sliding-window overlap in [0, 0.95].")
    roiSize = Parameter("RoiSize", 0, int, minimum=0, maximum=512,
                        doc="Sliding-window side in voxels (multiple of 16); 0: the model's default.")
    swBatchSize = Parameter("SwBatchSize", 0, int, minimum=0, maximum=64,
                            doc="Windows per forward pass; 0: the engine chooses from the free GPU memory (1 on CPU).")
    precision = Parameter("Precision", "auto", str, choices=PRECISIONS, doc="Autocast precision.")
    harmonize = Parameter("Harmonize", "none", str, choices=HARMONIZATIONS,
                          doc="Post-hoc intensity harmonisation of the synthetic MR (thesis 7.6).")
    computeMetrics = Parameter("ComputeMetrics", True, bool,
                               doc="Cycle SSIM/PSNR/MAE table and histogram plot after the translation.")
    warpCheck = Parameter("WarpCheck", False, bool,
                          doc="Anatomy check: register x to G(x) (B-spline, Mattes MI) and add the displacement map "
                              "(mm) and its mean/p95 to the metrics (thesis section 5, P1/E2); adds time.")
    showCompareLayout = Parameter("ShowCompareLayout", True, bool, doc="Show the results in the compare layout.")
    exportPair = Parameter("ExportPair", False, bool, doc="Export (synthetic MR, segmentation) as a training pair.")
    exportFolder = Parameter("ExportFolder", "", str, doc="Dataset folder of the exported pairs.")

    def __init__(self, node: slicer.vtkMRMLScriptedModuleNode) -> None:
        if node is None or not node.IsA("vtkMRMLScriptedModuleNode"):
            raise ValueError("CT2MRTranslationParameters needs a vtkMRMLScriptedModuleNode.")
        self.node = node

    @classmethod
    def get(cls, scene: slicer.vtkMRMLScene) -> CT2MRTranslationParameters:
        """The parameters of ``scene`` (its parameter node is created when missing)."""
        return cls(getParameterNode(scene))

    @classmethod
    def parameters(cls) -> list[Parameter]:
        """Every value parameter, in declaration order."""
        return [value for value in vars(cls).values() if isinstance(value, Parameter)]

    def setDefaults(self, overwrite: bool = False) -> None:
        """Write the default of every parameter that is unset (or of all, with ``overwrite``)."""
        wasModifying = self.node.StartModify()
        for parameter in self.parameters():
            if overwrite or not self.node.GetParameter(parameter.key):
                parameter.__set__(self, parameter.default)
        self.node.EndModify(wasModifying)

    def toDict(self) -> dict[str, Any]:
        """Every value parameter and node reference (node IDs) by attribute name."""
        values: dict[str, Any] = {p.name: getattr(self, p.name) for p in self.parameters()}
        for name, value in vars(type(self)).items():
            if isinstance(value, NodeReference):
                node = getattr(self, name)
                values[name] = node.GetID() if node is not None else None
            elif isinstance(value, NodeReferenceList):
                values[name] = [node.GetID() for node in getattr(self, name)]
        return values

    def translateKeywords(self) -> dict[str, Any]:
        """Keyword arguments of :meth:`CT2MRTranslationLogic.translate` / ``startTranslation`` from the parameters
        (``modelPath`` is the checkpoint file only; a model of the list is resolved by the Logic)."""
        return {
            "modelPath": self.modelPath or None,
            "device": self.device,
            "overlap": self.overlap,
            "roiSize": self.roiSize or None,
            "swBatchSize": self.swBatchSize or None,
            "precision": self.precision,
            "harmonize": self.harmonize,
            "referenceMRNode": self.referenceMR,
            "computeMetrics": self.computeMetrics,
            "warpCheck": self.warpCheck,
            "setupLayout": self.showCompareLayout,
        }
