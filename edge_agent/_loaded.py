"""The bundle an agent runs, as one value: the verified bundle, the thresholds and codec
in force, and (once started) its warmed-up edge runtime.

The agent holds exactly one :class:`LoadedBundle`, in one attribute, and reads it once per
model batch, so a batch is decided, encoded and answered against one bundle throughout.
Replacing that attribute with another value is all a hot swap has to do on the agent's
side.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from fogline.compression import Codec
from fogline.edge_agent._runtime import EdgeRuntime
from fogline.edge_agent.errors import ModelError
from fogline.sync import Bundle, BundleError, Thresholds

__all__ = ["LoadedBundle"]


@dataclass(frozen=True, slots=True)
class LoadedBundle:
    """A bundle ready to run. ``thresholds`` and ``codec`` are the bundle's own unless
    the agent's config overrides them; ``runtime`` is None until :meth:`with_runtime`."""

    bundle: Bundle
    thresholds: Thresholds
    codec: Codec
    runtime: EdgeRuntime | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.bundle, Bundle):
            raise TypeError("LoadedBundle needs a Bundle")
        if not isinstance(self.thresholds, Thresholds):
            raise TypeError("thresholds must be Thresholds")
        if not isinstance(self.codec, Codec):
            raise TypeError("codec must be a Codec")
        if self.runtime is not None and not isinstance(self.runtime, EdgeRuntime):
            raise TypeError("runtime must be an EdgeRuntime")

    @classmethod
    def load(
        cls,
        bundle_dir: str | Path,
        *,
        thresholds: Thresholds | None = None,
        codec: Codec | None = None,
    ) -> LoadedBundle:
        """Load and verify the bundle at ``bundle_dir`` (cheap: the model is not loaded);
        raises :class:`ModelError` when it cannot be used."""
        try:
            # A site holds only the edge part of a bundle (docs/sync.md).
            bundle = Bundle.load(bundle_dir, part="edge")
        except BundleError as exc:
            raise ModelError(f"bundle at {bundle_dir} is unusable: {exc}") from exc
        try:
            # Not `codec or …`: Codec.FP32 is 0, and falsy.
            chosen = codec if codec is not None else Codec.parse(bundle.codec)
        except ValueError as exc:
            raise ModelError(f"bundle {bundle.id}: {exc}") from exc
        return cls(bundle, bundle.thresholds if thresholds is None else thresholds, chosen)

    def with_runtime(self, runtime: EdgeRuntime) -> LoadedBundle:
        """The same bundle with its edge model loaded."""
        return dataclasses.replace(self, runtime=runtime)

    @property
    def id(self) -> str:
        return self.bundle.id

    @property
    def zstd_level(self) -> int:
        return self.bundle.zstd_level

    @property
    def feature_outputs(self) -> tuple[str, ...]:
        """The edge outputs that travel to the cloud, in the bundle's order."""
        return tuple(self.bundle.edge.feature_outputs)

    @property
    def filter_output(self) -> str | None:
        return self.bundle.edge.filter_output

    @property
    def exit_output(self) -> str | None:
        return self.bundle.edge.exit_output
