"""The model repository: the models the inference API serves, each behind its own
dynamic batcher, implementing :class:`~fogline.cloud_service._serving.ModelProvider`.

Sources
-------
* A Triton-layout directory, one folder per model, numbered version folders::

      <repo>/<model>/config.toml          optional, see ModelConfig.from_toml
      <repo>/<model>/<version>/model.onnx version folders are positive integers without a
                                          leading zero; other folders are ignored

* Bundles' cloud parts (:class:`fogline.sync.Bundle`): the model is named after the bundle,
  its version is the bundle's version; every bundle given is served.

Defaults (a model without ``config.toml``)
------------------------------------------
* ``max_batch_size``: 32 rows when the first axis of every input and output is dynamic,
  otherwise 0 (no batching: requests run one at a time, shapes exactly as declared).
* ``max_queue_delay_ms`` 0: a batch holds whatever waits when the model becomes free, so a
  lone request is never delayed, and under load batches grow by themselves.
* ``preferred_batch_sizes``: none. Version policy: the latest version.
* Lanes: interactive 1024 requests / 2 s timeout / weight 8; stream 4096 / 5 s / 3;
  bulk 1024 / 10 min / 1 (see :mod:`._scheduler` for how weights share the model).

Each served version gets its own backend (:func:`select_backend` / ``BackendChoice.load``;
onnxruntime on CPU), its own :class:`~._scheduler.LaneBatcher` thread, and a warm-up run at
batch 1 and ``max_batch_size`` before it reports ready. Metadata is read from the ONNX file:
datatypes as the Open Inference Protocol names them, ``-1`` for dynamic axes.

Tensors: ``BYTES`` inputs are numpy ``object`` arrays of :class:`bytes` or :class:`str`
(or numpy ``S``/``U`` arrays) and must be UTF-8 (onnxruntime string tensors); ``BYTES``
outputs are ``object`` arrays of :class:`bytes`.

Loading a version at run time builds and warms a new instance while the others serve;
reloading a ready version swaps the new instance in, then drains the old one. Unloading
marks the version unavailable (new requests: :class:`ModelNotReadyError`), runs what is
queued, then frees the backend; other models are never paused.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import itertools
import logging
import re
import threading
import time
from collections.abc import Callable, Collection, Hashable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import onnxruntime as ort

from fogline.cloud_service._backends import (
    Backend,
    BackendChoice,
    BackendSettings,
    load_backend,
    select_backend,
)
from fogline.cloud_service._config import (
    BatchingConfig,
    LaneConfig,
    LaneConfigs,
    ModelConfig,
    TensorRTConfig,
)
from fogline.cloud_service._metrics import CloudMetrics, ModelMetrics
from fogline.cloud_service._scheduler import LaneBatch, LaneBatcher, Queued, SchedulerPolicy
from fogline.cloud_service._serving import (
    DATATYPES,
    ORT_DATATYPES,
    Lane,
    ModelMetadata,
    TensorSpec,
)
from fogline.cloud_service.errors import (
    BackendError,
    CloudError,
    ConfigError,
    DeadlineExceededError,
    InferenceInputError,
    ModelNotReadyError,
    QueueFullError,
    UnknownModelError,
)
from fogline.compression import onnxruntime_errors
from fogline.messaging import Supervisor, ThreadFailure
from fogline.sync import Bundle, BundleError

__all__ = [
    "DEFAULT_MAX_BATCH_SIZE",
    "NUMPY_DTYPES",
    "BackendLoader",
    "Completed",
    "ModelRepository",
    "ModelVersionStatus",
    "VersionState",
    "bundle_model_config",
    "oip_datatype",
    "read_signature",
]

log = logging.getLogger("fogline.cloud.repository")

DEFAULT_MAX_BATCH_SIZE = 32
MODEL_FILE = "model.onnx"
CONFIG_FILE = "config.toml"

#: ``(model_path, max_batch_size)`` → a loaded backend; ``max_batch_size`` is at least 1.
BackendLoader = Callable[[Path, int], Backend]

_VERSION_DIR = re.compile(r"[1-9][0-9]*")

NUMPY_DTYPES = DATATYPES
_PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}


@functools.lru_cache(maxsize=256)
def oip_datatype(dtype: np.dtype[Any]) -> str | None:
    """The protocol datatype a numpy dtype carries (any byte order), or None."""
    if dtype.kind in "OSU":
        return "BYTES"
    bits = dtype.itemsize * 8
    if dtype.kind == "b":
        return "BOOL"
    if dtype.kind == "i" and bits in (8, 16, 32, 64):
        return f"INT{bits}"
    if dtype.kind == "u" and bits in (8, 16, 32, 64):
        return f"UINT{bits}"
    if dtype.kind == "f" and bits in (16, 32, 64):
        return f"FP{bits}"
    return None


def _spec_shape(shape: Sequence[Any] | None) -> tuple[int, ...]:
    if shape is None:
        return ()
    return tuple(d if isinstance(d, int) and d > 0 else -1 for d in shape)


def read_signature(path: str | Path) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The inputs and outputs of an ONNX model (protocol datatypes, ``-1`` = dynamic axis).

    Read by a throwaway onnxruntime session without graph optimisation, so any backend can
    serve the model afterwards. Raises :class:`BackendError` for a file onnxruntime cannot
    load or a tensor type the protocol cannot carry.
    """
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    with onnxruntime_errors(into=BackendError, what=f"onnxruntime cannot load {path}"):
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def specs(args: Sequence[Any], what: str) -> tuple[TensorSpec, ...]:
        out = []
        for arg in args:
            datatype = ORT_DATATYPES.get(arg.type)
            if datatype is None:
                raise BackendError(
                    f"{path}: {what} {arg.name!r} has type {arg.type}, which the Open "
                    "Inference Protocol cannot carry"
                )
            out.append(TensorSpec(arg.name, datatype, _spec_shape(arg.shape)))
        return tuple(out)

    return specs(session.get_inputs(), "input"), specs(session.get_outputs(), "output")


def _version_key(version: str) -> tuple[tuple[int, int, str], ...]:
    """Natural order: ``2 < 10``, ``1.2 < 1.10``; numbers before words."""
    return tuple(
        (0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"[.\-_+]", version)
    )


class VersionState(StrEnum):
    """A model version's state, named as Triton's repository index names them."""

    READY = "READY"
    LOADING = "LOADING"
    UNLOADING = "UNLOADING"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass(frozen=True)
