"""onnxruntime's errors, mapped in one place: every exception class onnxruntime defines,
and what its Python layer raises, become the caller's own error, with the upstream kept."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from onnxruntime.capi import onnxruntime_pybind11_state

from fogline.compression import ModelError, onnxruntime_errors
from fogline.compression._ort_errors import ONNXRUNTIME_EXCEPTIONS


class _TargetError(Exception):
    """A package's own error root, as the edge or the cloud would pass it."""


def _native_classes() -> list[type[BaseException]]:
    return [
        cls
        for _, cls in inspect.getmembers(onnxruntime_pybind11_state, inspect.isclass)
        if issubclass(cls, BaseException)
    ]


# onnxruntime's Python layer raises these itself (a feed missing an input: ValueError)
_PYTHON_SIDE: list[type[BaseException]] = [RuntimeError, ValueError, OSError]


def _relu_model() -> bytes:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return bytes(model.SerializeToString())


def _session(model: bytes | str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 4
    return ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])


def test_the_walk_finds_the_exception_kinds_onnxruntime_is_known_to_raise() -> None:
    names = {cls.__name__ for cls in _native_classes()}
    assert {
        "Fail",
        "InvalidArgument",
        "NoSuchFile",
        "NoModel",
        "EngineError",
        "RuntimeException",
        "InvalidProtobuf",
        "ModelLoaded",
        "NotImplemented",
        "InvalidGraph",
        "EPFail",
    } <= names


@pytest.mark.parametrize("upstream", _native_classes() + _PYTHON_SIDE, ids=lambda cls: cls.__name__)
def test_every_onnxruntime_exception_class_becomes_the_callers_error(
    upstream: type[BaseException],
) -> None:
    assert issubclass(upstream, ONNXRUNTIME_EXCEPTIONS)
    raised = upstream("[ONNXRuntimeError] : 1 : FAIL : it broke\nsecond line")
    with pytest.raises(_TargetError) as caught, onnxruntime_errors(into=_TargetError, what="op"):
        raise raised
    assert caught.value.__cause__ is raised
    assert str(caught.value) == f"op: it broke (onnxruntime {upstream.__name__})"


def test_garbage_bytes_as_a_model_become_the_callers_error_naming_invalid_protobuf() -> None:
    with (
        pytest.raises(
            _TargetError, match=r"^load model junk: .*\(onnxruntime InvalidProtobuf\)$"
        ) as caught,
        onnxruntime_errors(into=_TargetError, what="load model junk"),
    ):
        _session(b"these bytes are not a model")
    assert isinstance(caught.value.__cause__, onnxruntime_pybind11_state.InvalidProtobuf)


def test_a_missing_model_file_becomes_the_callers_error(tmp_path: Path) -> None:
    with (
        pytest.raises(_TargetError, match=r"\(onnxruntime NoSuchFile\)$"),
        onnxruntime_errors(into=_TargetError, what="load model"),
    ):
        _session(str(tmp_path / "absent.onnx"))


def test_a_wrong_input_name_at_run_becomes_the_callers_error() -> None:
    session = _session(_relu_model())
    with (
        pytest.raises(_TargetError, match=r"^run relu: .*'x'.*\(onnxruntime ValueError\)$"),
        onnxruntime_errors(into=_TargetError, what="run relu"),
    ):
        session.run(None, {"nope": np.zeros((1, 4), np.float32)})


def test_a_wrong_input_type_at_run_becomes_the_callers_error() -> None:
    session = _session(_relu_model())
    with (
        pytest.raises(_TargetError, match=r"\(onnxruntime InvalidArgument\)$") as caught,
        onnxruntime_errors(into=_TargetError, what="run relu"),
    ):
        session.run(None, {"x": np.zeros((1, 4), np.int64)})
    assert "[ONNXRuntimeError]" not in str(caught.value)


def test_the_callers_own_error_passes_through_unchanged() -> None:
    # compression's ModelError is also a ValueError: it must not be wrapped again
    mine = ModelError("already mapped")
    with pytest.raises(ModelError) as caught, onnxruntime_errors(into=ModelError, what="op"):
        raise mine
    assert caught.value is mine


def test_an_error_onnxruntime_does_not_raise_passes_through_unchanged() -> None:
    with pytest.raises(KeyError), onnxruntime_errors(into=_TargetError, what="op"):
        raise KeyError("not onnxruntime's")


def test_a_block_without_errors_runs_to_the_end() -> None:
    session = _session(_relu_model())
    with onnxruntime_errors(into=_TargetError, what="run relu"):
        (out,) = session.run(None, {"x": np.array([[-1.0, 2.0, -3.0, 4.0]], np.float32)})
    np.testing.assert_array_equal(out, [[0.0, 2.0, 0.0, 4.0]])


def test_misuse_of_the_map_is_refused() -> None:
    with pytest.raises(TypeError), onnxruntime_errors(into=int, what="op"):  # type: ignore[arg-type]
        pass
    with pytest.raises(ValueError), onnxruntime_errors(into=_TargetError, what=""):
        pass
