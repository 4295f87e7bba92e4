"""The input/output signatures of a bundle's models, recorded in the released manifest.

onnxruntime reads them (every extra that publishes has it; onnx does not come with
``edge``). A dimension is an integer, or the name of a dynamic axis.
"""

from __future__ import annotations

from typing import Any

from fogline.compression import onnxruntime_errors
from fogline.sync._bundle import Bundle
from fogline.sync.errors import BundleError

__all__ = ["model_signatures"]


def _tensors(args: Any) -> list[dict[str, Any]]:
    return [
        {
            "name": arg.name,
            "type": arg.type,
            "shape": [d if isinstance(d, int) else str(d) for d in (arg.shape or [])],
        }
        for arg in args
    ]


def model_signatures(bundle: Bundle) -> dict[str, Any]:
    """``{"edge": {"inputs": […], "outputs": […]}, "cloud": {…}}`` of ``bundle``."""
    import onnxruntime as ort

    out: dict[str, Any] = {}
    for part, path in (("edge", bundle.edge_model_path), ("cloud", bundle.cloud_model_path)):
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.log_severity_level = 3
        with onnxruntime_errors(into=BundleError, what=f"onnxruntime cannot load {path}"):
            session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            out[part] = {
                "inputs": _tensors(session.get_inputs()),
                "outputs": _tensors(session.get_outputs()),
            }
    return out
