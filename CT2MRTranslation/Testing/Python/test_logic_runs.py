"""The Logic's run features on a real scene with real subprocesses: out-of-memory reports, device fallback, Advanced
options, harmonisation inputs, analysis nodes (from the engine's JSON), batches and sequences, device listing, model
list and downloads."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import sys
import threading
import time

import numpy as np
import pytest
import slicer
from CT2MRTranslationTestHelpers import FAKE_ENGINE, addSyntheticVolume, dataFile, processIsGone

from CT2MRTranslationLib import views
from CT2MRTranslationLib.engine import isOutOfMemoryMessage
from CT2MRTranslationLib.jobs import CT2MRTranslationBatch
from CT2MRTranslationLib.logic import CT2MRTranslationLogic
from CT2MRTranslationLib.runner import TranslationProcess


@pytest.fixture
def logic(tmp_path):
    logic = CT2MRTranslationLogic()
    logic.temporaryDirectory = str(tmp_path / "temporary")
    return logic


def argv(result, attempt=0):
    return [e for e in result.log if e["event"] == "start"][attempt]["argv"]


def option(arguments, name):
    return arguments[arguments.index(name) + 1] if name in arguments else None


def volumeCount(scene) -> int:
    return scene.GetNumberOfNodesByClass("vtkMRMLVolumeNode")


# --- out of memory ----------------------------------------------------------------------------------------------------


def test_isOutOfMemoryMessage():
    assert isOutOfMemoryMessage("Out of memory on cuda:0 while translating")
    assert isOutOfMemoryMessage("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
    assert not isOutOfMemoryMessage("fake failure") and not isOutOfMemoryMessage(None)


def countingFactory(fakeEngineFactory, mode):
    started = []

    def factory(engineArgs):
        started.append(engineArgs)
        return fakeEngineFactory(mode)(engineArgs)

    return factory, started


def test_the_engines_out_of_memory_retry_is_reported(mrml, logic, fakeEngineFactory):
    """The engine retries with fewer windows itself: one process, and its warning reaches the result."""
    factory, started = countingFactory(fakeEngineFactory, "oom")
    result = logic.translate(addSyntheticVolume(mrml.scene), device="cuda", swBatchSize=4, processFactory=factory,
                             setupLayout=False)
    assert len(started) == 1 and option(started[0], "--sw-batch-size") == "4"
    assert len(result.retryMessages) == 1 and "Out of memory on cuda:0 with 4 windows per pass" in result.retryMessages[0]
    assert volumeCount(mrml.scene) == 4 and os.listdir(logic.temporaryDirectory) == []


def test_out_of_memory_after_the_engines_retries_is_reported(mrml, logic, fakeEngineFactory):
    inputNode = addSyntheticVolume(mrml.scene)
    before = mrml.scene.GetNumberOfNodes()
    factory, started = countingFactory(fakeEngineFactory, "oomalways")
    with pytest.raises(RuntimeError) as error:
        logic.translate(inputNode, roiSize=96, processFactory=factory)
    text = str(error.value)
    assert text.startswith("CT to MR translation failed: Out of memory on cuda:0")
    assert "also after the engine's own retries" in text and "Choose the CPU" in text
    assert len(started) == 1  # no front-end retry: the heuristic is the engine's
    assert mrml.scene.GetNumberOfNodes() == before and os.listdir(logic.temporaryDirectory) == []


# --- device -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("device", "fallback"), [("cuda", True), ("cuda:1", True), ("auto", False), ("cpu", False)])
def test_device_fallback_is_reported(mrml, logic, fakeEngineFactory, device, fallback):
    result = logic.translate(addSyntheticVolume(mrml.scene), device=device, processFactory=fakeEngineFactory("ok"),
                             setupLayout=False)
    assert result.device == "cpu"
    assert option(argv(result), "--device") == device
    if fallback:
        assert "CUDA was requested but is not available" in result.deviceMessage
        assert "running on the CPU" in result.deviceMessage
    else:
        assert result.deviceMessage == ""


def test_device_query_in_a_separate_process(logic):
    fakeGPUs = ("import json; print(json.dumps({'event': 'done', 'torch': '2.5.1+cu124', 'cuda': '12.4', 'devices': "
                "[{'device': 'cuda:0', 'name': 'NVIDIA H200', 'memoryGiB': 139.8}, "
                "{'device': 'cuda:1', 'name': 'NVIDIA L4', 'memoryGiB': 22.0}]}))")
    process = logic.startDeviceQuery(lambda command: TranslationProcess([sys.executable, "-c", fakeGPUs]))
    process.wait(30)
    found = logic.deviceQueryResult(process)
    assert [d["name"] for d in found["devices"]] == ["NVIDIA H200", "NVIDIA L4"] and not found["error"]
    assert logic.deviceLabels(found["devices"]) == [
        ("auto", "auto (CUDA when available, else CPU)"), ("cuda:0", "cuda:0: NVIDIA H200, 139.8 GiB"),
        ("cuda:1", "cuda:1: NVIDIA L4, 22 GiB"), ("cpu", "cpu")]

    broken = logic.startDeviceQuery(lambda command: TranslationProcess([sys.executable, "-c", "import torch_absent"]))
    broken.wait(30)
    assert "No module named 'torch_absent'" in logic.deviceQueryResult(broken)["error"]


def test_device_query_with_the_real_torch(logic):
    """This machine's torch (CPU build here): no CUDA device, the CPU and auto remain."""
    found = logic.cudaDevices(timeout=120)
    assert not found["error"] and found["torch"]
    import torch

    assert len(found["devices"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    labels = logic.deviceLabels(found["devices"])
    assert labels[0][0] == "auto" and labels[-1] == ("cpu", "cpu")


# --- Advanced options, harmonisation, analysis ---------------------------------------------------------------------


def test_advanced_options_reach_the_engine(mrml, logic, fakeEngineFactory):
    inputNode = addSyntheticVolume(mrml.scene)
    reference = addSyntheticVolume(mrml.scene, "Reference MR")
    result = logic.translate(inputNode, overlap=0.5, roiSize=64, swBatchSize=2, precision="bf16",
                             harmonize="histogram", referenceMRNode=reference, processFactory=fakeEngineFactory("ok"),
                             setupLayout=False)
    arguments = argv(result)
    assert (option(arguments, "--overlap"), option(arguments, "--roi-size"), option(arguments, "--sw-batch-size"),
            option(arguments, "--precision"), option(arguments, "--harmonize")) == ("0.5", "64", "2", "bf16",
                                                                                     "histogram")
    referencePath = option(arguments, "--reference-mr")
    assert os.path.basename(referencePath) == "reference_mr.nrrd"
    assert os.path.commonpath([referencePath, logic.temporaryDirectory]) == logic.temporaryDirectory
    assert result.log[-1]["harmonize"] == "histogram"
    assert os.listdir(logic.temporaryDirectory) == []  # the written reference is removed too


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"roiSize": 50}, "roiSize must be a multiple of 16"),
        ({"roiSize": 1024}, "roiSize must be in \\[16, 512\\]"),
        ({"swBatchSize": -1}, "swBatchSize must be in \\[1, 64\\]"),
        ({"precision": "int8"}, "precision must be one of auto, fp32, bf16, fp16"),
        ({"harmonize": "magic"}, "harmonize must be one of none, histogram, nyul, zscore"),
        ({"harmonize": "nyul"}, "Harmonisation 'nyul' needs a reference MR"),
    ],
)
def test_invalid_advanced_options(mrml, logic, fakeEngineFactory, kwargs, message):
    with pytest.raises(ValueError, match=message):
        logic.translate(addSyntheticVolume(mrml.scene), processFactory=fakeEngineFactory("ok"), **kwargs)
    assert not os.path.exists(logic.temporaryDirectory) or os.listdir(logic.temporaryDirectory) == []


