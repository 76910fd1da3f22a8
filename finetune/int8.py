"""``finetune export-onnx RUN --int8``: an int8 ONNX model for CPUs, by ONNX Runtime's static
quantization, and what it costs and saves.

The fp32 ``model.onnx`` is quantized in QDQ format (weights int8 per output channel, activations
uint8 per tensor) with activation ranges calibrated on training images of the run's own data,
preprocessed by the evaluation transform (``--calibration-images``, spread evenly over the
training set). Both files are then measured with ONNX Runtime on the run's test images
(accuracy) and on batches of 1 and 64 (latency, median); the numbers go into ``model.json``
(``onnx``) and the model card, so the choice is made on measurements.
"""

from __future__ import annotations

import json
import re
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from finetune.errors import ExportError
from finetune.export import META
from finetune.files import atomic_write, atomic_write_text
from finetune.inference import Predictor, load, single_label
from finetune.run_data import model_inputs, run_data

CALIBRATION = 512  # images whose activation ranges set the int8 scales
CARD_SECTION = "## ONNX"


def export_int8(run_dir: str | Path, fp32: Path, out: Path | None = None,
                calibration: int = CALIBRATION, overrides: list[str] | None = None) -> dict:
    """Write ``NAME.int8.onnx`` beside ``fp32`` (``NAME.onnx``; or ``out``); returns the
    measurements also written into the run's model.json and card."""
    try:
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError:
        raise ExportError("--int8 needs onnxruntime: pip install 'finetune[onnx]'.") from None
    run_dir = Path(run_dir)
    out = out or fp32.with_suffix(".int8.onnx")
    predictor = single_label(load(run_dir), "--int8 (its accuracy check)")
    train, test, source = run_data(run_dir, overrides or [], predictor, "--int8",
                                   "calibrate and measure")
    calib = _inputs(predictor, train, _spread(len(train), calibration))

    def write(tmp: Path) -> None:
        with tempfile.TemporaryDirectory() as folder:
            prepared = Path(folder) / "prepared.onnx"  # shapes inferred, graph optimized
            quant_pre_process(str(fp32), str(prepared))
            quantize_static(str(prepared), str(tmp), _Reader(calib), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8)
        _copy_metadata(fp32, tmp)

    atomic_write(out, write)
    report = {"calibration_images": len(calib), "calibration_data": f"{source} (train)",
              "test_images": len(test), "fp32": measure(fp32, predictor, test),
              "int8": measure(out, predictor, test)}
    report["int8"]["file"], report["fp32"]["file"] = out.name, fp32.name
    record_onnx(run_dir, report)
    return report


def _spread(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(n)`` (every class of a sorted folder)."""
    k = min(k, n)
    return sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(k)})


def _inputs(predictor: Predictor, split, indices: list[int]) -> np.ndarray:
    return model_inputs(predictor, split, indices).float().contiguous().cpu().numpy()


class _Reader:
    """ONNX Runtime's calibration data reader over batches of 32 inputs."""

    def __init__(self, inputs: np.ndarray) -> None:
        self.batches = iter([inputs[i:i + 32] for i in range(0, len(inputs), 32)])

    def get_next(self) -> dict | None:
        batch = next(self.batches, None)
        return None if batch is None else {"input": batch}


def _copy_metadata(source: Path, target: Path) -> None:
    """The preprocessing the input needs (metadata of the fp32 file) into the int8 file."""
    import onnx

    graph = onnx.load(str(target))
    del graph.metadata_props[:]
    for prop in onnx.load(str(source), load_external_data=False).metadata_props:
        graph.metadata_props.add(key=prop.key, value=prop.value)
    onnx.save(graph, str(target))


def measure(path: Path, predictor: Predictor, test, chunk: int = 1024) -> dict:
    """Test accuracy (``chunk`` images preprocessed at a time: memory stays bounded), and
    median latency (ms) at batch 1 and 64, with ONNX Runtime on the CPU."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    right = 0
    for start in range(0, len(test), chunk):
        inputs = _inputs(predictor, test, list(range(start, min(start + chunk, len(test)))))
        predicted = session.run(None, {"input": inputs})[0].argmax(1)
        right += int((predicted == test.labels[start:start + len(inputs)].numpy()).sum())
    result = {"test_acc": round(right / max(len(test), 1), 4),
              "size_mb": round(path.stat().st_size / 2**20, 2)}
    inputs = _inputs(predictor, test, list(range(min(64, len(test)))))
    for batch in (1, 64):
        x = np.ascontiguousarray(np.resize(inputs, (batch, *inputs.shape[1:])))
        result[f"latency_ms_batch{batch}"] = round(1000 * _median_seconds(session, x), 3)
    return result


def _median_seconds(session, x: np.ndarray, budget: float = 2.0) -> float:
    """Median seconds of a call on ``x``, after 3 warm-up calls: 10 to 200 calls, as many as
    ``budget`` seconds allow."""
    for _ in range(3):
        session.run(None, {"input": x})
    times: list[float] = []
    while len(times) < 10 or (len(times) < 200 and sum(times) < budget):
        start = time.perf_counter()
        session.run(None, {"input": x})
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def record_onnx(run_dir: Path, report: dict) -> None:
    """The measurements into ``model.json`` (``onnx``) and a section of the model card."""
    meta_path = run_dir / META
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    meta["onnx"] = report
    atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")
    card = run_dir / "README.md"
    if card.is_file():
        text = re.sub(rf"\n{CARD_SECTION}\n.*?(?=\n## |\Z)", "", card.read_text(encoding="utf-8"),
                      flags=re.S)
        atomic_write_text(card, text.rstrip("\n") + "\n\n" + card_section(report))


def card_section(report: dict) -> str:
    f, q = report["fp32"], report["int8"]
    rows = "\n".join(
        f"| `{r['file']}` | {100 * r['test_acc']:.2f} % | {r['latency_ms_batch1']:.2f} ms | "
        f"{r['latency_ms_batch64']:.1f} ms | {r['size_mb']:.1f} MB |" for r in (f, q))
    return (f"{CARD_SECTION}\n\nONNX Runtime on the CPU, {report['test_images']} test images; "
            f"int8 by static quantization calibrated on {report['calibration_images']} images of "
            f"{report['calibration_data']}:\n\n| file | test accuracy | latency, batch 1 | "
            f"latency, batch 64 | size |\n| --- | --- | --- | --- | --- |\n{rows}\n")
