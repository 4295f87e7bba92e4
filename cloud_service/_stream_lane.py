"""Edge features through the model repository's ``stream`` lane.

When a worker also serves the inference API, both paths run the same bundle cloud models.
Rather than two sessions competing for the cores with no notion of priority, the MQTT
ingest hands each batch it formed to the repository as one ``stream``-lane request, so
interactive HTTP requests, streaming features and bulk jobs share one scheduler per model
with the lane weights documented in docs/inference-api.md.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fogline.cloud_service._repository import ModelRepository
from fogline.cloud_service._serving import Lane
from fogline.cloud_service.errors import (
    BackendError,
    CloudDataError,
    DeadlineExceededError,
    QueueFullError,
)
from fogline.sync import Bundle

__all__ = ["LaneBackend"]


class LaneBackend:
    """A :class:`~fogline.cloud_service._backends.Backend` that runs a bundle's cloud part
    through ``repository`` in the ``stream`` lane.

    A full lane raises :class:`QueueFullError` and a request that waited past its timeout
    :class:`DeadlineExceededError`: the worker answers those items ``busy`` and the agents
    re-send them later.
    """

    def __init__(self, repository: ModelRepository, bundle: Bundle) -> None:
        self._repository = repository
        self._model = bundle.name
        self._version = bundle.version
        meta = repository.metadata(self._model, self._version)
        self._inputs = tuple(s.name for s in meta.inputs)
        self.output_names: tuple[str, ...] = tuple(s.name for s in meta.outputs)

    @property
    def name(self) -> str:
        choice = self._repository.backend_choice
        return f"{choice.kind if choice else 'repository'} (stream lane)"

    @property
    def input_names(self) -> tuple[str, ...]:
        return self._inputs

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            future = self._repository.submit(self._model, self._version, inputs, lane=Lane.STREAM)
            return future.result()
        except (QueueFullError, DeadlineExceededError):
            raise
        except CloudDataError as exc:
            raise BackendError(f"the stream lane refused the batch: {exc}") from exc

    def warmup(self) -> None:
        """The repository warmed the model before reporting it ready."""