def test_zscore_without_reference_passes_no_reference(mrml, logic, fakeEngineFactory):
    result = logic.translate(addSyntheticVolume(mrml.scene), harmonize="zscore",
                             processFactory=fakeEngineFactory("ok"), setupLayout=False)
    assert option(argv(result), "--harmonize") == "zscore" and "--reference-mr" not in argv(result)


def test_analysis_nodes_and_layout_with_plot(mrml, logic, fakeEngineFactory):
    scene = mrml.scene
    ctNode = mrml.loadVolume(dataFile("ct/thorax_cta_heart_crop_1p5mm.nii.gz"), "Heart CT")
    reference = mrml.loadVolume(dataFile("mr/upper_abdomen_mr_3mm.nii.gz"), "Abdomen MR")
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = shNode.CreateStudyItem(shNode.CreateSubjectItem(shNode.GetSceneItemID(), "Patient"), "Study")
    shNode.CreateItem(study, ctNode)

    result = logic.translate(ctNode, referenceMRNode=reference, analysis=True,
                             processFactory=fakeEngineFactory("ok"))

    analysis = result.analysis
    assert analysis is not None and analysis.metricsError == ""
    assert "--analysis" in argv(result) and os.path.basename(option(argv(result), "--reference-mr")) == \
        "reference_mr.nrrd"  # the reference goes to the engine for the histogram and W1, without harmonisation
    engineAnalysis = result.log[-1]["analysis"]  # the table and plot show the engine's numbers, verbatim
    assert analysis.metrics == {row["name"]: row["value"] for row in engineAnalysis["rows"]}
    np.testing.assert_array_equal(slicer.util.arrayFromTableColumn(analysis.histogramTable, "Reference MR"),
                                  engineAnalysis["histogram"]["columns"]["Reference MR"])
    assert result.ctWindow == (-600.0, 1000.0)
    assert analysis.histogramTable.GetName() == "Heart CT histogram"
    assert [analysis.histogramTable.GetColumnName(i) for i in range(3)] == ["Intensity", "Synthetic MR",
                                                                          "Reference MR"]
    assert [s.GetYColumnName() for s in analysis.series] == ["Synthetic MR", "Reference MR"]
    assert analysis.chart.GetNumberOfPlotSeriesNodes() == 2
    metrics = [analysis.metricsTable.GetCellText(r, 0) for r in range(analysis.metricsTable.GetNumberOfRows())]
    assert metrics == ["MAE_cyc", "MAE_cyc (HU)", "W1"]  # the fake engine's rows, in its order
    assert analysis.metricsTable.GetCellText(1, 2) == "HU"
    assert result.displacementMap is None and result.anatomy == {}  # no warp check asked
    # the fake engine's MAE (HU): mean |F(G(x)) - x| in its body mask x > -500 HU, i.e. the clipping above 1000 HU
    ct = slicer.util.arrayFromVolume(ctNode).astype(np.float32)
    error = slicer.util.arrayFromVolume(result.errorMap)
    assert analysis.metrics["MAE_cyc (HU)"] == pytest.approx(float(error[ct > -500].mean()), rel=1e-4)
    for node in (analysis.histogramTable, analysis.chart, analysis.metricsTable):
        assert shNode.GetItemParent(shNode.GetItemByDataNode(node)) == study

    assert result.layoutId == views.COMPARE_ANALYSIS_LAYOUT_ID
    layoutNode = views.getOrCreateLayoutNode(scene)
    assert layoutNode.GetViewArrangement() == views.COMPARE_ANALYSIS_LAYOUT_ID
    plotView = scene.GetSingletonNode(views.PLOT_VIEW_NAME, "vtkMRMLPlotViewNode")
    tableView = scene.GetSingletonNode(views.TABLE_VIEW_NAME, "vtkMRMLTableViewNode")
    assert plotView.GetPlotChartNodeID() == analysis.chart.GetID()
    assert tableView.GetTableNodeID() == analysis.metricsTable.GetID()
    for column, node in zip(views.COMPARE_COLUMNS, (ctNode, *result.volumeNodes), strict=True):
        sliceNode = scene.GetSingletonNode(views.compareViewName(column, "Sagittal"), "vtkMRMLSliceNode")
        assert slicer.vtkMRMLSliceLogic.GetSliceCompositeNode(sliceNode).GetBackgroundVolumeID() == node.GetID()
    assert len(result.nodes) == 3 + 5


