"""``fogline cloud batch``: score a file of inputs through a model at the bulk lane.

The input is an ``.npz`` whose arrays are named after the model's inputs, first axis =
items; the output is an ``.npz`` of every model output, in the same item order. Items go
through the same :class:`~._repository.ModelRepository` (and so the same scheduler, limits
and metrics) as online requests, in chunks of ``--chunk`` rows at the ``BULK`` lane, a few
chunks in flight so the model never waits for the next one. On a shared worker the bulk
lane takes what the interactive and stream lanes leave (see :mod:`._scheduler`).

For a model that does not batch (``max_batch_size`` 0), each item ``array[i]`` is one
request shaped as the model declares, and outputs are stacked along a new first axis.
"""

from __future__ import annotations

import os
import tempfile
import time
import zipfile
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import typer

from fogline._cli import fail
from fogline.cloud_service._serving import Lane, ModelMetadata
from fogline.cloud_service.errors import (
    CloudDataError,
    CloudServiceError,
    InferenceInputError,
    QueueFullError,
)

if TYPE_CHECKING:
    from fogline.cloud_service._repository import ModelRepository

__all__ = ["batch_command", "load_inputs", "save_outputs", "score"]

DEFAULT_IN_FLIGHT = 4


def load_inputs(path: str | Path) -> dict[str, np.ndarray]:
    """Read the arrays of an ``.npz`` file (never unpickling); raises
    :class:`InferenceInputError` naming the file for anything unreadable."""
    path = Path(path)
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise InferenceInputError(f"{path} is a single .npy array, not an .npz archive")
        with loaded as npz:
            return {name: npz[name] for name in npz.files}
    except FileNotFoundError:
        raise InferenceInputError(f"input file {path} does not exist") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise InferenceInputError(f"input file {path} is not a readable .npz: {exc}") from None


def _fit_inputs(
    meta: ModelMetadata, arrays: Mapping[str, np.ndarray], source: str
) -> tuple[dict[str, np.ndarray], int]:
    """The file's arrays, checked against the model's inputs and cast where numpy can do
    so without changing kind (float64 → FP32); returns them and the item count."""
    from fogline.cloud_service._repository import NUMPY_DTYPES, oip_datatype

    wanted = {s.name: s for s in meta.inputs}
    takes = ", ".join(repr(n) for n in wanted)
    for name in arrays:
        if name not in wanted:
            raise InferenceInputError(
                f"{source} has an array {name!r}, but model {meta.name!r} takes {takes}"
            )
    fitted: dict[str, np.ndarray] = {}
    items: int | None = None
    for name, spec in wanted.items():
        if name not in arrays:
            raise InferenceInputError(f"{source} has no array {name!r} (model takes {takes})")
        arr = arrays[name]
        if arr.ndim == 0:
            raise InferenceInputError(f"{source}: array {name!r} is a scalar, not a list of items")
        got = oip_datatype(arr.dtype)
        if got != spec.datatype:
            target = NUMPY_DTYPES[spec.datatype]
            if spec.datatype == "BYTES" or not np.can_cast(arr.dtype, target, "same_kind"):
                raise InferenceInputError(
                    f"{source}: array {name!r} has dtype {arr.dtype}, model {meta.name!r} "
                    f"expects {spec.datatype}"
                )
            arr = arr.astype(target)
        if items is None:
            items = arr.shape[0]
        elif arr.shape[0] != items:
            raise InferenceInputError(
                f"{source}: arrays disagree on the number of items ({items} vs "
                f"{arr.shape[0]} in {name!r})"
            )
        fitted[name] = arr
    if not items:
        raise InferenceInputError(f"{source} holds no items")
    return fitted, items


