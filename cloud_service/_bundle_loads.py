"""Which bundle versions to load and which to unload: the policy, without I/O.

Inputs, at each reconcile (the time is an argument, so tests step a fake clock):

* ``wanted``: the bundle ids some site runs or is told to run (the director's desired
  state, the fleet store's reports);
* ``loaded``: the bundle versions the repository serves now;
* the static ones (given at start: never unloaded), and when each version last served a
  message (or finished loading).

Rules:

* Load what is wanted and not loaded, so a version is warm before its first message,
  except an id whose load failed less than ``retry_s`` ago (:meth:`LoadPolicy.failed`).
* Unload a version that is loaded, not static and not wanted, once it has been idle for
  ``grace_s``: no message served, not wanted, and (for one this policy did not see
  loaded before) not seen loaded, for that long. A site that just moved off a version
  may still have items of it in its outbox; the grace lets them be answered.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Set
from dataclasses import dataclass

__all__ = ["DEFAULT_GRACE_S", "DEFAULT_RETRY_S", "LoadPlan", "LoadPolicy"]

DEFAULT_GRACE_S = 600.0
DEFAULT_RETRY_S = 60.0


@dataclass(frozen=True)
class LoadPlan:
    """What one reconcile does: the ids to load and to unload, each sorted."""

    load: tuple[str, ...] = ()
    unload: tuple[str, ...] = ()


class LoadPolicy:
    """The load / unload decisions of one worker (see the module docstring). Not
    thread-safe: its owner calls it from one thread at a time."""

    def __init__(
        self,
        *,
        static: Collection[str] = (),
        grace_s: float = DEFAULT_GRACE_S,
        retry_s: float = DEFAULT_RETRY_S,
    ) -> None:
        if not grace_s >= 0 or math.isinf(grace_s):
            raise ValueError(f"the unload grace must be a finite number >= 0, got {grace_s}")
        if not retry_s >= 0 or math.isinf(retry_s):
            raise ValueError(f"the load retry must be a finite number >= 0, got {retry_s}")
        self.static = frozenset(static)
        self.grace_s = float(grace_s)
        self.retry_s = float(retry_s)
        self._used: dict[str, float] = {}  # served a message, wanted, or first seen loaded
        self._failed: dict[str, float] = {}

    def failed(self, bundle_id: str, now: float) -> None:
        """A load of ``bundle_id`` failed at ``now``: not tried again for ``retry_s``."""
        self._failed[bundle_id] = now

    def may_load(self, bundle_id: str, now: float) -> bool:
        """Whether a load of ``bundle_id`` may be tried at ``now`` (none failed lately)."""
        failed = self._failed.get(bundle_id)
        return failed is None or now - failed >= self.retry_s

    def plan(
        self,
        now: float,
        *,
        wanted: Set[str],
        loaded: Set[str],
        last_served: Mapping[str, float] | None = None,
    ) -> LoadPlan:
        """What to load and unload at ``now``; ``last_served`` says when each version last
        served a message (or finished loading)."""
        used = self._used
        for bundle_id, when in (last_served or {}).items():
            if used.get(bundle_id, -math.inf) < when:
                used[bundle_id] = when
        for bundle_id in wanted:
            used[bundle_id] = max(now, used.get(bundle_id, now))
        for bundle_id in loaded:
            used.setdefault(bundle_id, now)
        load = sorted(b for b in wanted - loaded if self.may_load(b, now))
        unload = sorted(
            b
            for b in loaded
            if b not in wanted and b not in self.static and now - used[b] >= self.grace_s
        )
        # Forget what is neither loaded nor wanted: an id seen once must not be kept for
        # ever (a loaded one is seen again, a wanted one is re-marked, a failure expires).
        for bundle_id in [b for b in used if b not in loaded and b not in wanted]:
            del used[bundle_id]
        for bundle_id in [b for b, t in self._failed.items() if now - t >= self.retry_s]:
            del self._failed[bundle_id]
        for bundle_id in unload:
            del used[bundle_id]
        return LoadPlan(load=tuple(load), unload=tuple(unload))