# --- batch and sequences ----------------------------------------------------------------------------------------------


def test_batch_of_volumes_with_overall_progress(mrml, logic, fakeEngineFactory):
    inputs = [addSyntheticVolume(mrml.scene, f"CT {i}") for i in range(3)]
    progress = []
    batch = logic.translateBatch(inputs, progressCallback=lambda f, m: progress.append((f, m)),
                                 processFactory=fakeEngineFactory("ok"), setupLayout=False)
    assert batch.state == "finished" and not batch.failures and batch.count == 3
    assert [r.syntheticMR.GetName() for r in batch.results] == [f"CT {i} synthetic MR" for i in range(3)]
    fractions = [f for f, _ in progress]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any(1 / 3 <= f < 2 / 3 for f in fractions) and any(2 / 3 <= f < 1 for f in fractions)
    assert progress[0][1].startswith("[1/3]") and any(m.startswith("[3/3]") for _, m in progress)
    assert progress[-1][1].startswith("Done: 3 of 3 translated")
    assert [label for label, event in batch.events if event["event"] == "done"] == ["CT 0", "CT 1", "CT 2"]
    assert [event["event"] for label, event in batch.events if label == "CT 1"][0] == "start"
    assert volumeCount(mrml.scene) == 3 + 9 and os.listdir(logic.temporaryDirectory) == []


