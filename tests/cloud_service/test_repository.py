"""The model repository on real ONNX models: layout and config, metadata, validation,
batching, deadlines, bounded lanes, lane sharing, loading and unloading at run time."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from fogline.cloud_service._backends import Backend, BackendChoice, OnnxRuntimeBackend
from fogline.cloud_service._metrics import CloudMetrics
from fogline.cloud_service._repository import (
    ModelRepository,
    VersionState,
    oip_datatype,
    read_signature,
)
from fogline.cloud_service._serving import Lane, TensorSpec
from fogline.cloud_service.errors import (
    BackendError,
    ConfigError,
    DeadlineExceededError,
    InferenceInputError,
    ModelNotReadyError,
    QueueFullError,
    UnknownModelError,
)
from fogline.reference._mlp import (
    REFERENCE_MLP_INPUT,
    REFERENCE_MLP_OUTPUT,
    build_reference_mlp,
    reference_mlp_forward,
    write_reference_mlp,
)

# onnxruntime as chosen; skips probing the host for GPUs in every test
CPU = BackendChoice("onnxruntime", "tests run on the CPU")

# models


def save(model: onnx.ModelProto, path: Path) -> Path:
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def make(graph: onnx.GraphProto) -> onnx.ModelProto:
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def mixed_model(offset: float = 1.0) -> onnx.ModelProto:
    """FP32 [N,4] + offset, INT64 [N,2] + 1, BOOL [N] negated: three datatypes, one batch."""
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["x", "off"], ["y"]),
            helper.make_node("Add", ["ids", "one"], ["next_ids"]),
            helper.make_node("Not", ["flags"], ["not_flags"]),
        ],
        "mixed",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 2]),
            helper.make_tensor_value_info("flags", TensorProto.BOOL, ["N"]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("next_ids", TensorProto.INT64, ["N", 2]),
            helper.make_tensor_value_info("not_flags", TensorProto.BOOL, ["N"]),
        ],
        [
            numpy_helper.from_array(np.full(4, offset, np.float32), "off"),
            numpy_helper.from_array(np.ones(2, np.int64), "one"),
        ],
    )
    return make(graph)


def plus_model(offset: float, *, batch: int | str = "N", width: int = 4) -> onnx.ModelProto:
    """FP32 [batch, width] → x + offset; ``batch`` fixed (an int) or dynamic."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "off"], ["y"])],
        "plus",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, width])],
        [numpy_helper.from_array(np.full(width, offset, np.float32), "off")],
    )
    return make(graph)


def text_out_model() -> onnx.ModelProto:
    """FP64 [N] → its decimal text, a BYTES output."""
    graph = helper.make_graph(
        [helper.make_node("Cast", ["v"], ["text"], to=TensorProto.STRING)],
        "text_out",
        [helper.make_tensor_value_info("v", TensorProto.DOUBLE, ["N"])],
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["N"])],
    )
    return make(graph)


def text_in_model() -> onnx.ModelProto:
    """BYTES [N] → itself, plus UINT8/INT8/UINT16/INT16/INT32/UINT32/UINT64/FP16 pass-through."""
    others = [
        ("u8", TensorProto.UINT8),
        ("i8", TensorProto.INT8),
        ("u16", TensorProto.UINT16),
        ("i16", TensorProto.INT16),
        ("i32", TensorProto.INT32),
        ("u32", TensorProto.UINT32),
        ("u64", TensorProto.UINT64),
        ("h", TensorProto.FLOAT16),
    ]
    nodes = [helper.make_node("Identity", ["s"], ["s_out"])]
    nodes += [helper.make_node("Identity", [n], [f"{n}_out"]) for n, _ in others]
    graph = helper.make_graph(
        nodes,
        "text_in",
        [helper.make_tensor_value_info("s", TensorProto.STRING, ["N"])]
        + [helper.make_tensor_value_info(n, t, ["N"]) for n, t in others],
        [helper.make_tensor_value_info("s_out", TensorProto.STRING, ["N"])]
        + [helper.make_tensor_value_info(f"{n}_out", t, ["N"]) for n, t in others],
    )
    return make(graph)


class PlainSession:
    """A backend over a bare onnxruntime session that feeds arrays as given (the project's
    onnxruntime backend casts inputs to numeric types, which string inputs do not survive)."""

    name = "onnxruntime"

    def __init__(self, path: Path) -> None:
        self._session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.output_names = tuple(o.name for o in self._session.get_outputs())

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(i.name for i in self._session.get_inputs())

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self._session.run(None, dict(inputs))
        return dict(zip(self.output_names, outs, strict=True))

    def warmup(self) -> None:
        pass