class ModelVersionStatus:
    """One row of the repository index; ``reason`` says why a version is unavailable."""

    model: str
    version: str
    state: VersionState
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Completed:
    """What :meth:`ModelRepository.submit_async` hands back for one request: its ``tag``,
    and either its ``outputs`` or the ``error`` that refused it
    (:class:`DeadlineExceededError`, :class:`BackendError`). ``queued_s`` is how long it
    waited before its batch started; ``compute_s`` and ``batch_rows`` describe the batch it
    ran in (0 when it did not run)."""

    tag: Any
    outputs: dict[str, np.ndarray] | None
    error: CloudError | None
    queued_s: float
    compute_s: float = 0.0
    batch_rows: int = 0


#: Called on the model's scheduler thread, once per batch, with the batch's requests that
#: gave this callback (in queue order).
OnDone = Callable[[Sequence[Completed]], None]


@dataclass(frozen=True, slots=True)
class _Request:
    """A queued request: answered through ``future`` (:meth:`ModelRepository.submit`) or
    through ``on_done`` with ``tag`` (:meth:`ModelRepository.submit_async`)."""

    inputs: dict[str, np.ndarray]
    future: Future[dict[str, np.ndarray]] | None
    arrival_s: float
    on_done: OnDone | None = None
    tag: Any = None


def bundle_model_config(batching: BatchingConfig) -> ModelConfig:
    """How a bundle's cloud part is served: the worker's ``[batching]`` settings as the
    model's batching, and its queue bound as the ``stream`` lane's (where edge features
    go). The stream lane's timeout is long: an edge item is never refused for having
    waited (the agent's outbox re-sends what is unanswered); it is bounded by the queue."""
    delay = batching.max_queue_delay_ms
    defaults = LaneConfigs()
    stream = LaneConfig(
        max_queue_items=batching.max_queue_items,
        timeout_ms=max(60_000.0, 10.0 * delay),
        weight=defaults.stream.weight,
    )
    return ModelConfig(
        max_batch_size=batching.max_batch_size,
        max_queue_delay_ms=delay,
        busy_retry_after_ms=batching.busy_retry_after_ms,
        lanes=LaneConfigs(stream=stream),
    )


class _Meter:
    """The metric children of one model version, looked up once."""

    def __init__(self, metrics: ModelMetrics, model: str, version: str) -> None:
        self._m = metrics
        self.model = model
        self.version = version
        self.compute = metrics.compute_seconds.labels(model=model)
        self.batch_rows = metrics.batch_size.labels(model=model)
        self._lanes = {
            lane: (
                metrics.queue_depth.labels(model=model, lane=lane.value),
                metrics.queue_seconds.labels(model=model, lane=lane.value),
                metrics.request_seconds.labels(model=model, lane=lane.value),
                metrics.lane(model, lane.value),
            )
            for lane in Lane
        }

    def count(self, lane: Lane, outcome: str, n: int = 1) -> None:
        if n:
            self._m.requests.labels(
                model=self.model, version=self.version, lane=lane.value, outcome=outcome
            ).inc(n)

    def depth(self, lane: Lane, delta: int) -> None:
        self._lanes[lane][0].inc(delta)

    def queued(self, lane: Lane, seconds: float) -> None:
        self._lanes[lane][1].observe(seconds)

    def answered(self, lane: Lane, seconds: float) -> None:
        self._lanes[lane][2].observe(seconds)
        self._lanes[lane][3].answered(seconds)

    def arrived(self, lane: Lane, n: int = 1) -> None:
        self._lanes[lane][3].arrived(n)