def test_a_batch_is_one_engine_process(mrml, logic, fakeEngineFactory, tmp_path):
    """Two volumes: written once, ONE engine process (the model loaded once), each loaded as its case finishes."""
    inputs = [addSyntheticVolume(mrml.scene, "CT chest"), addSyntheticVolume(mrml.scene, "CT/abdomen 2")]
    factory, started = countingFactory(fakeEngineFactory, "ok,slow")  # the second case waits 0.5 s
    seen = set()
    batch = logic.startBatch(inputs, processFactory=factory, setupLayout=False, outputDirectory=str(tmp_path / "out"))
    deadline = time.monotonic() + 30
    while not batch.update():
        seen.add((len(batch.results), batch.process is not None and batch.process.poll() is None))
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert len(started) == 1 and batch.state == "finished" and not batch.failures
    arguments = started[0]
    listFile = arguments[1]
    assert arguments[0] == "translate" and listFile.endswith("inputs.txt") and "--overwrite" in arguments
    assert batch.engineArguments == arguments and option(arguments, "-o") == str(tmp_path / "out")
    cases = ["0001_CT_chest", "0002_CT_abdomen_2"]
    summary = json.loads((tmp_path / "out" / "translate_summary.json").read_text())
    assert batch.summaryPath == str(tmp_path / "out" / "translate_summary.json")
    assert [(case["case"], case["status"]) for case in summary["cases"]] == [(c, "done") for c in cases]
    assert [r.syntheticMR.GetName() for r in batch.results] == ["CT chest synthetic MR", "CT/abdomen 2 synthetic MR"]
    assert [r.outputDir for r in batch.results] == [str(tmp_path / "out" / c) for c in cases]
    for result, node in zip(batch.results, inputs, strict=True):
        ct = slicer.util.arrayFromVolume(node).astype(np.float32)
        np.testing.assert_allclose(slicer.util.arrayFromVolume(result.syntheticMR),
                                   np.clip((ct + 600) / 1600, 0, 1) * 2 - 1, atol=1e-5)
        assert [e["event"] for e in result.log][0] == "start" and result.log[-1]["event"] == "done"
        assert result.log[-1]["case"] in cases and result.ctWindow == (-600.0, 1000.0)
    assert [e["event"] for e in batch.engineLog].count("case_done") == 2
    assert [label for label, event in batch.events if event["event"] == "start"] == ["CT chest", "CT/abdomen 2"]
    assert (1, True) in seen, "the first volume is in the scene while the engine still runs the second"
    assert not os.path.exists(batch.workDir) and os.listdir(logic.temporaryDirectory) == []


def test_batch_goes_on_after_a_failure_unless_asked_to_stop(mrml, logic, fakeEngineFactory):
    good = addSyntheticVolume(mrml.scene, "good")
    label = mrml.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "no image")  # fails at start
    factory, started = countingFactory(fakeEngineFactory, "ok,fail,ok")  # one mode per case of the one process

    batch = logic.translateBatch([good, addSyntheticVolume(mrml.scene, "bad"), good], processFactory=factory,
                                 setupLayout=False)
    assert batch.state == "finished" and len(batch.results) == 2 and len(started) == 1
    assert batch.failures == [("bad", batch.failures[0][1])] and "fake failure" in batch.failures[0][1]
    assert batch.failures[0][1].startswith("CT to MR translation failed: fake failure")
    assert ("bad", {"event": "error", "message": batch.failures[0][1]}) in batch.events
    assert batch.message.startswith("Done: 2 of 3 translated") and batch.message.endswith("; 1 failed.")
    with pytest.raises(ValueError, match="no image data"):
        logic.translateBatch([good, label])
    factory, started = countingFactory(fakeEngineFactory, "fail")
    stopped = logic.translateBatch([good, good], processFactory=factory, stopOnError=True, setupLayout=False)
    assert stopped.state == "failed" and len(stopped.failures) == 1 and stopped.results == []
    assert len(started) == 1 and processIsGone(stopped.process.pid) and not os.path.exists(stopped.workDir)
    with pytest.raises(ValueError, match="No input"):
        logic.translateBatch([])
    assert os.listdir(logic.temporaryDirectory) == []


@pytest.mark.parametrize(("mode", "expected"), [
    ("ok,crash", "fake CUDA out of memory"),  # the engine dies at the second case: the rest fail with its words
    ("ok,shifted", "does not have the input's IJK-to-RAS matrix"),  # a case's outputs do not load: that item fails
])
def test_batch_failures_after_a_finished_item(mrml, logic, fakeEngineFactory, mode, expected):
    inputs = [addSyntheticVolume(mrml.scene, f"CT {i}") for i in range(3)]
    before = volumeCount(mrml.scene)
    batch = logic.translateBatch(inputs, processFactory=fakeEngineFactory(mode), setupLayout=False)
    assert batch.state == "finished" and [r.syntheticMR.GetName() for r in batch.results][0] == "CT 0 synthetic MR"
    assert [label for label, _ in batch.failures] == ["CT 1", "CT 2"]
    assert all(re.search(expected, message) for _, message in batch.failures), batch.failures
    assert volumeCount(mrml.scene) == before + 3 and os.listdir(logic.temporaryDirectory) == []