def score(
    repository: ModelRepository,
    model: str,
    arrays: Mapping[str, np.ndarray],
    *,
    version: str | None = None,
    chunk: int | None = None,
    in_flight: int = DEFAULT_IN_FLIGHT,
    on_progress: Callable[[int], None] | None = None,
    source: str = "the input",
) -> dict[str, np.ndarray]:
    """Score every item of ``arrays`` through ``model`` at the bulk lane.

    ``chunk`` rows go in each request (default and maximum: the model's
    ``max_batch_size``); up to ``in_flight`` requests wait at a time, and a refused one is
    retried after the back-off the queue asks for. ``on_progress(n)`` is called as each
    ``n`` items are done. Raises :class:`InferenceInputError` for inputs that do not fit,
    and the service errors of the repository (:class:`DeadlineExceededError`,
    :class:`BackendError`) when scoring fails.
    """
    if in_flight < 1:
        raise ValueError(f"in_flight must be at least 1, got {in_flight}")
    meta = repository.metadata(model, version)
    fitted, items = _fit_inputs(meta, arrays, source)
    batching = meta.max_batch_size > 0
    if batching:
        step = meta.max_batch_size if chunk is None else chunk
        if not 1 <= step <= meta.max_batch_size:
            raise InferenceInputError(
                f"chunk {step} must lie in 1..{meta.max_batch_size} (the max_batch_size of "
                f"model {model!r})"
            )
        spans = [(i, min(i + step, items)) for i in range(0, items, step)]
    else:
        if chunk is not None and chunk < 1:
            raise InferenceInputError(f"chunk must be at least 1, got {chunk}")
        spans = [(i, i + 1) for i in range(items)]

    def request(start: int, stop: int) -> dict[str, np.ndarray]:
        if batching:
            return {n: a[start:stop] for n, a in fitted.items()}
        return {n: a[start] for n, a in fitted.items()}

    pending: deque[tuple[int, Future[dict[str, np.ndarray]]]] = deque()
    parts: dict[str, list[np.ndarray]] = {}

    def collect_oldest() -> None:
        n, future = pending.popleft()
        for name, arr in future.result().items():
            parts.setdefault(name, []).append(arr)
        if on_progress is not None:
            on_progress(n)

    for start, stop in spans:
        while True:
            try:
                future = repository.submit(
                    model, meta.version, request(start, stop), lane=Lane.BULK
                )
                break
            except QueueFullError as exc:
                if pending:
                    collect_oldest()
                else:
                    time.sleep(exc.retry_after_ms / 1000.0)
        pending.append((stop - start, future))
        if len(pending) >= in_flight:
            collect_oldest()
    while pending:
        collect_oldest()
    join = np.concatenate if batching else np.stack
    return {name: join(chunks) for name, chunks in parts.items()}


def save_outputs(path: str | Path, outputs: Mapping[str, np.ndarray]) -> None:
    """Write ``outputs`` as an ``.npz`` at exactly ``path``, atomically. ``BYTES`` outputs
    are stored as numpy byte strings so the file loads without unpickling."""
    path = Path(path)
    plain: dict[str, Any] = {}
    for name, arr in outputs.items():
        if arr.dtype == object:
            flat = [bytes(v) for v in arr.reshape(-1)]
            plain[name] = np.array(flat, dtype=bytes).reshape(arr.shape)
        else:
            plain[name] = arr
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **plain)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def batch_command(
    model_repository: Annotated[
        Path, typer.Option("--model-repository", help="Model repository directory.")
    ],
    model: Annotated[str, typer.Option("--model", help="Model to score with.")],
    input_file: Annotated[
        Path,
        typer.Option("--input", "-i", help=".npz with one array per model input, items first."),
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write outputs (.npz).")],
    version: Annotated[
        str | None, typer.Option("--version", help="Model version (default: the latest).")
    ] = None,
    chunk: Annotated[
        int | None,
        typer.Option("--chunk", help="Rows per request (default: the model's max_batch_size)."),
    ] = None,
    threads: Annotated[
        int, typer.Option(help="onnxruntime intra-op threads (0: one per core).")
    ] = 0,
    backend: Annotated[str, typer.Option(help="auto, onnxruntime, tensorrt or torch.")] = "auto",
    progress: Annotated[bool, typer.Option(help="Show a progress bar on stderr.")] = True,
) -> None:
    """Score a file of inputs through a model of the repository, at low priority."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from fogline.cloud_service._config import BACKEND_KINDS
    from fogline.cloud_service._repository import ModelRepository

    if chunk is not None and chunk < 1:
        fail(f"--chunk must be at least 1, got {chunk}")
    if threads < 0:
        fail(f"--threads must be 0 or more, got {threads}")
    if backend not in BACKEND_KINDS:
        fail(f"--backend {backend!r} must be one of {', '.join(BACKEND_KINDS)}")
    try:
        arrays = load_inputs(input_file)
        repository = ModelRepository(
            model_repository, models=[model], backend=backend, threads=threads
        )
    except CloudDataError as exc:
        fail(str(exc))
    console = Console(stderr=True)
    try:
        try:
            if version is None:
                repository.start()
            else:
                repository.load(model, version)
        except CloudDataError as exc:
            fail(str(exc))
        except CloudServiceError as exc:
            fail(str(exc), code=1)
        began = time.monotonic()
        columns = (
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("items"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=console, disable=not progress) as bar:
            total = max((a.shape[0] for a in arrays.values() if a.ndim), default=0)
            task = bar.add_task(f"{model}", total=total or None)
            try:
                outputs = score(
                    repository,
                    model,
                    arrays,
                    version=version,
                    chunk=chunk,
                    on_progress=lambda n: bar.advance(task, n),
                    source=str(input_file),
                )
            except CloudDataError as exc:
                fail(str(exc))
            except CloudServiceError as exc:
                fail(str(exc), code=1)
        try:
            save_outputs(output, outputs)
        except OSError as exc:
            fail(f"cannot write {output}: {exc}", code=1)
        elapsed = time.monotonic() - began
        items = next(iter(outputs.values())).shape[0] if outputs else 0
        rate = items / elapsed if elapsed > 0 else float("inf")
        typer.echo(
            f"scored {items} items with {model} in {elapsed:.2f} s ({rate:.0f} items/s) -> {output}"
        )
    finally:
        repository.stop()