class Gate:
    """Wraps real backends so a test can hold a batch inside the backend and see what ran."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.open.set()
        self.entered = threading.Semaphore(0)
        self.feeds: list[dict[str, np.ndarray]] = []

    def loader(self, path: Path, max_batch_size: int) -> Backend:
        inner = OnnxRuntimeBackend(path, max_batch_size=max_batch_size)
        gate = self

        class Gated:
            name = inner.name
            input_names = inner.input_names

            def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
                gate.entered.release()
                assert gate.open.wait(30), "the gate was never opened"
                gate.feeds.append({k: np.array(v) for k, v in inputs.items()})
                return inner.run(inputs)

            def warmup(self) -> None:
                inner.warmup()

        return Gated()

    def hold(self) -> None:
        self.open.clear()

    def wait_entered(self) -> None:
        assert self.entered.acquire(timeout=30), "no batch reached the backend"

    def drain_entries(self) -> None:
        while self.entered.acquire(blocking=False):
            pass


@pytest.fixture
def repo_dir(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    save(mixed_model(), root / "mixed" / "1" / "model.onnx")
    save(plus_model(10.0, batch=1, width=3), root / "fixed" / "1" / "model.onnx")
    save(text_out_model(), root / "text" / "1" / "model.onnx")
    return root


@pytest.fixture
def open_repo() -> Iterator[Callable[..., ModelRepository]]:
    made: list[ModelRepository] = []

    def open_(directory: Path | None = None, **kw: Any) -> ModelRepository:
        kw.setdefault("backend", CPU)
        repo = ModelRepository(directory, **kw)
        made.append(repo)
        return repo

    yield open_
    for repo in made:
        repo.stop()


def infer(repo: ModelRepository, model: str, inputs: dict[str, np.ndarray], **kw: Any) -> Any:
    return asyncio.run(repo.infer(model, kw.pop("version", None), inputs, **kw))


def mixed_inputs(rows: int, start: float = 0.0) -> dict[str, np.ndarray]:
    return {
        "x": np.arange(rows * 4, dtype=np.float32).reshape(rows, 4) + start,
        "ids": np.arange(rows * 2, dtype=np.int64).reshape(rows, 2),
        "flags": np.arange(rows) % 2 == 0,
    }


# metadata and datatypes


def test_metadata_reports_protocol_datatypes_and_a_dynamic_batch_axis(
    repo_dir: Path, open_repo: Callable[..., ModelRepository]
) -> None:
    repo = open_repo(repo_dir)
    repo.start()
    assert repo.ready
    assert repo.model_names() == ["fixed", "mixed", "text"]
    meta = repo.metadata("mixed")
    assert meta.name == "mixed"
    assert meta.version == "1"
    assert meta.versions == ("1",)
    assert meta.platform == "onnxruntime_onnx"
    assert meta.max_batch_size == 32
    assert meta.inputs == (
        TensorSpec("x", "FP32", (-1, 4)),
        TensorSpec("ids", "INT64", (-1, 2)),
        TensorSpec("flags", "BOOL", (-1,)),
    )
    assert meta.outputs[1] == TensorSpec("next_ids", "INT64", (-1, 2))
    fixed = repo.metadata("fixed", "1")
    assert fixed.max_batch_size == 0
    assert fixed.inputs == (TensorSpec("x", "FP32", (1, 3)),)
    assert repo.metadata("text").outputs == (TensorSpec("text", "BYTES", (-1,)),)


def test_every_datatype_of_the_protocol_is_read_from_onnx(tmp_path: Path) -> None:
    path = save(text_in_model(), tmp_path / "m.onnx")
    inputs, outputs = read_signature(path)
    assert [(s.name, s.datatype) for s in inputs] == [
        ("s", "BYTES"),
        ("u8", "UINT8"),
        ("i8", "INT8"),
        ("u16", "UINT16"),
        ("i16", "INT16"),
        ("i32", "INT32"),
        ("u32", "UINT32"),
        ("u64", "UINT64"),
        ("h", "FP16"),
    ]
    assert all(s.shape == (-1,) for s in (*inputs, *outputs))
    assert oip_datatype(np.dtype(">f8")) == "FP64"  # byte order does not matter
    assert oip_datatype(np.dtype("U3")) == "BYTES"
    assert oip_datatype(np.dtype(np.complex64)) is None


def test_inference_on_three_datatypes_returns_every_output(
    repo_dir: Path, open_repo: Callable[..., ModelRepository]
) -> None:
    repo = open_repo(repo_dir, models=["mixed"])
    repo.start()
    out = infer(repo, "mixed", mixed_inputs(3))
    np.testing.assert_array_equal(out["y"], mixed_inputs(3)["x"] + 1)
    np.testing.assert_array_equal(out["next_ids"], mixed_inputs(3)["ids"] + 1)
    assert out["next_ids"].dtype == np.int64
    np.testing.assert_array_equal(out["not_flags"], [False, True, False])


def test_bytes_outputs_come_back_as_bytes(
    repo_dir: Path, open_repo: Callable[..., ModelRepository]
) -> None:
    repo = open_repo(repo_dir, models=["text"])
    repo.start()
    out = infer(repo, "text", {"v": np.array([1.5, 2.0])})
    assert out["text"].dtype == object
    assert [float(v) for v in out["text"]] == [1.5, 2.0]
    assert all(isinstance(v, bytes) for v in out["text"])


def test_bytes_and_narrow_integer_inputs_reach_the_model(
    tmp_path: Path, open_repo: Callable[..., ModelRepository]
) -> None:
    save(text_in_model(), tmp_path / "m" / "textin" / "1" / "model.onnx")
    repo = open_repo(tmp_path / "m", backend_loader=lambda path, _: PlainSession(path))
    repo.start()
    specs = repo.metadata("textin").inputs
    inputs = {s.name: np.zeros(2, dtype=np.dtype(_NUMPY[s.datatype])) for s in specs}
    inputs["s"] = np.array([b"caf\xc3\xa9", b"x"], dtype=object)
    out = infer(repo, "textin", inputs)
    assert list(out["s_out"]) == ["café".encode(), b"x"]
    assert out["u64_out"].dtype == np.uint64
    inputs["s"] = np.array([b"\xff", b"x"], dtype=object)
    with pytest.raises(InferenceInputError, match=r"'s' element 0 is not UTF-8"):
        infer(repo, "textin", inputs)


_NUMPY = {
    "BYTES": "O",
    "UINT8": "u1",
    "INT8": "i1",
    "UINT16": "u2",
    "INT16": "i2",
    "INT32": "i4",
    "UINT32": "u4",
    "UINT64": "u8",
    "FP16": "f2",
}


# validation


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.pop("ids"), r"missing input tensor 'ids'"),
        (lambda d: d.update(extra=np.zeros(1)), r"unexpected input tensor 'extra'"),
        (lambda d: d.update(ids=d["ids"].astype(np.int32)), r"'ids' has datatype INT32.*INT64"),
        (lambda d: d.update(x=d["x"].astype(np.float64)), r"'x' has datatype FP64.*FP32"),
        (lambda d: d.update(x=np.zeros((2, 5), np.float32)), r"'x' has shape \[2, 5\].*\[-1, 4\]"),
        (lambda d: d.update(flags=np.zeros((2, 1), bool)), r"'flags' has shape \[2, 1\]"),
        (lambda d: d.update(ids=np.zeros((3, 2), np.int64)), r"disagree on the batch size"),
        (lambda d: d.update(x=[[0.0] * 4] * 2), r"'x' must be a numpy array"),
    ],
)
def test_infer_rejects_inputs_that_do_not_fit_naming_the_tensor(
    repo_dir: Path,
    open_repo: Callable[..., ModelRepository],
    change: Callable[[dict[str, Any]], None],
    message: str,
) -> None:
    repo = open_repo(repo_dir, models=["mixed"])
    repo.start()
    inputs: dict[str, Any] = mixed_inputs(2)
    change(inputs)
    with pytest.raises(InferenceInputError, match=message):
        infer(repo, "mixed", inputs)
    labels = {"model": "mixed", "version": "1", "lane": "interactive", "outcome": "bad_input"}
    assert repo.metrics.value("fogline_model_requests_total", labels) == 1


def test_more_rows_than_max_batch_size_are_rejected(
    repo_dir: Path, open_repo: Callable[..., ModelRepository]
) -> None:
    (repo_dir / "mixed" / "config.toml").write_text("max_batch_size = 4\n")
    repo = open_repo(repo_dir, models=["mixed"])
    repo.start()
    with pytest.raises(InferenceInputError, match=r"5 rows, more than the max_batch_size \(4\)"):
        infer(repo, "mixed", mixed_inputs(5))
    with pytest.raises(InferenceInputError, match="no rows"):
        infer(repo, "mixed", mixed_inputs(0))


def test_a_fixed_batch_model_runs_requests_one_by_one(
    repo_dir: Path, open_repo: Callable[..., ModelRepository]
) -> None:
    repo = open_repo(repo_dir, models=["fixed"])
    repo.start()

    async def many() -> list[dict[str, np.ndarray]]:
        return await asyncio.gather(
            *[repo.infer("fixed", None, {"x": np.full((1, 3), i, np.float32)}) for i in range(8)]
        )

    outs = asyncio.run(many())
    assert [float(o["y"][0, 0]) for o in outs] == [i + 10.0 for i in range(8)]
    assert repo.metrics.value("fogline_model_batch_size_count", {"model": "fixed"}) == 8
    with pytest.raises(InferenceInputError, match=r"shape \[2, 3\].*\[1, 3\]"):
        infer(repo, "fixed", {"x": np.zeros((2, 3), np.float32)})


# batching


def test_concurrent_requests_share_batches_and_each_gets_its_own_rows(
    repo_dir: Path, open_repo: Callable[..., ModelRepository]
) -> None:
    gate = Gate()
    repo = open_repo(repo_dir, models=["mixed"], backend_loader=gate.loader)
    repo.start()
    gate.drain_entries()
    gate.feeds.clear()
    gate.hold()
    first = repo.submit("mixed", None, mixed_inputs(1, start=-1000))
    gate.wait_entered()  # the model is busy: everything below queues
    futures = [
        repo.submit("mixed", None, mixed_inputs(1 + i % 3, start=100 * i)) for i in range(20)
    ]
    gate.open.set()
    first.result(30)
    for i, future in enumerate(futures):
        out = future.result(30)
        np.testing.assert_array_equal(out["y"], mixed_inputs(1 + i % 3, start=100 * i)["x"] + 1)
    rows_per_batch = [len(f["x"]) for f in gate.feeds[1:]]
    assert sum(rows_per_batch) == sum(1 + i % 3 for i in range(20))
    assert max(rows_per_batch) > 3  # requests were batched together
    assert all(r <= 32 for r in rows_per_batch)


def test_a_preferred_batch_size_from_the_config_is_formed(
    repo_dir: Path, open_repo: Callable[..., ModelRepository]
) -> None:
    (repo_dir / "mixed" / "config.toml").write_text(
        "max_batch_size = 16\nmax_queue_delay_ms = 10000\npreferred_batch_sizes = [4]\n"
    )
    gate = Gate()
    repo = open_repo(repo_dir, models=["mixed"], backend_loader=gate.loader)
    repo.start()
    gate.feeds.clear()
    futures = [repo.submit("mixed", None, mixed_inputs(1)) for _ in range(4)]
    for f in futures:
        f.result(30)  # four rows form a preferred batch: nobody waits the 10 s delay
    assert [len(f["x"]) for f in gate.feeds] == [4]


# deadlines, bounded lanes, lane sharing


def test_a_request_that_waits_past_its_timeout_is_rejected_unserved(
    repo_dir: Path, open_repo: Callable[..., ModelRepository]
) -> None:
    gate = Gate()
    repo = open_repo(repo_dir, models=["mixed"], backend_loader=gate.loader)
    repo.start()
    gate.drain_entries()
    gate.hold()
    running = repo.submit("mixed", None, mixed_inputs(1))
    gate.wait_entered()
    late = repo.submit("mixed", None, mixed_inputs(1), timeout_ms=20)
    time.sleep(0.1)  # let its deadline pass while the model is busy
    fed_before = len(gate.feeds)
    gate.open.set()
    running.result(30)
    with pytest.raises(DeadlineExceededError, match=r"past its 20 ms timeout"):
        late.result(30)
    assert len(gate.feeds) == fed_before + 1  # only the running batch reached the model
    labels = {"model": "mixed", "version": "1", "lane": "interactive", "outcome": "deadline"}
    assert repo.metrics.value("fogline_model_requests_total", labels) == 1


def test_a_full_lane_is_refused_with_queue_full_while_other_lanes_accept(
    repo_dir: Path, open_repo: Callable[..., ModelRepository]
) -> None:
    (repo_dir / "mixed" / "config.toml").write_text(
        "busy_retry_after_ms = 250\n[lanes.interactive]\nmax_queue_items = 2\n"
    )
    gate = Gate()
    repo = open_repo(repo_dir, models=["mixed"], backend_loader=gate.loader)
    repo.start()
    gate.drain_entries()
    gate.hold()
    futures = [repo.submit("mixed", None, mixed_inputs(1))]
    gate.wait_entered()
    futures += [repo.submit("mixed", None, mixed_inputs(1)) for _ in range(2)]
    with pytest.raises(QueueFullError) as info:
        repo.submit("mixed", None, mixed_inputs(1))
    assert info.value.retry_after_ms == 250
    futures.append(repo.submit("mixed", None, mixed_inputs(1), lane=Lane.BULK))
    assert (
        repo.metrics.value("fogline_model_queue_depth", {"model": "mixed", "lane": "interactive"})
        == 2
    )
    gate.open.set()
    for f in futures:
        f.result(30)
    labels = {"model": "mixed", "version": "1", "lane": "interactive", "outcome": "queue_full"}
    assert repo.metrics.value("fogline_model_requests_total", labels) == 1
    assert (
        repo.metrics.value("fogline_model_queue_depth", {"model": "mixed", "lane": "interactive"})
        == 0
    )


def test_mixed_lanes_share_a_busy_model_by_weight(
    repo_dir: Path, open_repo: Callable[..., ModelRepository]
) -> None:
    """With both lanes backlogged, batches go 8 interactive to 1 bulk, and bulk still runs."""
    (repo_dir / "mixed" / "config.toml").write_text("max_batch_size = 1\n")
    gate = Gate()
    repo = open_repo(repo_dir, models=["mixed"], backend_loader=gate.loader)
    repo.start()
    gate.drain_entries()
    gate.hold()
    futures = [repo.submit("mixed", None, mixed_inputs(1, start=-1))]
    gate.wait_entered()
    gate.feeds.clear()
    for _ in range(40):  # bulk first: arrival order does not buy priority
        futures.append(repo.submit("mixed", None, mixed_inputs(1, start=2000), lane=Lane.BULK))
    for _ in range(40):
        futures.append(repo.submit("mixed", None, mixed_inputs(1, start=1000)))
    gate.open.set()
    for f in futures:
        f.result(30)
    lanes = ["bulk" if f["x"][0, 0] >= 2000 else "interactive" for f in gate.feeds[1:]]
    assert Counter(lanes[:36]) == {"interactive": 32, "bulk": 4}
    assert Counter(lanes) == {"interactive": 40, "bulk": 40}


# versions, config, layout


def test_version_policy_latest_two_serves_the_two_highest_versions(
    tmp_path: Path, open_repo: Callable[..., ModelRepository]
) -> None:
    root = tmp_path / "models"
    for v in (1, 2, 10):
        save(plus_model(float(v)), root / "plus" / str(v) / "model.onnx")
    (root / "plus" / "0").mkdir()  # not a version: a leading zero
    (root / "plus" / "notes").mkdir()
    (root / "plus" / "config.toml").write_text("[version_policy]\nlatest = 2\n")
    repo = open_repo(root)
    repo.start()
    x = {"x": np.zeros((1, 4), np.float32)}
    assert infer(repo, "plus", x)["y"][0, 0] == 10.0  # the highest version by number
    assert infer(repo, "plus", x, version="2")["y"][0, 0] == 2.0
    assert repo.metadata("plus").versions == ("2", "10")
    assert repo.is_ready("plus", "2")
    assert not repo.is_ready("plus", "1")
    with pytest.raises(ModelNotReadyError, match="version 1 of model 'plus'"):
        infer(repo, "plus", x, version="1")
    with pytest.raises(UnknownModelError, match="version '7' of model 'plus'"):
        repo.is_ready("plus", "7")
    with pytest.raises(UnknownModelError, match="model 'nope'"):
        infer(repo, "nope", x)
    assert [(s.version, s.state) for s in repo.index()] == [
        ("1", VersionState.UNAVAILABLE),
        ("2", VersionState.READY),
        ("10", VersionState.READY),
    ]


def test_specific_and_all_version_policies(
    tmp_path: Path, open_repo: Callable[..., ModelRepository]
) -> None:
    root = tmp_path / "models"
    for name in ("some", "every"):
        for v in (1, 2, 3):
            save(plus_model(float(v)), root / name / str(v) / "model.onnx")
    (root / "some" / "config.toml").write_text("[version_policy]\nspecific = [1, 3]\n")
    (root / "every" / "config.toml").write_text("[version_policy]\nall = true\n")
    repo = open_repo(root)
    repo.start()
    assert repo.metadata("some").versions == ("1", "3")
    assert repo.metadata("every").versions == ("1", "2", "3")


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("max_batch_size = -1", r"max_batch_size must lie in 0..65536, got -1"),
        ("max_batch_size = 'big'", r"max_batch_size must be an integer, got 'big'"),
        ("max_queue_delay_ms = 20000", r"max_queue_delay_ms must lie in \[0, 10000\]"),
        ("max_batch_size = 4\npreferred_batch_sizes = [2, 8]", r"preferred_batch_sizes must not"),
        ("preferred_batch_sizes = [2, 2]", r"preferred_batch_sizes must be distinct"),
        ("preferred_batch_sizes = [2, true]", r"preferred_batch_sizes\[1\] must be an integer"),
        ("max_batch_sise = 4", r"max_batch_sise is not a known key"),
        ("[version_policy]\nlatest = 1\nall = true", r"version_policy: must set exactly one"),
        ("[version_policy]\nlatest = 0", r"version_policy.latest must be a positive integer"),
        ("[version_policy]\nall = false", r"version_policy.all must be true"),
        ("[version_policy]\nspecific = [5]", r"names version\(s\) 5, which have no folder"),
        ("[version_policy]\nspecific = [0]", r"version_policy.specific\[0\] must be a positive"),
        ("[lanes.bulk]\ntimeout_ms = 0", r"lanes.bulk.timeout_ms must lie in \(0, 86400000\]"),
        ("[lanes.interactive]\nweight = 0", r"lanes.interactive.weight must lie in 1..1000"),
        ("[lanes.stream]\nmax_queue_items = 0", r"lanes.stream.max_queue_items must be at least"),
        ("[lanes.urgent]\nweight = 9", r"lanes.urgent is not a known key"),
        ("[lanes.bulk]\npriority = 1", r"lanes.bulk.priority is not a known key"),
        ("max_batch_size = [", r"not valid TOML"),
    ],
)
def test_a_bad_config_toml_is_refused_naming_the_key(
    repo_dir: Path, config: str, message: str
) -> None:
    path = repo_dir / "mixed" / "config.toml"
    path.write_text(config + "\n")
    with pytest.raises(ConfigError, match=message) as info:
        ModelRepository(repo_dir, backend=CPU)
    assert str(path) in str(info.value)


def test_a_config_file_sets_the_scheduling_of_its_model(
    repo_dir: Path, open_repo: Callable[..., ModelRepository]
) -> None:
    (repo_dir / "mixed" / "config.toml").write_text(
        """