class _Instance:
    """One loaded version: its backend, metadata, validation and scheduler."""

    def __init__(
        self,
        *,
        model: str,
        version: str,
        config: ModelConfig,
        backend: Backend,
        inputs: tuple[TensorSpec, ...],
        outputs: tuple[TensorSpec, ...],
        max_batch_size: int,
        meter: _Meter,
        clock: Callable[[], float],
        supervisor: Supervisor | None = None,
    ) -> None:
        self.model = model
        self.version = version
        self.config = config
        self.backend = backend
        self.inputs = inputs
        self.outputs = outputs
        self.max_batch_size = max_batch_size
        self.batching = max_batch_size > 0
        self.meter = meter
        self._clock = clock
        self._input_names = tuple(s.name for s in inputs)
        self._where = f"model {model!r} version {version}"
        self._bytes_outputs = {s.name for s in outputs if s.datatype == "BYTES"}
        try:
            policy = SchedulerPolicy.from_model_config(config, max_batch_size)
        except ValueError as exc:
            raise ConfigError(f"model {model!r}: {exc}") from exc
        self.batcher: LaneBatcher[_Request] = LaneBatcher(
            policy,
            self._run_batch,
            self._reject_expired,
            clock=clock,
            name=f"fogline-model-{model}-{version}",
            supervisor=supervisor,
        )

    @property
    def platform(self) -> str:
        return _PLATFORMS.get(self.backend.name, self.backend.name)

    def metadata(self, versions: tuple[str, ...]) -> ModelMetadata:
        return ModelMetadata(
            name=self.model,
            version=self.version,
            platform=self.platform,
            inputs=self.inputs,
            outputs=self.outputs,
            max_batch_size=self.max_batch_size,
            versions=versions,
        )

    # requests in

    def prepare(self, inputs: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
        """Check ``inputs`` against the model; returns the feed and its row count."""
        where = self._where
        for name in inputs:
            if name not in self._input_names:
                raise InferenceInputError(
                    f"unexpected input tensor {name!r}: {where} takes "
                    f"{', '.join(repr(n) for n in self._input_names)}"
                )
        feed: dict[str, np.ndarray] = {}
        rows: int | None = None
        first = ""
        for spec in self.inputs:
            if spec.name not in inputs:
                raise InferenceInputError(f"missing input tensor {spec.name!r} for {where}")
            arr = inputs[spec.name]
            if not isinstance(arr, np.ndarray):
                raise InferenceInputError(
                    f"input tensor {spec.name!r} must be a numpy array, got {type(arr).__name__}"
                )
            datatype = oip_datatype(arr.dtype)
            if datatype != spec.datatype:
                raise InferenceInputError(
                    f"input tensor {spec.name!r} has datatype {datatype or arr.dtype}, "
                    f"{where} expects {spec.datatype}"
                )
            if len(arr.shape) != len(spec.shape) or any(
                want not in (-1, got) for got, want in zip(arr.shape, spec.shape, strict=True)
            ):
                raise InferenceInputError(
                    f"input tensor {spec.name!r} has shape {list(arr.shape)}, {where} expects "
                    f"{list(spec.shape)}"
                )
            if self.batching:
                n = arr.shape[0]
                if rows is None:
                    rows, first = n, spec.name
                elif n != rows:
                    raise InferenceInputError(
                        f"input tensors disagree on the batch size: {first!r} has {rows} rows, "
                        f"{spec.name!r} has {n}"
                    )
            feed[spec.name] = _as_str_objects(spec.name, arr) if datatype == "BYTES" else arr
        if rows is not None:
            if rows < 1:
                raise InferenceInputError(
                    f"input tensor {first!r} has no rows: the batch axis must hold at least one"
                )
            if rows > self.max_batch_size:
                raise InferenceInputError(
                    f"input tensor {first!r} has {rows} rows, more than the max_batch_size "
                    f"({self.max_batch_size}) of {where}"
                )
        return feed, rows or 1

    def enqueue_many(
        self, requests: Sequence[tuple[_Request, int]], lane: Lane, timeout_ms: float | None
    ) -> int:
        """Queue ``(request, rows)`` pairs in order; how many were queued (the rest found
        the lane full)."""
        items = [
            (
                request,
                rows,
                tuple(a.shape[1:] for a in request.inputs.values()) if self.batching else None,
            )
            for request, rows in requests
        ]
        self.meter.depth(lane, len(items))
        queued = 0
        try:
            queued = self.batcher.submit_many(lane, items, timeout_ms=timeout_ms)
        finally:
            self.meter.depth(lane, queued - len(items))
        return queued

    def enqueue(self, request: _Request, lane: Lane, rows: int, timeout_ms: float | None) -> None:
        group: Hashable = (
            tuple(a.shape[1:] for a in request.inputs.values()) if self.batching else None
        )
        self.meter.depth(lane, 1)
        try:
            self.batcher.submit(lane, request, rows=rows, timeout_ms=timeout_ms, group=group)
        except BaseException:
            self.meter.depth(lane, -1)
            raise

    # on the scheduler's thread

    def _run_batch(self, batch: LaneBatch[_Request]) -> None:
        start = self._clock()
        lane = batch.lane
        self.meter.depth(lane, -len(batch))
        live = [
            e
            for e in batch.entries
            if e.item.future is None or e.item.future.set_running_or_notify_cancel()
        ]
        for e in live:
            self.meter.queued(lane, start - e.enqueued_s)
        if live:
            self._run_live(lane, live, start)

    def _run_live(self, lane: Lane, live: Sequence[Queued[_Request]], start: float) -> None:
        rows = sum(e.rows for e in live)
        try:
            try:
                if len(live) == 1:
                    feed = live[0].item.inputs
                else:
                    feed = {
                        n: np.concatenate([e.item.inputs[n] for e in live])
                        for n in self._input_names
                    }
                results = self._split(self.backend.run(feed), live, rows)
            except (CloudError, ValueError, TypeError, KeyError, IndexError) as exc:
                # Backends map their upstream's errors to BackendError; the others are what
                # numpy raises for inputs a batch cannot hold.
                if len(live) > 1:
                    # One bad request must not fail the others: run each alone.
                    log.warning(
                        "model %s version %s: batch of %d failed (%s); running its requests "
                        "one by one",
                        self.model,
                        self.version,
                        rows,
                        exc,
                    )
                    for e in live:
                        self._run_live(lane, (e,), self._clock())
                    return
                self._fail(lane, live, exc)
                return
        except BaseException as exc:
            # Not a failure a backend maps: the scheduler's supervisor logs and counts it;
            # the requests are answered first so that none waits forever.
            self._fail(lane, live, exc)
            raise
        end = self._clock()
        compute_s = end - start
        self.meter.compute.observe(compute_s)
        self.meter.batch_rows.observe(rows)
        # By the callback itself: a bound method is a new object per access but compares equal.
        callbacks: dict[OnDone, list[Completed]] = {}
        for e, result in zip(live, results, strict=True):
            request = e.item
            if request.future is not None:
                request.future.set_result(result)
            elif request.on_done is not None:
                done = Completed(request.tag, result, None, start - e.enqueued_s, compute_s, rows)
                callbacks.setdefault(request.on_done, []).append(done)
            self.meter.answered(lane, end - request.arrival_s)
        self.meter.count(lane, "ok", len(live))
        for on_done, completed in callbacks.items():
            on_done(completed)

    def _fail(self, lane: Lane, live: Sequence[Queued[_Request]], exc: BaseException) -> None:
        error = (
            exc
            if isinstance(exc, BackendError)
            else BackendError(f"model {self.model!r} version {self.version} failed: {exc}")
        )
        rows = sum(e.rows for e in live)
        log.warning(
            "model %s version %s: batch of %d failed: %s", self.model, self.version, rows, exc
        )
        now = self._clock()
        self._settle([(e, Completed(e.item.tag, None, error, now - e.enqueued_s)) for e in live])
        self.meter.count(lane, "backend_error", len(live))

    @staticmethod
    def _settle(answers: Sequence[tuple[Queued[_Request], Completed]]) -> None:
        """Hand failures to their futures and callbacks (one call per callback)."""
        # By the callback itself: a bound method is a new object per access but compares equal.
        callbacks: dict[OnDone, list[Completed]] = {}
        for e, done in answers:
            request = e.item
            if request.future is not None:
                if done.error is not None:
                    request.future.set_exception(done.error)
            elif request.on_done is not None:
                callbacks.setdefault(request.on_done, []).append(done)
        for on_done, completed in callbacks.items():
            on_done(completed)

    def _split(
        self, outputs: Mapping[str, np.ndarray], live: Sequence[Queued[_Request]], rows: int
    ) -> list[dict[str, np.ndarray]]:
        outputs = {
            n: _as_bytes_objects(a) if n in self._bytes_outputs else a for n, a in outputs.items()
        }
        if len(live) == 1:
            return [dict(outputs)]
        # Slices, not np.split: a tenth of the cost for a batch of single rows.
        bounds = [0]
        for e in live:
            bounds.append(bounds[-1] + e.rows)
        spans = list(itertools.pairwise(bounds))
        per: list[dict[str, np.ndarray]] = [{} for _ in live]
        for name, arr in outputs.items():
            if arr.ndim == 0 or arr.shape[0] != rows:
                raise BackendError(
                    f"model {self.model!r} output {name!r} has shape {list(arr.shape)} for a "
                    f"batch of {rows} rows: the model does not batch along its first axis "
                    "(set max_batch_size = 0 in its config.toml)"
                )
            for d, (lo, hi) in zip(per, spans, strict=True):
                d[name] = arr[lo:hi]
        return per

    def _reject_expired(self, entries: Sequence[Queued[_Request]]) -> None:
        now = self._clock()
        answers: list[tuple[Queued[_Request], Completed]] = []
        for e in entries:
            self.meter.depth(e.lane, -1)
            future = e.item.future
            if future is not None and not future.set_running_or_notify_cancel():
                continue
            waited_ms = (now - e.enqueued_s) * 1000.0
            timeout_ms = (e.deadline_s - e.enqueued_s) * 1000.0
            error = DeadlineExceededError(
                f"request to model {self.model!r} version {self.version} waited "
                f"{waited_ms:.0f} ms in the {e.lane.value} lane, past its {timeout_ms:.0f} ms "
                "timeout; rejected unserved"
            )
            answers.append((e, Completed(e.item.tag, None, error, now - e.enqueued_s)))
            self.meter.count(e.lane, "deadline")
        self._settle(answers)

    # life cycle

    def warm_up(self) -> None:
        """Run batch 1 and ``max_batch_size`` (or the declared shapes) once, so the first
        request is fast. A failure is fatal unless the model has dynamic axes besides the
        batch axis, where zero-filled size-1 inputs may simply not suit it."""
        free_axes = any(
            d == -1 for s in self.inputs for d in (s.shape[1:] if self.batching else s.shape)
        )
        # A batching model is warmed by its backend, which knows its batch range (TensorRT
        # builds each context's buffers); one that does not batch, at its declared shapes.
        warm_ups: list[Callable[[], object]] = (
            [self.backend.warmup]
            if self.batching
            else [lambda: self.backend.run({s.name: _dummy(s, 1, False) for s in self.inputs})]
        )
        for warm_up in warm_ups:
            try:
                warm_up()
            except (CloudError, ValueError, TypeError, KeyError) as exc:
                # Backends map their upstream's errors to BackendError; numpy raises the
                # others for zero-filled inputs that do not suit the model.
                if free_axes:
                    log.warning(
                        "model %s version %s: warm-up skipped (%s)", self.model, self.version, exc
                    )
                    return
                raise BackendError(
                    f"model {self.model!r} version {self.version}: warm-up failed: {exc}"
                ) from exc

    def start(self) -> None:
        self.batcher.start()

    def stop(self, timeout_s: float = 60.0) -> None:
        self.batcher.stop(timeout_s)


def _dummy(spec: TensorSpec, batch: int, batching: bool) -> np.ndarray:
    shape = tuple(
        batch if i == 0 and batching else (d if d > 0 else 1) for i, d in enumerate(spec.shape)
    )
    if spec.datatype == "BYTES":
        return np.full(shape, "", dtype=object)
    return np.zeros(shape, NUMPY_DTYPES[spec.datatype])


def _as_str_objects(name: str, arr: np.ndarray) -> np.ndarray:
    """``BYTES`` input as an ``object`` array of :class:`str` (onnxruntime's string form)."""
    if arr.dtype.kind == "U":
        return arr.astype(object)
    out = np.empty(arr.shape, dtype=object)
    flat_in = arr.reshape(-1)
    flat_out = out.reshape(-1)
    for i, value in enumerate(flat_in):
        if isinstance(value, bytes | np.bytes_):
            try:
                flat_out[i] = bytes(value).decode("utf-8")
            except UnicodeDecodeError:
                raise InferenceInputError(
                    f"input tensor {name!r} element {i} is not UTF-8, which string tensors need"
                ) from None
        elif isinstance(value, str):
            flat_out[i] = value
        else:
            raise InferenceInputError(
                f"input tensor {name!r} element {i} is a {type(value).__name__}, not bytes"
            )
    return out


def _as_bytes_objects(arr: np.ndarray) -> np.ndarray:
    """A string output as an ``object`` array of :class:`bytes`."""
    out = np.empty(arr.shape, dtype=object)
    flat_out = out.reshape(-1)
    for i, value in enumerate(arr.reshape(-1)):
        flat_out[i] = value.encode("utf-8") if isinstance(value, str) else bytes(value)
    return out


class _Version:
    def __init__(self, version: str, path: Path, bundle: Bundle | None = None) -> None:
        self.version = version
        self.path = path
        self.bundle = bundle  # the bundle whose cloud part this is, if any
        self.state = VersionState.UNAVAILABLE
        self.reason = "not loaded"
        self.wanted = False
        # Loaded while serving (load_bundle: on demand, a rollout's new version) rather
        # than at start: its load does not make the repository not ready meanwhile.
        self.at_runtime = False
        self.instance: _Instance | None = None
        self.lock = threading.Lock()


class _Model:
    def __init__(self, name: str, config: ModelConfig, directory: Path | None) -> None:
        self.name = name
        self.config = config
        self.directory = directory  # None for a bundle's cloud part
        self.versions: dict[str, _Version] = {}
        self.policy_versions: tuple[str, ...] = ()  # what load(model) serves


@dataclass(frozen=True)
class _Scanned:
    config: ModelConfig
    paths: dict[str, Path]
    selected: tuple[str, ...]


def _scan_model_dir(folder: Path) -> _Scanned:
    """Read one model folder: its config and numbered versions; raises ConfigError."""
    name = folder.name
    cfg_path = folder / CONFIG_FILE
    config = ModelConfig.from_toml(cfg_path) if cfg_path.is_file() else ModelConfig()
    numbers: dict[int, Path] = {}
    for child in folder.iterdir():
        if child.is_dir() and _VERSION_DIR.fullmatch(child.name):
            numbers[int(child.name)] = child / MODEL_FILE
    if not numbers:
        raise ConfigError(
            f"model {name!r}: {folder} has no numbered version folder (e.g. {folder / '1'})"
        )
    for number, path in sorted(numbers.items()):
        if not path.is_file():
            raise ConfigError(f"model {name!r} version {number}: {path} does not exist")
    try:
        selected = config.version_policy.select(list(numbers))
    except ValueError as exc:
        raise ConfigError(f"{cfg_path}: {exc}") from None
    return _Scanned(
        config=config,
        paths={str(n): p for n, p in numbers.items()},
        selected=tuple(str(n) for n in selected),
    )


def _is_model_folder(model: str, folder: Path) -> bool:
    """Whether ``folder`` (the folder ``model`` would have) is a directory.

    A name longer than the file system's names may be is no folder: ``Path.is_dir``
    raises that ``OSError`` (ENAMETOOLONG) instead of answering false, and an HTTP caller
    can send such a name. Any other failure to look is a :class:`ConfigError`.
    """
    try:
        return folder.is_dir()
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            return False
        raise ConfigError(f"model {model!r}: {folder} cannot be examined: {exc}") from None


def _combined(failures: Sequence[CloudError]) -> CloudError:
    """One error for several load failures: the failure itself when alone, otherwise a
    :class:`ConfigError` when all are configuration errors, else a :class:`BackendError`."""
    if len(failures) == 1:
        return failures[0]
    message = "; ".join(str(f) for f in failures)
    if all(isinstance(f, ConfigError) for f in failures):
        return ConfigError(message)
    return BackendError(message)


class ModelRepository:
    """The models behind the inference API (see the module docstring).

    ``directory`` is a Triton-layout model repository and ``bundles`` bundle directories
    (or loaded bundles) whose cloud parts are served too; ``models`` limits the directory
    to the named models. ``backend`` is ``auto``, ``onnxruntime``, ``tensorrt`` or a
    :class:`BackendChoice`; ``threads`` is onnxruntime's intra-op thread count per version
    (0: its default) and ``tensorrt`` the TensorRT settings: every model gets both through
    :func:`~fogline.cloud_service._backends.load_backend`, whether it came from the
    directory or from a bundle. ``bundle_config`` is how bundles' cloud parts are served
    (default: :class:`ModelConfig`'s defaults; a worker passes :func:`bundle_model_config`).
    ``backend_loader`` replaces the backend factory (tests instrument it). Construction
    only scans (bad layout or config raises :class:`ConfigError`); :meth:`start` loads and
    warms every model, :meth:`stop` drains and ends them. :meth:`load_bundle` adds a bundle
    version at run time, beside those already served.
    """

    def __init__(
        self,
        directory: str | Path | None = None,
        *,
        bundles: Sequence[str | Path | Bundle] = (),
        models: Collection[str] | None = None,
        backend: str | BackendChoice = "auto",
        threads: int = 1,
        tensorrt: TensorRTConfig | None = None,
        bundle_config: ModelConfig | None = None,
        metrics: CloudMetrics | None = None,
        backend_loader: BackendLoader | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if threads < 0:
            raise ValueError(f"threads must be 0 (backend default) or more, got {threads}")
        trt = tensorrt or TensorRTConfig()
        self._settings = BackendSettings(
            threads=threads,
            engine_cache_dir=trt.engine_cache_dir,
            fp16=trt.fp16,
            device_id=trt.device_id,
            execution_contexts=trt.execution_contexts,
            opt_batch_size=trt.opt_batch_size,
        )
        self._bundle_config = bundle_config or ModelConfig()
        self._directory = None if directory is None else Path(directory)
        self._only = None if models is None else frozenset(models)
        self._backend = backend
        self._choice: BackendChoice | None = backend if isinstance(backend, BackendChoice) else None
        self.metrics = metrics if metrics is not None else CloudMetrics()
        # The model versions' scheduler threads run under this supervisor: a batch that
        # fails is answered and counted, and the thread carries on; an escape from the
        # scheduling itself is fatal (see LaneBatcher) and ready turns false for good.
        self.supervisor = Supervisor("the model repository", log)
        self.metrics.thread_failures.add(self.supervisor.counts)
        self._loader = backend_loader
        self._clock = clock
        self._models: dict[str, _Model] = {}
        self._lock = threading.Lock()  # guards _models
        self._admin = threading.RLock()  # one load / unload / start / stop at a time
        self._started = False
        self._stopped = False
        self._scan(bundles)

    @classmethod
    def from_directory(cls, directory: str | Path, **kwargs: Any) -> ModelRepository:
        """Scan ``directory`` (keyword arguments as for the constructor)."""
        return cls(directory, **kwargs)

    # scanning

    def _scan(self, bundles: Sequence[str | Path | Bundle]) -> None:
        if self._directory is not None:
            if not self._directory.is_dir():
                raise ConfigError(f"model repository {self._directory} is not a directory")
            for folder in sorted(self._directory.iterdir()):
                if not folder.is_dir() or folder.name.startswith("."):
                    continue
                if self._only is not None and folder.name not in self._only:
                    continue
                self._add_dir_model(folder, _scan_model_dir(folder))
        for item in bundles:
            self._add_bundle(_read_bundle(item))
        if self._only is not None:
            missing = sorted(self._only - set(self._models))
            if missing:
                where = self._directory or "the bundles given"
                raise ConfigError(f"no model named {missing[0]!r} in {where}")

    def _add_bundle(self, bundle: Bundle) -> _Version:
        """Register a bundle's cloud part as a version of the model named after the bundle
        (not loaded yet); raises :class:`ConfigError` for a clash."""
        with self._lock:
            entry = self._models.get(bundle.name)
            if entry is None:
                entry = _Model(bundle.name, self._bundle_config, None)
                self._models[bundle.name] = entry
        if entry.directory is not None:
            raise ConfigError(
                f"bundle {bundle.id} is named like model {bundle.name!r} of the repository"
            )
        if bundle.version in entry.versions:
            raise ConfigError(f"bundle {bundle.id} is listed twice ({bundle.root})")
        v = _Version(bundle.version, bundle.cloud_model_path, bundle)
        entry.versions[bundle.version] = v
        entry.policy_versions = tuple(sorted(entry.versions, key=_version_key))
        return v

    def _add_dir_model(self, folder: Path, scanned: _Scanned) -> _Model:
        entry = self._models.get(folder.name)
        if entry is None:
            entry = _Model(folder.name, scanned.config, folder)
            with self._lock:
                self._models[folder.name] = entry
        entry.config = scanned.config
        for version, path in scanned.paths.items():
            if version not in entry.versions:
                entry.versions[version] = _Version(version, path)
        entry.policy_versions = scanned.selected
        return entry

    def _rescan(self, model: str) -> _Model:
        """Re-read a directory model's folder (new versions, changed config); a bundle
        model as it is. Raises :class:`UnknownModelError` or :class:`ConfigError`."""
        entry = self._models.get(model)
        if entry is not None and entry.directory is None:
            return entry
        folder = None if self._directory is None else self._directory / model
        if (
            folder is None
            or model.startswith(".")
            or "/" in model
            or not _is_model_folder(model, folder)
        ):
            if entry is not None:  # its folder is gone: stop serving it
                for v in list(entry.versions.values()):
                    self._unload_version(entry, v)
                with self._lock:
                    del self._models[model]
            raise UnknownModelError(model)
        entry = self._add_dir_model(folder, _scan_model_dir(folder))
        gone = [v for v in entry.versions.values() if not (folder / v.version).is_dir()]
        for v in gone:
            self._unload_version(entry, v)
            del entry.versions[v.version]
        return entry

    # life cycle

    def start(self, *, strict: bool = True) -> None:
        """Load and warm every model's versions (per their version policy).

        With ``strict``, raises the failure (:class:`ConfigError` for a config that does
        not fit its model, :class:`BackendError` otherwise; several are joined in one
        message); without, failures are logged and leave :attr:`ready` false.
        """
        with self._admin:
            if self._stopped:
                raise RuntimeError("the model repository is stopped")
            self._started = True
            failures: list[CloudError] = []
            for entry in list(self._models.values()):
                for version in entry.policy_versions:
                    try:
                        self._load_version(entry, entry.versions[version])
                    except CloudError as exc:
                        failures.append(exc)
            for failure in failures:
                log.error("failed to load: %s", failure)
            if failures and strict:
                raise _combined(failures)

    def stop(self, timeout_s: float = 60.0) -> None:
        """Refuse new requests, answer what is queued, and end every scheduler thread."""
        with self._admin:
            self._stopped = True
            for entry in list(self._models.values()):
                for v in list(entry.versions.values()):
                    self._unload_version(entry, v, reason="repository stopped", timeout_s=timeout_s)

    close = stop

    def __enter__(self) -> ModelRepository:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def load(self, model: str, version: str | None = None) -> None:
        """Load (or reload) ``model`` at run time; blocks until ready or failed.

        ``version=None`` re-reads the model's folder and config and serves what its version
        policy selects, unloading versions it no longer selects; a version names one
        version to load. Ready versions whose config did not change are left alone; those
        whose config did are rebuilt and swapped in without refusing a request. Raises
        :class:`UnknownModelError`, :class:`ConfigError` or :class:`BackendError`.
        """
        with self._admin:
            if self._stopped:
                raise ModelNotReadyError("the model repository is stopped")
            self._started = True
            entry = self._rescan(model)
            if version is not None:
                v = entry.versions.get(version)
                if v is None:
                    raise UnknownModelError(model, version)
                self._load_version(entry, v)
                return
            for v in list(entry.versions.values()):
                if v.version not in entry.policy_versions and v.instance is not None:
                    self._unload_version(entry, v)
            failures: list[CloudError] = []
            for name in entry.policy_versions:
                try:
                    self._load_version(entry, entry.versions[name])
                except CloudError as exc:
                    failures.append(exc)
            if failures:
                raise _combined(failures)

    def unload(self, model: str, version: str | None = None) -> None:
        """Stop serving ``model`` (every version) or one ``version`` of it: new requests are
        refused with :class:`ModelNotReadyError`, queued ones are answered first, then the
        backend is released. Raises :class:`UnknownModelError` for an unknown one."""
        with self._admin:
            entry = self._entry(model)
            if version is None:
                targets = list(entry.versions.values())
            else:
                v = entry.versions.get(version)
                if v is None:
                    raise UnknownModelError(model, version)
                targets = [v]
            for v in targets:
                self._unload_version(entry, v)

    def load_bundle(self, source: str | Path | Bundle) -> Bundle:
        """Serve another bundle version at run time, beside every version already served
        (of this bundle or others, which are not paused); blocks until it is ready.

        A version already registered is (re)loaded. Raises :class:`ConfigError` for a
        directory that is not a bundle or a name that clashes with a directory model, and
        :class:`BackendError` when it cannot be loaded. A version that was not to be
        served before this call and fails to load stays unavailable without holding
        :attr:`ready` back: readiness is about what should be served, and this never was."""
        bundle = _read_bundle(source)
        with self._admin:
            if self._stopped:
                raise ModelNotReadyError("the model repository is stopped")
            self._started = True
            with self._lock:
                entry = self._models.get(bundle.name)
            v = None if entry is None else entry.versions.get(bundle.version)
            if entry is None or v is None or v.bundle is None:
                v = self._add_bundle(bundle)
                v.at_runtime = True
                entry = self._entry(bundle.name)
            was_wanted = v.wanted
            try:
                self._load_version(entry, v)
            except CloudError:
                with v.lock:
                    if v.instance is None and not was_wanted:
                        v.wanted = False
                raise
            return bundle

    def bundle(self, bundle_id: str) -> Bundle | None:
        """The ready bundle version named ``name@version``, or None when it is not served
        (unknown, loading, unloaded or failed)."""
        name, sep, version = bundle_id.rpartition("@")
        if not sep:
            return None
        with self._lock:
            entry = self._models.get(name)
        v = None if entry is None else entry.versions.get(version)
        if v is None or v.bundle is None or v.state != VersionState.READY:
            return None
        return v.bundle

    def bundles(self) -> list[Bundle]:
        """Every ready bundle version, ordered by name and version."""
        with self._lock:
            entries = sorted(self._models.values(), key=lambda e: e.name)
        return [
            v.bundle
            for e in entries
            for v in sorted(e.versions.values(), key=lambda v: _version_key(v.version))
            if v.bundle is not None and v.state == VersionState.READY
        ]

    def backend_name(self, model: str, version: str) -> str | None:
        """The backend a ready version runs on, or None."""
        instance = self._version(self._entry(model), version).instance
        return None if instance is None else instance.backend.name

    def _choose_backend(self) -> BackendChoice:
        if self._choice is None:
            requested = self._backend if isinstance(self._backend, str) else "auto"
            try:
                self._choice = select_backend(requested)
            except ValueError as exc:
                raise ConfigError(str(exc)) from exc
            log.info("model backend: %s (%s)", self._choice.kind, self._choice.reason)
            if (
                self._choice.kind == "tensorrt"
                or self._choice.device == "cuda"
                or any(p != "CPUExecutionProvider" for p in self._choice.providers)
            ):
                self.metrics.models.watch_gpu_memory()
        return self._choice

    def _load_backend(self, path: Path, max_batch_size: int) -> Backend:
        if self._loader is not None:
            return self._loader(path, max_batch_size)
        return load_backend(
            self._choose_backend(), path, max_batch_size=max_batch_size, settings=self._settings
        )

    def _load_version(self, entry: _Model, v: _Version) -> None:
        with v.lock:
            v.wanted = True
            current = v.instance
            if current is not None and v.state == VersionState.READY:
                if current.config == entry.config:
                    return
            else:
                v.state, v.reason = VersionState.LOADING, ""
        instance: _Instance | None = None
        reason = "failed to load"
        try:
            instance = self._build(entry, v)
        except CloudError as exc:
            reason = str(exc)
            raise
        except (ValueError, TypeError, OSError) as exc:
            # Backend constructors validate their settings (ValueError) and read files.
            error = BackendError(f"model {entry.name!r} version {v.version}: {exc}")
            reason = str(error)
            raise error from exc
        finally:
            if instance is None:  # whatever failed, the version must not stay LOADING
                with v.lock:
                    if v.instance is None:
                        v.state, v.reason = VersionState.UNAVAILABLE, reason
        with v.lock:
            old, v.instance = v.instance, instance
            v.state, v.reason = VersionState.READY, ""
        log.info("model %s version %s is ready", entry.name, v.version)
        if old is not None:
            old.stop()

    def _build(self, entry: _Model, v: _Version) -> _Instance:
        where = f"model {entry.name!r} version {v.version}"
        if not v.path.is_file():
            raise ConfigError(f"{where}: {v.path} does not exist")
        inputs, outputs = read_signature(v.path)
        fixed = next((s for s in (*inputs, *outputs) if s.shape and s.shape[0] != -1), None)
        can_batch = bool(inputs) and fixed is None
        if any(not s.shape for s in inputs):
            can_batch = False
        configured = entry.config.max_batch_size
        if configured is None:
            max_batch_size = DEFAULT_MAX_BATCH_SIZE if can_batch else 0
        elif configured > 0 and not can_batch:
            why = (
                f"the first axis of {fixed.name!r} is fixed ({list(fixed.shape)})"
                if fixed is not None
                else "it has a scalar input or no inputs"
            )
            raise ConfigError(f"{where}: max_batch_size = {configured}, but {why}")
        else:
            max_batch_size = configured
        if v.bundle is not None:
            _check_bundle(v.bundle, inputs, outputs)
        meter = _Meter(self.metrics.models, entry.name, v.version)
        backend = self._load_backend(v.path, max(1, max_batch_size))
        if set(backend.input_names) != {s.name for s in inputs}:
            raise BackendError(
                f"{where}: the backend sees inputs {sorted(backend.input_names)}, the model "
                f"declares {sorted(s.name for s in inputs)}"
            )
        instance = _Instance(
            model=entry.name,
            version=v.version,
            config=entry.config,
            backend=backend,
            inputs=inputs,
            outputs=outputs,
            max_batch_size=max_batch_size,
            meter=meter,
            clock=self._clock,
            supervisor=self.supervisor,
        )
        instance.warm_up()
        instance.start()
        return instance

    def _unload_version(
        self,
        entry: _Model,
        v: _Version,
        *,
        reason: str = "unloaded",
        timeout_s: float = 60.0,
    ) -> None:
        with v.lock:
            v.wanted = False
            instance = v.instance
            if instance is None:
                if v.state != VersionState.LOADING:
                    v.state, v.reason = VersionState.UNAVAILABLE, reason
                return
            v.state, v.reason = VersionState.UNLOADING, ""
        instance.stop(timeout_s)
        with v.lock:
            if v.instance is instance:
                v.instance = None
                v.state, v.reason = VersionState.UNAVAILABLE, reason
        log.info("model %s version %s unloaded", entry.name, v.version)

    @property
    def backend_choice(self) -> BackendChoice | None:
        """The backend models load into and why (None until the first load picks it, or
        when a ``backend_loader`` replaces it)."""
        return self._choice

    # ModelProvider

    @property
    def failed(self) -> ThreadFailure | None:
        """The scheduler thread failure that ended a model version's serving for good, or
        None. Once set, :attr:`ready` stays false: the process should be restarted
        (``fogline cloud serve`` exits 70)."""
        return self.supervisor.failed

    @property
    def ready(self) -> bool:
        """Started, not stopped, no scheduler thread failed for good, and every version
        that should be served is ready — but for bundle versions added while serving
        (:meth:`load_bundle`): the others serve on while one of those loads (a TensorRT
        engine build can take minutes), and its own state says how it went."""
        if not self._started or self._stopped or self.supervisor.failed is not None:
            return False
        with self._lock:
            entries = list(self._models.values())
        return all(
            v.state == VersionState.READY
            for e in entries
            for v in list(e.versions.values())
            if v.wanted and not v.at_runtime
        )

    def model_names(self) -> list[str]:
        with self._lock:
            return sorted(self._models)

    def index(self) -> list[ModelVersionStatus]:
        """Every known model version with its state (Triton's repository index)."""
        with self._lock:
            entries = sorted(self._models.values(), key=lambda e: e.name)
        rows = []
        for e in entries:
            for v in sorted(e.versions.values(), key=lambda v: _version_key(v.version)):
                rows.append(ModelVersionStatus(e.name, v.version, v.state, v.reason))
        return rows

    def metadata(self, model: str, version: str | None = None) -> ModelMetadata:
        entry = self._entry(model)
        v = self._version(entry, version)
        instance = v.instance
        if v.state != VersionState.READY or instance is None:
            raise self._not_ready(entry, v)
        return instance.metadata(self._ready_versions(entry))

    def is_ready(self, model: str, version: str | None = None) -> bool:
        entry = self._entry(model)
        if version is None:
            return bool(self._ready_versions(entry))
        v = entry.versions.get(version)
        if v is None:
            raise UnknownModelError(model, version)
        return v.state == VersionState.READY

    def submit(
        self,
        model: str,
        version: str | None,
        inputs: Mapping[str, np.ndarray],
        *,
        lane: Lane = Lane.INTERACTIVE,
        timeout_ms: float | None = None,
    ) -> Future[dict[str, np.ndarray]]:
        """Queue one request and return a future of its outputs (any thread may call it).

        Raises at once what needs no queueing: :class:`UnknownModelError`,
        :class:`ModelNotReadyError`, :class:`InferenceInputError` and
        :class:`QueueFullError`; the future fails with :class:`DeadlineExceededError` or
        :class:`BackendError`.
        """
        future: Future[dict[str, np.ndarray]] = Future()
        self._enqueue(model, version, inputs, lane, timeout_ms, future, None, None)
        return future

    def submit_async(
        self,
        model: str,
        version: str | None,
        inputs: Mapping[str, np.ndarray],
        *,
        on_done: OnDone,
        tag: Any = None,
        lane: Lane = Lane.INTERACTIVE,
        timeout_ms: float | None = None,
    ) -> None:
        """Queue one request whose answer goes to ``on_done`` (as a :class:`Completed` with
        ``tag``) on the model's scheduler thread, once per batch for all the requests of
        that batch that gave the same callback: nobody waits on a future per request.

        Raises at once what :meth:`submit` raises at once. ``on_done`` must be quick and
        must not raise (it runs on the thread that runs the model)."""
        self._enqueue(model, version, inputs, lane, timeout_ms, None, on_done, tag)

    def submit_many_async(
        self,
        model: str,
        version: str | None,
        requests: Sequence[tuple[Mapping[str, np.ndarray], Any]],
        *,
        on_done: OnDone,
        lane: Lane = Lane.INTERACTIVE,
        timeout_ms: float | None = None,
    ) -> list[tuple[Any, CloudError]]:
        """:meth:`submit_async` for several ``(inputs, tag)`` requests to one version, queued
        together (they can share a batch, and wake the scheduler at most once).

        Raises at once, for all of them, :class:`UnknownModelError` and
        :class:`ModelNotReadyError`; returns the ``(tag, error)`` of each request refused
        alone (:class:`InferenceInputError`, :class:`QueueFullError`), in order."""
        arrival = self._clock()
        lane = Lane(lane)
        entry = self._entry(model)
        if timeout_ms is not None and not timeout_ms > 0:
            raise InferenceInputError(f"timeout must be positive, got {timeout_ms} ms")
        for _ in range(3):  # a version may be swapped (reloaded) between the steps below
            v = self._version(entry, version)
            instance = v.instance
            if v.state != VersionState.READY or instance is None:
                self.metrics.models.requests.labels(
                    model=model, version=v.version, lane=lane.value, outcome="not_ready"
                ).inc(len(requests))
                raise self._not_ready(entry, v)
            refused: list[tuple[Any, CloudError]] = []
            ready: list[tuple[_Request, int]] = []
            instance.meter.arrived(lane, len(requests))
            for inputs, tag in requests:
                try:
                    feed, rows = instance.prepare(inputs)
                except InferenceInputError as exc:
                    instance.meter.count(lane, "bad_input")
                    refused.append((tag, exc))
                    continue
                ready.append((_Request(feed, None, arrival, on_done, tag), rows))
            with v.lock:
                if v.instance is not instance or v.state != VersionState.READY:
                    continue
                queued = instance.enqueue_many(ready, lane, timeout_ms) if ready else 0
            if queued < len(ready):
                instance.meter.count(lane, "queue_full", len(ready) - queued)
                full = QueueFullError(
                    instance.batcher.depth(lane), instance.batcher.policy.retry_after_ms
                )
                refused.extend((request.tag, full) for request, _ in ready[queued:])
            return refused
        raise ModelNotReadyError(f"model {model!r} is being reloaded; retry")

    def _enqueue(
        self,
        model: str,
        version: str | None,
        inputs: Mapping[str, np.ndarray],
        lane: Lane,
        timeout_ms: float | None,
        future: Future[dict[str, np.ndarray]] | None,
        on_done: OnDone | None,
        tag: Any,
    ) -> None:
        arrival = self._clock()
        lane = Lane(lane)
        entry = self._entry(model)
        for _ in range(3):  # a version may be swapped (reloaded) between the steps below
            v = self._version(entry, version)
            instance = v.instance
            if v.state != VersionState.READY or instance is None:
                self.metrics.models.requests.labels(
                    model=model, version=v.version, lane=lane.value, outcome="not_ready"
                ).inc()
                raise self._not_ready(entry, v)
            instance.meter.arrived(lane)
            if timeout_ms is not None and not timeout_ms > 0:
                instance.meter.count(lane, "bad_input")
                raise InferenceInputError(f"timeout must be positive, got {timeout_ms} ms")
            try:
                feed, rows = instance.prepare(inputs)
            except InferenceInputError:
                instance.meter.count(lane, "bad_input")
                raise
            request = _Request(feed, future, arrival, on_done, tag)
            with v.lock:
                if v.instance is not instance or v.state != VersionState.READY:
                    continue
                try:
                    instance.enqueue(request, lane, rows, timeout_ms)
                except QueueFullError:
                    instance.meter.count(lane, "queue_full")
                    raise
            return
        raise ModelNotReadyError(f"model {model!r} is being reloaded; retry")

    async def infer(
        self,
        model: str,
        version: str | None,
        inputs: Mapping[str, np.ndarray],
        *,
        lane: Lane = Lane.INTERACTIVE,
        timeout_ms: float | None = None,
    ) -> dict[str, np.ndarray]:
        """:meth:`submit`, awaited: the answer comes back on the caller's event loop."""
        future = self.submit(model, version, inputs, lane=lane, timeout_ms=timeout_ms)
        return await asyncio.wrap_future(future)

    def policy(self, model: str, version: str | None = None) -> SchedulerPolicy:
        """The scheduling policy a ready version runs with."""
        entry = self._entry(model)
        v = self._version(entry, version)
        instance = v.instance
        if instance is None:
            raise self._not_ready(entry, v)
        return instance.batcher.policy

    # lookups

    def _entry(self, model: str) -> _Model:
        with self._lock:
            entry = self._models.get(model)
        if entry is None:
            raise UnknownModelError(model)
        return entry

    def _version(self, entry: _Model, version: str | None) -> _Version:
        if version is not None:
            v = entry.versions.get(version)
            if v is None:
                raise UnknownModelError(entry.name, version)
            return v
        versions = list(entry.versions.values())
        ready = [v for v in versions if v.state == VersionState.READY]
        pool = ready or versions
        if not pool:
            raise ModelNotReadyError(f"model {entry.name!r} has no version")
        return max(pool, key=lambda v: _version_key(v.version))

    def _ready_versions(self, entry: _Model) -> tuple[str, ...]:
        ready = [v.version for v in list(entry.versions.values()) if v.state == VersionState.READY]
        return tuple(sorted(ready, key=_version_key))

    @staticmethod
    def _not_ready(entry: _Model, v: _Version) -> ModelNotReadyError:
        state = v.state.value.lower()
        why = f": {v.reason}" if v.reason else ""
        return ModelNotReadyError(f"version {v.version} of model {entry.name!r} is {state}{why}")


def _read_bundle(source: str | Path | Bundle) -> Bundle:
    if isinstance(source, Bundle):
        return source
    try:
        return Bundle.load(source)
    except BundleError as exc:
        raise ConfigError(f"bundle {source}: {exc}") from exc


def _check_bundle(
    bundle: Bundle, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]
) -> None:
    """A bundle's cloud part must read only what its edge part sends and give the output
    its manifest names; raises :class:`ConfigError`."""
    sent = bundle.edge.feature_outputs
    missing = [s.name for s in inputs if s.name not in sent]
    if missing:
        raise ConfigError(
            f"bundle {bundle.id}: the cloud model needs {', '.join(missing)}, which the "
            f"edge part does not send (feature_outputs: {', '.join(sent)})"
        )
    if bundle.cloud.output not in {s.name for s in outputs}:
        raise ConfigError(
            f"bundle {bundle.id}: the cloud model has no output {bundle.cloud.output!r}"
        )