def test_batch_setup_errors_fail_every_item(mrml, logic, fakeEngineFactory):
    inputs = [addSyntheticVolume(mrml.scene, f"CT {i}") for i in range(2)]
    factory, started = countingFactory(fakeEngineFactory, "ok")
    batch = logic.translateBatch(inputs, processFactory=factory, harmonize="histogram")  # no reference MR
    assert batch.state == "finished" and started == [] and [label for label, _ in batch.failures] == ["CT 0", "CT 1"]
    assert all("needs a reference MR" in message for _, message in batch.failures)

    def missing(engineArgs):
        raise FileNotFoundError("no such interpreter")

    batch = logic.translateBatch(inputs, processFactory=missing)
    assert [label for label, _ in batch.failures] == ["CT 0", "CT 1"]
    assert all("Could not start the CT to MR engine" in message for _, message in batch.failures)
    assert os.listdir(logic.temporaryDirectory) == []


def test_batch_inputs_are_written_a_share_per_update(mrml, logic, fakeEngineFactory):
    """The GUI stays responsive: at most exportSeconds of writing per update(), then the engine starts."""
    inputs = [addSyntheticVolume(mrml.scene, f"CT {i}") for i in range(3)]
    progress = []
    batch = CT2MRTranslationBatch(logic, inputs, progressCallback=lambda f, m: progress.append(m),
                                  processFactory=fakeEngineFactory("ok"), setupLayout=False)
    batch.exportSeconds = 0.0  # one input per call
    assert not batch.update() and batch.process is None and progress[-1].endswith("Writing the inputs: 1 of 3")
    assert not batch.update() and batch.process is None
    assert not batch.update() and batch.process is not None  # the last one written, the engine started
    batch.run(pollInterval=0.02)
    assert batch.state == "finished" and len(batch.results) == 3