max_batch_size = 8
max_queue_delay_ms = 1.5
preferred_batch_sizes = [4, 2]
busy_retry_after_ms = 50
[lanes.bulk]
max_queue_items = 7
timeout_ms = 1234
"""
    )
    repo = open_repo(repo_dir, models=["mixed"])
    repo.start()
    policy = repo.policy("mixed")
    assert policy.max_batch_size == 8
    assert policy.max_queue_delay_ms == 1.5
    assert policy.preferred_batch_sizes == (2, 4)
    assert policy.retry_after_ms == 50
    assert (policy.lanes.bulk.max_queue_items, policy.lanes.bulk.timeout_ms) == (7, 1234.0)
    assert policy.lanes.interactive.weight == 8  # untouched lanes keep their defaults
    assert repo.metadata("mixed").max_batch_size == 8


def test_batching_a_fixed_batch_model_is_a_config_error(
    repo_dir: Path, open_repo: Callable[..., ModelRepository]
) -> None:
    (repo_dir / "fixed" / "config.toml").write_text("max_batch_size = 4\n")
    repo = open_repo(repo_dir, models=["fixed"])
    with pytest.raises(
        ConfigError, match=r"max_batch_size = 4, but the first axis of 'x' is fixed"
    ):
        repo.start()
    assert not repo.ready


def test_max_batch_size_0_serves_a_dynamic_model_without_batching(
    repo_dir: Path, open_repo: Callable[..., ModelRepository]
) -> None:
    (repo_dir / "mixed" / "config.toml").write_text("max_batch_size = 0\n")
    repo = open_repo(repo_dir, models=["mixed"])
    repo.start()
    assert repo.metadata("mixed").max_batch_size == 0
    out = infer(repo, "mixed", mixed_inputs(50))  # any length: shapes as the model declares
    assert out["y"].shape == (50, 4)


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        (lambda root: (root / "empty").mkdir(), r"model 'empty': .* has no numbered version"),
        (lambda root: (root / "mixed" / "2").mkdir(), r"model 'mixed' version 2: .* not exist"),
    ],
)
def test_a_malformed_repository_layout_is_refused(
    repo_dir: Path, layout: Callable[[Path], None], message: str
) -> None:
    layout(repo_dir)
    with pytest.raises(ConfigError, match=message):
        ModelRepository(repo_dir)


def test_a_missing_repository_or_model_is_refused(tmp_path: Path, repo_dir: Path) -> None:
    with pytest.raises(ConfigError, match="is not a directory"):
        ModelRepository(tmp_path / "absent")
    with pytest.raises(ConfigError, match="no model named 'ghost'"):
        ModelRepository(repo_dir, models=["ghost"])


def test_a_model_that_fails_to_load_keeps_the_repository_not_ready(
    repo_dir: Path, open_repo: Callable[..., ModelRepository]
) -> None:
    (repo_dir / "broken" / "1").mkdir(parents=True)
    (repo_dir / "broken" / "1" / "model.onnx").write_bytes(b"not an onnx model")
    repo = open_repo(repo_dir)
    assert not repo.ready  # not started yet
    with pytest.raises(BackendError, match="cannot load"):
        repo.start()
    assert not repo.ready
    assert repo.is_ready("mixed")  # the others serve regardless
    (status,) = [s for s in repo.index() if s.model == "broken"]
    assert status.state == VersionState.UNAVAILABLE
    assert "cannot load" in status.reason
    with pytest.raises(ModelNotReadyError, match="version 1 of model 'broken' is unavailable"):
        repo.metadata("broken")
    repo.unload("broken")  # no longer wanted: the rest is ready
    assert repo.ready


def test_bundle_cloud_parts_are_served_by_bundle_name_and_version(
    make_bundle: Callable[..., Path], open_repo: Callable[..., ModelRepository]
) -> None:
    repo = open_repo(bundles=[make_bundle(version="1"), make_bundle(version="2", seed=3)])
    repo.start()
    assert repo.model_names() == ["tiny"]
    meta = repo.metadata("tiny")
    assert (meta.version, meta.versions) == ("2", ("1", "2"))
    assert meta.inputs == (TensorSpec("features", "FP32", (-1, 16)),)
    out = infer(repo, "tiny", {"features": np.zeros((2, 16), np.float32)}, version="1")
    np.testing.assert_allclose(out["probs"].sum(axis=1), 1.0, rtol=1e-5)


def test_a_bundle_named_like_a_repository_model_is_refused(
    repo_dir: Path, make_bundle: Callable[..., Path]
) -> None:
    with pytest.raises(ConfigError, match="is named like model 'mixed'"):
        ModelRepository(repo_dir, bundles=[make_bundle(name="mixed")])


# run-time loading and unloading


def test_load_and_unload_at_run_time_do_not_disturb_another_model(
    repo_dir: Path, open_repo: Callable[..., ModelRepository]
) -> None:
    save(plus_model(1.0), repo_dir / "other" / "1" / "model.onnx")
    repo = open_repo(repo_dir, models=["mixed", "other"])
    repo.start()
    errors: list[BaseException] = []
    served = 0
    stop = threading.Event()

    def traffic() -> None:
        nonlocal served
        while not stop.is_set():
            futures = [repo.submit("mixed", None, mixed_inputs(2)) for _ in range(8)]
            for f in futures:
                try:
                    np.testing.assert_array_equal(f.result(30)["y"], mixed_inputs(2)["x"] + 1)
                    served += 1
                except BaseException as exc:
                    errors.append(exc)

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        x = {"x": np.zeros((1, 4), np.float32)}
        repo.unload("other")
        with pytest.raises(ModelNotReadyError, match="version 1 of model 'other' is unavailable"):
            infer(repo, "other", x)
        assert not repo.is_ready("other")
        save(plus_model(2.0), repo_dir / "other" / "2" / "model.onnx")
        repo.load("other")  # re-reads the folder: version 2 is now the latest
        assert infer(repo, "other", x)["y"][0, 0] == 2.0
        repo.load("other", "1")  # an explicit version, outside the policy
        assert infer(repo, "other", x, version="1")["y"][0, 0] == 1.0
        repo.unload("other", "1")
        assert repo.metadata("other").versions == ("2",)
        assert repo.ready
        served_during = served
    finally:
        stop.set()
        thread.join(30)
    assert errors == []
    assert served_during > 0


def test_unloading_answers_queued_requests_then_refuses_new_ones(
    repo_dir: Path, open_repo: Callable[..., ModelRepository]
) -> None:
    (repo_dir / "mixed" / "config.toml").write_text("max_queue_delay_ms = 10000\n")
    repo = open_repo(repo_dir, models=["mixed"])
    repo.start()
    queued = [repo.submit("mixed", None, mixed_inputs(1, start=i)) for i in range(3)]
    assert not any(f.done() for f in queued)  # waiting for company or the 10 s delay
    repo.unload("mixed")
    for i, f in enumerate(queued):
        np.testing.assert_array_equal(f.result(0)["y"], mixed_inputs(1, start=i)["x"] + 1)
    with pytest.raises(ModelNotReadyError):
        repo.submit("mixed", None, mixed_inputs(1))
    labels = {"model": "mixed", "version": "1", "lane": "interactive", "outcome": "not_ready"}
    assert repo.metrics.value("fogline_model_requests_total", labels) == 1
    with pytest.raises(UnknownModelError):
        repo.unload("mixed", "9")


def test_a_changed_config_is_swapped_in_without_refusing_requests(
    repo_dir: Path, open_repo: Callable[..., ModelRepository]
) -> None:
    repo = open_repo(repo_dir, models=["mixed"])
    repo.start()
    assert repo.policy("mixed").max_batch_size == 32
    (repo_dir / "mixed" / "config.toml").write_text("max_batch_size = 4\n")
    pending = [repo.submit("mixed", None, mixed_inputs(1)) for _ in range(16)]
    repo.load("mixed")
    assert repo.policy("mixed").max_batch_size == 4
    assert repo.is_ready("mixed", "1")
    for f in pending:
        f.result(30)


def test_loading_an_unknown_model_or_version_is_refused(
    repo_dir: Path, open_repo: Callable[..., ModelRepository]
) -> None:
    repo = open_repo(repo_dir, models=["mixed"])
    with pytest.raises(UnknownModelError, match="model 'ghost'"):
        repo.load("ghost")
    with pytest.raises(UnknownModelError, match="version '4' of model 'mixed'"):
        repo.load("mixed", "4")
    repo.load("text")  # a folder outside the initial selection may be loaded explicitly
    assert repo.is_ready("text")


def test_stop_ends_every_scheduler_thread(
    repo_dir: Path, open_repo: Callable[..., ModelRepository]
) -> None:
    repo = open_repo(repo_dir)
    repo.start()
    assert any(t.name.startswith("fogline-model-") for t in threading.enumerate())
    repo.stop()
    assert not repo.ready
    assert not [t for t in threading.enumerate() if t.name.startswith("fogline-model-")]
    with pytest.raises(ModelNotReadyError):
        repo.submit("mixed", None, mixed_inputs(1))


# metrics


def test_serving_metrics_are_recorded_per_model_and_lane(
    repo_dir: Path, open_repo: Callable[..., ModelRepository]
) -> None:
    metrics = CloudMetrics()
    repo = open_repo(repo_dir, models=["mixed"], metrics=metrics)
    repo.start()
    for lane in (Lane.INTERACTIVE, Lane.STREAM, Lane.BULK):
        infer(repo, "mixed", mixed_inputs(2), lane=lane)
    by_lane = {"model": "mixed", "lane": "stream"}
    assert (
        metrics.value("fogline_model_requests_total", {**by_lane, "version": "1", "outcome": "ok"})
        == 1
    )
    assert metrics.value("fogline_model_queue_seconds_count", by_lane) == 1
    assert metrics.value("fogline_model_request_seconds_count", by_lane) == 1
    assert metrics.value("fogline_model_queue_depth", by_lane) == 0
    assert metrics.value("fogline_model_arrival_rate", by_lane) > 0
    assert metrics.value("fogline_model_latency_p99_seconds", by_lane) > 0
    assert metrics.value("fogline_model_compute_seconds_count", {"model": "mixed"}) == 3
    assert metrics.value("fogline_model_batch_size_sum", {"model": "mixed"}) == 6
    assert b'fogline_model_batch_size_bucket{le="128.0",model="mixed"}' in metrics.render()


# the reference model


def test_the_reference_mlp_is_deterministic_and_serves_what_numpy_computes(
    tmp_path: Path, open_repo: Callable[..., ModelRepository]
) -> None:
    path = write_reference_mlp(tmp_path / "models", config_toml="max_batch_size = 16\n")
    assert path == tmp_path / "models" / "mlp" / "1" / "model.onnx"
    assert path.read_bytes() == build_reference_mlp()
    params = sum(int(np.prod(t.dims)) for t in onnx.load(str(path)).graph.initializer)
    assert 2_000_000 < params < 5_000_000
    repo = open_repo(tmp_path / "models")
    repo.start()
    meta = repo.metadata("mlp")
    assert meta.inputs == (TensorSpec(REFERENCE_MLP_INPUT, "FP32", (-1, 256)),)
    assert meta.outputs == (TensorSpec(REFERENCE_MLP_OUTPUT, "FP32", (-1, 10)),)
    assert meta.max_batch_size == 16
    x = np.random.default_rng(1).standard_normal((3, 256)).astype(np.float32)
    out = infer(repo, "mlp", {REFERENCE_MLP_INPUT: x})
    np.testing.assert_allclose(
        out[REFERENCE_MLP_OUTPUT], reference_mlp_forward(x), rtol=1e-4, atol=1e-4
    )


def test_cancelled_requests_are_skipped(
    repo_dir: Path, open_repo: Callable[..., ModelRepository]
) -> None:
    (repo_dir / "mixed" / "config.toml").write_text("max_queue_delay_ms = 10000\n")
    repo = open_repo(repo_dir, models=["mixed"])
    repo.start()
    gone: Future[dict[str, np.ndarray]] = repo.submit("mixed", None, mixed_inputs(1))
    kept = repo.submit("mixed", None, mixed_inputs(1))
    assert gone.cancel()
    repo.unload("mixed")  # drains: the cancelled one is dropped, the other answered
    assert kept.result(0)["y"].shape == (1, 4)
    assert (
        repo.metrics.value(
            "fogline_model_requests_total",
            {"model": "mixed", "version": "1", "lane": "interactive", "outcome": "ok"},
        )
        == 1
    )


def test_attack_loading_a_model_named_longer_than_a_file_name_is_an_unknown_model(
    repo_dir: Path, open_repo: Callable[..., ModelRepository]
) -> None:
    # POST /v2/repository/models/<300 characters>/load: the folder it names cannot exist,
    # and looking for it raised ENAMETOOLONG, which the HTTP API answered 500.
    repo = open_repo(repo_dir)
    for name in ("m" * 300, "é" * 200):
        with pytest.raises(UnknownModelError, match="unknown model"):
            repo.load(name)
    repo.start()
    assert repo.ready
