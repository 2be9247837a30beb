"""The module's parameters in a parameter node, saved with the scene and restored with it.

The translation options among them (device, overlap, window size, windows per pass, precision, harmonisation, warp
check) take their vocabularies, ranges and defaults from the engine's schema (:mod:`CT2MRTranslationLib.options`),
and turn into one :class:`~CT2MRTranslationLib.options.TranslationOptions` (:meth:`translationOptions`).

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
from typing import Any

import slicer

from .options import OptionSpec, TranslationOptions, optionSpec

__all__ = [
    "MODULE_NAME",
    "CT2MRTranslationParameters",
    "NodeReference",
    "NodeReferenceList",
    "Parameter",
    "getParameterNode",
]

MODULE_NAME = "CT2MRTranslation"
"""Singleton tag and ``ModuleName`` attribute of the parameter node."""


_log = logging.getLogger(__name__)


class Parameter:
    """A typed value stored as a string parameter of the node.

    A parameter of a translation option (``option="overlap"``) takes its type, default, choices and range from the
    engine's schema (:mod:`CT2MRTranslationLib.options`); with ``zeroMeansEngine`` the value 0 stands for "the engine
    decides" (the schema's ``null``), as the panel's spin boxes show it.

    Args:
        key: parameter name in the node (and in the scene file).
        default: value when unset or unreadable (``option`` parameters: the schema's, or 0 for ``None``).
        kind: ``bool``, ``int``, ``float`` or ``str`` (``option`` parameters: from the schema).
        option: name of the engine option this parameter holds, or ``None``.
        zeroMeansEngine: 0 is accepted and means the schema's ``None`` default.
        doc: what it means (shown by ``help``).
    """

    def __init__(self, key: str, default: Any = None, kind: type | None = None, option: str | None = None,
                 zeroMeansEngine: bool = False, doc: str = "") -> None:
        self.key, self._default, self._kind, self.option = key, default, kind, option
        self.zeroMeansEngine = zeroMeansEngine
        self.__doc__ = doc

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    @property
    def spec(self) -> OptionSpec | None:
        """The engine option's schema entry, or ``None``."""
        return optionSpec(self.option) if self.option else None

    @property
    def kind(self) -> type:
        """The value's Python type."""
        if self._kind is not None or self.spec is None:
            return self._kind
        return {"string": str, "number": float, "integer": int, "boolean": bool}[self.spec.type]

    @property
    def default(self) -> Any:
        """The default value (for ``zeroMeansEngine`` parameters, 0 stands for the schema's ``None``)."""
        if self._default is not None or self.spec is None:
            return self._default
        default = self.spec.default
        return 0 if default is None and self.zeroMeansEngine else default

    @property
    def choices(self) -> tuple | None:
        """Accepted strings (``None``: any)."""
        return self.spec.choices if self.spec is not None else None

    @property
    def minimum(self) -> float | None:
        """Smallest accepted number (0 for ``zeroMeansEngine`` parameters)."""
        if self.spec is None:
            return None
        return 0 if self.zeroMeansEngine else self.spec.minimum

    @property
    def maximum(self) -> float | None:
        """Largest accepted number."""
        return self.spec.maximum if self.spec is not None else None

    def validate(self, value: Any) -> Any:
        """Return ``value`` converted to the parameter's type.

        Raises:
            ValueError: not convertible, not among the choices, outside the range (the message names what is
                allowed).
        """
        if self.kind is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(f"{self.name} must be true or false, got {value!r}.")
                return value.lower() in ("true", "1")
            return bool(value)
        if self.spec is None:
            try:
                return self.kind(value)
            except (TypeError, ValueError) as error:
                raise ValueError(f"{self.name} must be a {self.kind.__name__}, got {value!r}.") from error
        if self.zeroMeansEngine and value in (0, "0", 0.0):
            return 0
        try:
            return self.spec.check(value)
        except ValueError as error:
            text = str(error)
            if self.zeroMeansEngine:
                text += " (0: the engine decides)"
            raise ValueError(text.replace(self.spec.attribute, self.name, 1)) from error

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
    batchInputs = NodeReferenceList("BatchInput", "CT volumes and sequences translated in batch, by one engine process.")
    referenceMR = NodeReference("ReferenceMR", "Reference MR: histogram plot, W1 distance and harmonisation.")
    segmentation = NodeReference("Segmentation", "Segmentation of the CT, shown over the synthetic MR.")
    qualitySyntheticMR = NodeReference("QualitySyntheticMR", "Synthetic MR scored by QA against a reference.")
    qualityReferenceMR = NodeReference("QualityReferenceMR", "Registered reference MR (the CT's grid) of the QA.")

    batchMode = Parameter("BatchMode", False, bool, doc="Translate the batch inputs instead of the input volume.")
    modelName = Parameter("ModelName", "", str, doc="Model of the model list; empty: the default model.")
    modelVersion = Parameter("ModelVersion", "", str, doc="Version of the model; empty: the newest local one.")
    modelPath = Parameter("ModelPath", "", str, doc="A checkpoint file used instead of the model list; empty: none.")
    device = Parameter("Device", option="device", doc="auto (CUDA when available), cuda, cuda:N or cpu.")
    overlap = Parameter("Overlap", option="overlap", doc="Sliding-window overlap (engine schema's range).")
    roiSize = Parameter("RoiSize", option="roi_size", zeroMeansEngine=True,
                        doc="Sliding-window side in voxels (engine schema's range and multiple); 0: the model's.")
    swBatchSize = Parameter("SwBatchSize", option="sw_batch_size", zeroMeansEngine=True,
                            doc="Windows per forward pass; 0: the engine chooses from the free GPU memory (1 on CPU).")
    precision = Parameter("Precision", option="precision", doc="Autocast precision.")
    harmonize = Parameter("Harmonize", option="harmonize",
                          doc="Post-hoc intensity harmonisation of the synthetic MR (thesis 7.6).")
    computeMetrics = Parameter("ComputeMetrics", True, bool,
                               doc="The engine's analysis: metrics table and histogram plot after the translation.")
    warpCheck = Parameter("WarpCheck", option="warp_check",
                          doc="Anatomy check: register x to G(x) (B-spline, Mattes MI) and add the displacement map "
                              "(mm) and its mean/p95 to the metrics (thesis section 5, P1/E2); adds time.")
    uncertainty = Parameter("Uncertainty", option="uncertainty",
                            doc="Uncertainty map: none or tta (the spread of G(x) under test-time flips and shifts); "
                                "costs uncertaintyPasses extra passes of G; one volume at a time.")
    uncertaintyPasses = Parameter("UncertaintyPasses", option="uncertainty_passes",
                                  doc="Augmented passes of the tta uncertainty map (each one more pass of G).")
    oodCheck = Parameter("OodCheck", True, option="ood",
                         doc="Out-of-distribution check of the CT against the model's training CTs (about a second; "
                             "on by default here; one volume at a time: a batch of several volumes skips it).")
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

    def translationOptions(self, modelPath: str | None = None) -> TranslationOptions:
        """The :class:`TranslationOptions` of the parameters (0 window size or windows per pass: the engine decides).

        Args:
            modelPath: the checkpoint to run (a model of the list, resolved by the caller); ``None``: the parameter's
                checkpoint file, else the default model.
        """
        return TranslationOptions(
            modelPath=modelPath or self.modelPath or None, device=self.device, overlap=self.overlap,
            roiSize=self.roiSize or None, swBatchSize=self.swBatchSize or None, precision=self.precision,
            harmonize=self.harmonize, warpCheck=self.warpCheck, analysis=self.computeMetrics,
            uncertainty=self.uncertainty, uncertaintyPasses=self.uncertaintyPasses, ood=self.oodCheck)

    def translateKeywords(self, modelPath: str | None = None) -> dict[str, Any]:
        """Keyword arguments of :meth:`CT2MRTranslationLogic.translate` / ``startTranslation`` / ``startBatch``:
        ``options`` (:meth:`translationOptions`), ``referenceMRNode`` and ``setupLayout``."""
        return {"options": self.translationOptions(modelPath), "referenceMRNode": self.referenceMR,
                "setupLayout": self.showCompareLayout}