def test_cancel_a_batch_midway(mrml, logic, fakeEngineFactory):
    inputs = [addSyntheticVolume(mrml.scene, f"CT {i}") for i in range(3)]
    factory, started = countingFactory(fakeEngineFactory, "ok,sleep,ok")

    batch = logic.startBatch(inputs, processFactory=factory, setupLayout=False)
    deadline = time.monotonic() + 30
    while batch.index < 1 or batch.job is None or batch.job.fraction < 0.1:
        assert not batch.update() and time.monotonic() < deadline
        time.sleep(0.05)
    childPid = batch.job.log[-1]["child_pid"]
    workDir = batch.workDir
    assert 1 / 3 <= batch.fraction < 2 / 3 and os.path.isdir(workDir)
    process = batch.process

    batch.cancel()

    assert batch.state == "cancelled" and batch.update() and len(started) == 1
    assert batch.message == "Cancelled after 1 of 3."
    assert [r.syntheticMR.GetName() for r in batch.results] == ["CT 0 synthetic MR"]  # the finished one stays
    assert processIsGone(process.pid) and not os.path.exists(workDir)
    deadline = time.monotonic() + 5
    while not processIsGone(childPid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processIsGone(childPid)
    assert volumeCount(mrml.scene) == 3 + 3 and os.listdir(logic.temporaryDirectory) == []


@pytest.mark.slow
@pytest.mark.engine
def test_real_engine_batch_is_one_process_with_prefetch(mrml, logic, tmp_path):
    """The real engine: two CTs, one process (the model loaded once, the second CT read during the first one's
    translation), each with its analysis, loaded from the engine's per-case events."""
    import importlib.util

    if importlib.util.find_spec("ct2mr") is None:
        pytest.skip("the ct2mr engine is not installed")
    import SimpleITK as sitk

    from CT2MRTranslationLib.runner import engineCommand

    image = sitk.ReadImage(str(dataFile("ct/thorax_cta_heart_crop_1p5mm.nii.gz")))
    sitk.WriteImage(image[10:42, 10:42, 30:54], str(tmp_path / "a.nrrd"))
    sitk.WriteImage(image[30:62, 20:52, 30:54], str(tmp_path / "b.nrrd"))
    inputs = [mrml.loadVolume(tmp_path / "a.nrrd", "Heart A"), mrml.loadVolume(tmp_path / "b.nrrd", "Heart B")]
    reference = mrml.loadVolume(dataFile("mr/upper_abdomen_mr_3mm.nii.gz"), "Abdomen MR")
    started = []

    def factory(engineArgs):
        started.append(list(engineArgs))
        return TranslationProcess(engineCommand(engineArgs, python=sys.executable))

    batch = logic.translateBatch(inputs, processFactory=factory, device="cpu", analysis=True, referenceMRNode=reference,
                                 setupLayout=False, outputDirectory=str(tmp_path / "out"), timeout=600)

    assert batch.state == "finished" and not batch.failures, batch.failures
    assert len(started) == 1, "one engine process for the whole batch"
    summary = json.loads((tmp_path / "out" / "translate_summary.json").read_text())
    cases = {case["case"]: case for case in summary["cases"]}
    assert list(cases) == ["0001_Heart_A", "0002_Heart_B"] and {c["status"] for c in cases.values()} == {"done"}
    first, second = (case["timeline"] for case in cases.values())
    assert second["prepare_start"] < first["translate_end"], "the next CT is read while the current one translates"
    for result, node in zip(batch.results, inputs, strict=True):
        assert result.syntheticMR.GetName() == f"{node.GetName()} synthetic MR"
        assert slicer.util.arrayFromVolume(result.syntheticMR).shape == slicer.util.arrayFromVolume(node).shape
        assert result.device == "cpu" and result.ctWindow == (-1000.0, 1000.0)  # the default model v1.5
        rows = [result.analysis.metricsTable.GetCellText(r, 0)
                for r in range(result.analysis.metricsTable.GetNumberOfRows())]
        assert {"SSIM_cyc", "MAE_cyc (HU)", "W1"} <= set(rows)
    assert os.listdir(logic.temporaryDirectory) == []


def addSequence(scene, name, count):
    sequence = scene.AddNewNodeByClass("vtkMRMLSequenceNode", name)
    sequence.SetIndexName("time")
    sequence.SetIndexUnit("ms")
    sequence.SetIndexType(sequence.NumericIndex)
    for index in range(count):
        volume = addSyntheticVolume(scene, f"frame {index}")
        slicer.util.updateVolumeFromArray(volume, slicer.util.arrayFromVolume(volume) + 100 * index)
        sequence.SetDataNodeAtValue(volume, str(40 * index))
        scene.RemoveNode(volume)
    return sequence


def test_sequence_items_are_translated_into_output_sequences(mrml, logic, fakeEngineFactory):
    scene = mrml.scene
    sequence = addSequence(scene, "Cine CT", 3)
    browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", "Cine browser")
    browser.SetAndObserveMasterSequenceNodeID(sequence.GetID())
    single = addSyntheticVolume(scene, "Single CT")
    volumesBefore = volumeCount(scene)

    batch = logic.translateBatch([sequence, single], processFactory=fakeEngineFactory("ok"), computeMetrics=True)

    assert batch.state == "finished" and not batch.failures and batch.count == 4
    outputs = batch.outputSequences[sequence.GetID()]
    assert [o.GetName() for o in outputs] == ["Cine CT synthetic MR", "Cine CT round-trip CT", "Cine CT error map"]
    for output in outputs:
        assert output.GetNumberOfDataNodes() == 3 and output.GetIndexName() == "time" and output.GetIndexUnit() == "ms"
        assert [output.GetNthIndexValue(i) for i in range(3)] == ["0", "40", "80"]
        assert browser.IsSynchronizedSequenceNodeID(output.GetID(), True)
    frame2 = slicer.util.arrayFromVolume(sequence.GetNthDataNode(2)).astype(np.float32)
    synthetic2 = slicer.util.arrayFromVolume(outputs[0].GetNthDataNode(2))
    np.testing.assert_allclose(synthetic2, np.clip((frame2 + 600) / 1600, 0, 1) * 2 - 1, atol=1e-5)
    assert outputs[0].GetNthDataNode(1).GetName() == "Cine CT [40] synthetic MR"
    # the sequence items left no volume, table or chart in the scene; the single CT got its three + analysis
    assert [r.syntheticMR.GetName() for r in batch.results] == ["Single CT synthetic MR"]
    proxies = [browser.GetProxyNode(output) for output in outputs]  # made by the sequences logic, as in Slicer
    assert all(proxy is not None and proxy.IsA("vtkMRMLScalarVolumeNode") for proxy in proxies)
    assert volumeCount(scene) == volumesBefore + 3 + len(proxies)
    assert scene.GetNumberOfNodesByClass("vtkMRMLPlotChartNode") == 1
    assert os.listdir(logic.temporaryDirectory) == []


def test_cancelled_sequence_leaves_no_partial_output(mrml, logic, fakeEngineFactory):
    sequence = addSequence(mrml.scene, "Cine CT", 3)
    volumesBefore = volumeCount(mrml.scene)
    factory, started = countingFactory(fakeEngineFactory, "ok,sleep")
    batch = logic.startBatch([sequence], processFactory=factory)
    deadline = time.monotonic() + 30
    while batch.index < 1 or batch.job is None or batch.job.fraction < 0.1:
        assert not batch.update() and time.monotonic() < deadline
        time.sleep(0.05)
    assert batch.outputSequences and len(started) == 1  # the first item is in the output sequences
    assert volumeCount(mrml.scene) == volumesBefore  # no temporary input node lives while the engine runs
    batch.cancel()
    assert mrml.scene.GetNumberOfNodesByClass("vtkMRMLSequenceNode") == 1
    assert volumeCount(mrml.scene) == volumesBefore
    assert os.listdir(logic.temporaryDirectory) == []


# --- models ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def modelServer(tmp_path, monkeypatch):
    """A real HTTP server on 127.0.0.1 with one model file, a model list pointing to it, and a private user cache."""
    monkeypatch.setenv("CT2MR_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CT2MR_MODEL_REGISTRY", raising=False)
    root = tmp_path / "www"
    root.mkdir()
    payload = b"not really weights " * 160_000  # ~3 MB: the engine reads 1 MB blocks
    (root / "lung-m1-1.0.safetensors").write_bytes(payload)
    state = {"delay": 0.0}

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args):
            pass

        def copyfile(self, source, outputfile):  # slow on request, to cancel a download midway
            while block := source.read(64 * 1024):
                outputfile.write(block)
                outputfile.flush()
                time.sleep(state["delay"])

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"

    def modelList(sha256: str | None = None):
        entry = {"name": "lung-m1", "version": "1.0", "url": f"{url}/lung-m1-1.0.safetensors", "size": len(payload),
                 "sha256": sha256 or hashlib.sha256(payload).hexdigest(), "description": "test model",
                 "training_data": "none", "licence": "CC0-1.0"}
        path = tmp_path / "models.json"
        path.write_text(json.dumps({"models": [entry]}))
        return str(path)

    yield {"url": url, "payload": payload, "modelList": modelList, "cache": tmp_path / "cache" / "models",
           "state": state}
    httpd.shutdown()
    httpd.server_close()


