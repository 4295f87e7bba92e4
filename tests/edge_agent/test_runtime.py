"""The edge model in onnxruntime: checked against the bundle, warmed up, run in batches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fogline.edge_agent import InputError, ModelError
from fogline.edge_agent._runtime import EdgeRuntime
from fogline.sync import Bundle, write_manifest
from tests.edge_agent.conftest import edge_outputs, frames


def _with_edge(bundle_dir: Path, **changes: object) -> Bundle:
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    manifest["edge"].update(changes)
    write_manifest(bundle_dir, manifest)
    return Bundle.load(bundle_dir)


def test_the_runtime_reports_the_model_input_and_runs_a_batch(tiny_bundle: Path) -> None:
    rt = EdgeRuntime(Bundle.load(tiny_bundle), max_batch=4, warmup_runs=1)
    assert not rt.ready
    rt.warm_up()
    assert rt.ready
    assert rt.input.name == "frame"
    assert rt.input.item_shape == (1, 8, 8)
    assert rt.input.dtype == np.uint8
    assert rt.input.item_nbytes == 64
    batch = frames(3)
    out = rt.run(batch)
    assert set(out) == {"features", "relevance", "exit_probs"}
    np.testing.assert_allclose(out["features"], edge_outputs(tiny_bundle, batch)["features"])


def test_a_batch_larger_than_max_batch_runs_in_chunks_with_the_same_result(
    tiny_bundle: Path,
) -> None:
    rt = EdgeRuntime(Bundle.load(tiny_bundle), max_batch=4, warmup_runs=0)
    batch = frames(11)
    out = rt.run(batch)
    want = edge_outputs(tiny_bundle, batch)
    for name in ("features", "relevance", "exit_probs"):
        assert out[name].shape[0] == 11
        np.testing.assert_allclose(out[name], want[name], rtol=1e-5, atol=1e-6)


def test_a_declared_output_missing_from_the_model_is_named(tiny_bundle: Path) -> None:
    bundle = _with_edge(tiny_bundle, exit_output="exit_logits_missing")
    with pytest.raises(ModelError, match="lacks declared outputs \\['exit_logits_missing'\\]"):
        EdgeRuntime(bundle)


def test_a_declared_input_missing_from_the_model_is_named(tiny_bundle: Path) -> None:
    bundle = _with_edge(tiny_bundle, input="image")
    with pytest.raises(ModelError, match="has no input 'image'"):
        EdgeRuntime(bundle)


def test_a_corrupt_model_file_is_a_model_error(tiny_bundle: Path) -> None:
    (tiny_bundle / "edge.onnx").write_bytes(b"garbage" * 10)
    bundle = Bundle.load(tiny_bundle, verify=False)
    with pytest.raises(ModelError, match="does not load"):
        EdgeRuntime(bundle)


def test_inputs_are_fitted_to_the_model_or_refused_with_the_reason(tiny_bundle: Path) -> None:
    spec = EdgeRuntime(Bundle.load(tiny_bundle), warmup_runs=0).input
    assert spec.item(np.zeros((8, 8), dtype=np.uint8)).shape == (1, 8, 8)
    assert spec.item([[1] * 8] * 8).dtype == np.uint8  # small Python ints fit uint8
    assert spec.batch(np.zeros((5, 8, 8), dtype=np.uint8)).shape == (5, 1, 8, 8)
    with pytest.raises(InputError, match=r"input shape \[7, 8\] does not match"):
        spec.item(np.zeros((7, 8), dtype=np.uint8))
    with pytest.raises(InputError, match="has dtype float64; the model takes uint8"):
        spec.item(np.zeros((1, 8, 8)))
    with pytest.raises(InputError, match="outside the range of uint8"):
        spec.item(np.full((1, 8, 8), 300))
    with pytest.raises(InputError, match=r"batch shape \[8, 8\]"):
        spec.batch(np.zeros((8, 8), dtype=np.uint8))


def _ort_classes() -> list[type[Exception]]:
    from fogline.compression._ort_errors import ONNXRUNTIME_EXCEPTIONS

    return list(ONNXRUNTIME_EXCEPTIONS)


@pytest.mark.parametrize("kind", _ort_classes(), ids=lambda k: k.__name__)
def test_every_onnxruntime_error_at_run_becomes_the_agents_input_error(
    tiny_bundle: Path, kind: type[Exception]
) -> None:
    rt = EdgeRuntime(Bundle.load(tiny_bundle), max_batch=4, warmup_runs=0)

    class _Failing:
        def run(self, *args: object) -> None:
            raise kind("[ONNXRuntimeError] : 1 : FAIL : staged failure")

    rt.session = _Failing()  # type: ignore[assignment]
    with pytest.raises(InputError, match="could not run this input: staged failure") as info:
        rt.run(np.zeros((1, *rt.input.item_shape), dtype=rt.input.dtype))
    assert type(info.value.__cause__) is kind