def test_model_list_and_download_with_a_good_checksum(logic, modelServer):
    logic.registryFiles = [modelServer["modelList"]()]
    rows = {r["name"]: r for r in logic.modelList()}
    assert rows["ct2mr-default-v1.5"]["status"] == "bundled" and rows["ct2mr-default-v1.5"]["default"]
    assert rows["ct2mr-default-v1.0"]["status"] == "bundled" and not rows["ct2mr-default-v1.0"]["default"]
    assert rows["ct2mr-default-v0.2"]["status"] == "bundled" and not rows["ct2mr-default-v0.2"]["default"]
    assert rows["lung-m1"]["status"] == "downloadable" and rows["lung-m1"]["path"] is None
    for key in ("name", "version", "description", "training_data", "licence", "url", "sha256", "size"):
        assert rows["lung-m1"][key], key
    assert logic.modelPath() == rows["ct2mr-default-v1.5"]["path"]  # the default model is always there
    with pytest.raises(ValueError, match="not downloaded yet"):
        logic.modelPath("lung-m1")

    progress = []
    job = logic.startModelDownload("lung-m1", progressCallback=lambda f, m: progress.append(f))
    path = logic.finishModelDownload(job)

    assert path == str(modelServer["cache"] / "lung-m1" / "1.0" / "lung-m1-1.0.safetensors")
    assert open(path, "rb").read() == modelServer["payload"]
    assert progress and progress[-1] == 1.0 and job.version == "1.0"
    assert logic.modelPath("lung-m1") == path
    assert {r["name"]: r["status"] for r in logic.modelList()}["lung-m1"] == "cached"
    assert logic.clearModels("lung-m1") == [os.path.dirname(path)]


def test_download_with_a_bad_checksum_keeps_nothing(logic, modelServer):
    logic.registryFiles = [modelServer["modelList"]("0" * 64)]
    job = logic.startModelDownload("lung-m1", "1.0")
    with pytest.raises(RuntimeError, match="Downloading model lung-m1 failed: The file downloaded from .* has SHA-256"):
        logic.finishModelDownload(job)
    assert job.state == "failed"
    assert not modelServer["cache"].exists() or not any(modelServer["cache"].rglob("*"))


def test_cancel_a_download_leaves_no_partial_file(logic, modelServer):
    logic.registryFiles = [modelServer["modelList"]()]
    modelServer["state"]["delay"] = 0.05  # 64 KB every 50 ms: the first 1 MB block after ~0.8 s, the rest later
    job = logic.startModelDownload("lung-m1")
    deadline = time.monotonic() + 30
    while not (job.fraction > 0 and list(modelServer["cache"].rglob(".*.part"))):
        assert not job.update() and time.monotonic() < deadline
        time.sleep(0.05)
    logic.cancelModelDownload(job)
    assert job.state == "cancelled" and processIsGone(job.process.pid)
    assert not modelServer["cache"].exists() or not any(modelServer["cache"].rglob("*"))


def test_import_a_local_model_for_offline_use(logic, modelServer, tmp_path):
    from ct2mr.models.checkpoint import default_model_path

    copy = tmp_path / "from a usb stick.safetensors"
    copy.write_bytes(default_model_path().read_bytes())
    imported = logic.importModel(str(copy), "offline-model", "2.0")
    assert imported["path"] == str(modelServer["cache"] / "offline-model" / "2.0" / "offline-model-2.0.safetensors")
    assert logic.modelPath("offline-model") == imported["path"]
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a safetensors checkpoint"):
        logic.importModel(str(junk))


def test_the_logic_runs_the_engine_with_the_fake_when_asked(mrml, logic):
    """The factory can also be a plain command: the fake engine via python, without the fixture."""
    def factory(engineArgs):
        return TranslationProcess([sys.executable, str(FAKE_ENGINE), *engineArgs])

    result = logic.translate(addSyntheticVolume(mrml.scene), processFactory=factory, setupLayout=False)
    assert result.device == "cpu" and result.retryMessages == []


# --- the real engine (python -m ct2mr), on a crop of the real heart CT -----------------------------------------------


@pytest.fixture
def smallRealCT(mrml, tmp_path):
    """A 40 x 40 x 32 voxel crop (1.5 mm) of the real heart CT, loaded as Slicer loads files (a temporary file)."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(dataFile("ct/thorax_cta_heart_crop_1p5mm.nii.gz")))
    sitk.WriteImage(image[30:70, 30:70, 40:72], str(tmp_path / "crop.nrrd"))
    return mrml.loadVolume(tmp_path / "crop.nrrd", "Heart crop")


@pytest.mark.slow
@pytest.mark.engine
def test_real_engine_falls_back_to_the_cpu_and_adds_the_analysis(mrml, logic, smallRealCT):
    reference = mrml.loadVolume(dataFile("mr/upper_abdomen_mr_3mm.nii.gz"), "Abdomen MR")
    progress = []
    result = logic.translate(smallRealCT, device="cuda", analysis=True, referenceMRNode=reference,
                             progressCallback=lambda f, m: progress.append(f))
    if result.device.startswith("cuda"):
        assert result.device.startswith("cuda") and result.deviceMessage == ""
    else:
        assert result.device == "cpu"
        assert "CUDA was requested but is not available" in result.deviceMessage
    for node in result.volumeNodes:
        assert nodes_equal_grid(node, smallRealCT)
    assert progress[-1] == 1.0 and progress == sorted(progress)
    rows = [result.analysis.metricsTable.GetCellText(r, 0) for r in range(result.analysis.metricsTable.GetNumberOfRows())]
    assert {"SSIM_cyc", "MAE_cyc", "MAE_cyc (HU)", "W1", "Edge correlation", "GMS", "NMI"} <= set(rows)
    assert -1.0 <= result.analysis.metrics["SSIM_cyc"] <= 1.0 and result.analysis.metrics["W1"] >= 0.0
    assert result.ctWindow == (-1000.0, 1000.0)  # the default model v1.5
    assert os.listdir(logic.temporaryDirectory) == []


def nodes_equal_grid(node, reference) -> bool:
    from CT2MRTranslationLib import nodes

    return (nodes.volumeDimensions(node) == nodes.volumeDimensions(reference)
            and np.array_equal(nodes.ijkToRASMatrixAsNumpy(node), nodes.ijkToRASMatrixAsNumpy(reference)))


@pytest.mark.slow
@pytest.mark.engine
def test_real_engine_cancel_mid_run(mrml, logic):
    ctNode = mrml.loadVolume(dataFile("ct/thorax_cta_heart_crop_1p5mm.nii.gz"), "Heart CT")  # ~1 min on a CPU
    before = mrml.scene.GetNumberOfNodes()
    job = logic.startTranslation(ctNode, device="cpu")
    deadline = time.monotonic() + 120
    while not any(e.get("stage") == "G" for e in job.log):  # the networks are running
        assert not job.update(), job.log
        assert time.monotonic() < deadline
        time.sleep(0.1)
    pid = job.process.pid

    logic.cancel(job)

    assert job.state == "cancelled" and processIsGone(pid)
    assert mrml.scene.GetNumberOfNodes() == before
    assert os.listdir(logic.temporaryDirectory) == []
    with pytest.raises(RuntimeError, match="cancelled"):
        logic.finishTranslation(job)
