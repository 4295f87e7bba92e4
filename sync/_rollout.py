"""Fleet rollouts: the planner. No I/O; time is passed in (seconds since the epoch).

A rollout moves one fleet to one bundle (``name@version``) in waves. The planner holds
the rollout's state and, from what the sites last said of themselves
(:class:`Observation`), decides what to do next (:class:`Action`): point sites at the new
bundle, point them back at the one they ran before, start the next wave, pause, roll
back. The rollout service (:mod:`fogline.sync._rollout_service`) keeps the state in the
fleet store and writes the director; nothing here knows of either.

- **Cohorts.** Each site of the fleet is ranked by the SHA-256 of ``<bundle>/<fleet>/<site>``
  (:func:`cohort_order`), so the same site lands in the same wave whenever this bundle is
  rolled out to this fleet, and no operator picks the canaries by hand. Wave *k* holds the
  first ``ceil(fraction_k × N)`` sites (cumulative fractions: the canary, then the
  waves), and never fewer than ``min_sites`` (or the whole fleet, when it is smaller).
- **Gates.** A wave is done when every site of it that has not failed runs the new bundle
  (reports it ``active``) and the wave's health, against the figures the fleet reported
  for the previous bundle before the rollout (:func:`judge`), stays within tolerance for
  ``bake_s`` seconds. Then the next wave starts; after the last, the rollout completes.
- **Failures.** A site fails when it reports ``failed``, when it is not active within
  ``site_timeout_s`` of being assigned, or when it has not reported for ``site_timeout_s``
  — never "in progress" forever. When more than ``max_failure_rate`` of the assigned
  sites have failed, or the health gate finds the new bundle worse, the rollout pauses
  (with ``auto_rollback``: rolls back).
- **Operator.** :meth:`Rollout.pause`, :meth:`~Rollout.resume`, :meth:`~Rollout.abort`
  and :meth:`~Rollout.rollback` work at any stage, sites mid-download included. Abort stops
  assigning and points every site not yet active back at its previous bundle; rollback
  points every site of the rollout back (or at ``to``).
"""

from __future__ import annotations

import hashlib
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from types import MappingProxyType
from typing import Any, ClassVar

from fogline.sync.errors import RolloutError

__all__ = [
    "HEALTH_FIELDS",
    "ROLLOUT_STATES",
    "SITE_STATES",
    "Action",
    "Assign",
    "Observation",
    "Rollout",
    "RolloutPolicy",
    "SiteProgress",
    "Tolerance",
    "aggregate_health",
    "cohort_order",
    "judge",
    "plan_waves",
]

ROLLOUT_STATES = ("running", "paused", "aborted", "rolled_back", "completed")
#: ``pending``: not assigned yet (its wave has not started) or assigned and not heard of
#: since; ``downloading``/``verified``/``active``: what the site reported since it was
#: assigned; ``failed``; ``rolled_back``: pointed back at its previous bundle.
SITE_STATES = ("pending", "downloading", "verified", "active", "failed", "rolled_back")
#: The health figures the gate compares (a site's report carries them in ``health``).
HEALTH_FIELDS = ("error_rate", "latency_p50_ms", "latency_p99_ms", "agreement_rate")
_ACTIVE_STATES = ("running", "paused")
_RATES = ("error_rate", "agreement_rate")


def _fraction(value: float, what: str, *, zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{what} must be a number, got {value!r}")
    low_ok = value >= 0 if zero else value > 0
    if not (low_ok and value <= 1):
        raise ValueError(f"{what} {value:g} must lie in {'[0' if zero else '(0'}, 1]")
    return float(value)


def _seconds(value: float, what: str, *, zero: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{what} must be a number of seconds, got {value!r}")
    if value < 0 or (not zero and value == 0):
        raise ValueError(f"{what} {value:g} must be {'>= 0' if zero else '> 0'} seconds")
    return float(value)


@dataclass(frozen=True)
class Tolerance:
    """How much worse than the previous bundle the new one may be: the error rate up by
    ``error_rate`` (absolute), p50 and p99 latency up to ``latency_ratio`` times the
    baseline plus ``latency_ms``, the edge/cloud agreement rate down by ``agreement_rate``
    (absolute)."""

    error_rate: float = 0.01
    latency_ratio: float = 1.25
    latency_ms: float = 2.0
    agreement_rate: float = 0.02

    def __post_init__(self) -> None:
        _fraction(self.error_rate, "error rate tolerance", zero=True)
        _fraction(self.agreement_rate, "agreement rate tolerance", zero=True)
        if not math.isfinite(self.latency_ratio) or self.latency_ratio < 1:
            raise ValueError(f"latency_ratio {self.latency_ratio:g} must be >= 1")
        _seconds(self.latency_ms, "latency_ms")


@dataclass(frozen=True)
class RolloutPolicy:
    """How a rollout proceeds (see the module docstring). ``waves`` are cumulative
    fractions of the fleet, the last 1; ``canary`` (0 for none) comes before them."""

    canary: float = 0.05
    waves: tuple[float, ...] = (0.25, 1.0)
    bake_s: float = 600.0
    max_failure_rate: float = 0.02
    min_sites: int = 1
    site_timeout_s: float = 1800.0
    auto_rollback: bool = False
    tolerance: Tolerance = field(default_factory=Tolerance)

    def __post_init__(self) -> None:
        _fraction(self.canary, "canary", zero=True)
        if not isinstance(self.waves, tuple) or not self.waves:
            raise ValueError("waves must be a non-empty tuple of fractions")
        for i, wave in enumerate(self.waves):
            _fraction(wave, f"wave {wave!r}")
            if i and wave <= self.waves[i - 1]:
                raise ValueError(f"waves {list(self.waves)} must grow (they are cumulative)")
        if self.waves[-1] != 1:
            raise ValueError(f"the last wave must be 100%, not {self.waves[-1]:.0%}")
        _seconds(self.bake_s, "bake")
        _fraction(self.max_failure_rate, "max failure rate", zero=True)
        if isinstance(self.min_sites, bool) or not isinstance(self.min_sites, int):
            raise TypeError("min_sites must be an integer")
        if self.min_sites < 1:
            raise ValueError(f"min_sites {self.min_sites} must be >= 1")
        _seconds(self.site_timeout_s, "site timeout", zero=False)
        if not isinstance(self.auto_rollback, bool):
            raise TypeError("auto_rollback must be true or false")
        if not isinstance(self.tolerance, Tolerance):
            raise TypeError("tolerance must be a Tolerance")

    def fractions(self) -> tuple[float, ...]:
        """The cumulative fraction of each wave: the canary, then every larger wave."""
        head = (self.canary,) if self.canary > 0 else ()
        return head + tuple(w for w in self.waves if w > self.canary)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["waves"] = list(self.waves)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RolloutPolicy:
        values = dict(data)
        values["waves"] = tuple(values.get("waves", (1.0,)))
        values["tolerance"] = Tolerance(**dict(values.get("tolerance") or {}))
        return cls(**values)


def cohort_order(key: str, sites: Iterable[str]) -> list[str]:
    """``sites`` in their rollout order: by the SHA-256 of ``<key>/<site>`` (then name)."""
    return sorted(set(sites), key=lambda s: (hashlib.sha256(f"{key}/{s}".encode()).digest(), s))


def plan_waves(policy: RolloutPolicy, count: int) -> list[int]:
    """How many sites each wave has assigned once it starts (cumulative), for a fleet of
    ``count``: no wave below ``min_sites``, none that adds no site, the last ``count``."""
    if count < 1:
        return []
    floor = min(policy.min_sites, count)
    out: list[int] = []
    for fraction in policy.fractions():
        n = min(count, max(floor, math.ceil(fraction * count - 1e-9)))
        if not out or n > out[-1]:
            out.append(n)
    if out[-1] != count:
        out.append(count)
    return out


@dataclass(frozen=True)
class Observation:
    """What the fleet store knows of a site from its last status report: when it came
    (``seen_at``; ``None`` when it never reported), the bundle it runs, the update's
    phase and desired bundle, its health figures and failure reason."""

    site: str
    seen_at: float | None = None
    bundle: str | None = None
    phase: str = "idle"
    desired: str | None = None
    health: Mapping[str, float] = field(default_factory=dict)
    error: str | None = None


def aggregate_health(healths: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """The gate's figures for a group of sites: the mean of each rate, the median of
    each latency, over the sites that report it."""
    values: dict[str, list[float]] = defaultdict(list)
    for health in healths:
        for name in HEALTH_FIELDS:
            if name in health:
                values[name].append(float(health[name]))
    out = {}
    for name, got in values.items():
        out[name] = statistics.fmean(got) if name in _RATES else statistics.median(got)
    return out


def judge(
    baseline: Mapping[str, float], figures: Mapping[str, float], tolerance: Tolerance
) -> list[str]:
    """What makes ``figures`` (the new bundle's) worse than ``baseline`` (the previous
    bundle's, same fleet) beyond ``tolerance``; empty when the gate passes. A figure
    missing on either side is not compared."""
    problems = []
    if "error_rate" in baseline and "error_rate" in figures:
        limit = baseline["error_rate"] + tolerance.error_rate
        if figures["error_rate"] > limit + 1e-12:
            problems.append(
                f"error_rate {figures['error_rate']:.4g} over {limit:.4g} "
                f"(baseline {baseline['error_rate']:.4g} + {tolerance.error_rate:g})"
            )
    for name in ("latency_p50_ms", "latency_p99_ms"):
        if name in baseline and name in figures:
            limit = baseline[name] * tolerance.latency_ratio + tolerance.latency_ms
            if figures[name] > limit + 1e-9:
                problems.append(
                    f"{name} {figures[name]:.4g} over {limit:.4g} (baseline "
                    f"{baseline[name]:.4g} × {tolerance.latency_ratio:g} + "
                    f"{tolerance.latency_ms:g} ms)"
                )
    if "agreement_rate" in baseline and "agreement_rate" in figures:
        limit = baseline["agreement_rate"] - tolerance.agreement_rate
        if figures["agreement_rate"] < limit - 1e-12:
            problems.append(
                f"agreement_rate {figures['agreement_rate']:.4g} under {limit:.4g} "
                f"(baseline {baseline['agreement_rate']:.4g} - {tolerance.agreement_rate:g})"
            )
    return problems


# -------------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class Action:
    """What the planner decided; each is also a line of the rollout's event log."""

    kind: ClassVar[str] = "action"

    def detail(self) -> dict[str, Any]:
        data = asdict(self)
        if "sites" in data:
            data["sites"] = len(data["sites"])
        return data


@dataclass(frozen=True)
class Assign(Action):
    """Point ``sites`` at ``bundle`` in the director (``why``: ``wave``, ``abort``,
    ``rollback``)."""

    kind: ClassVar[str] = "assign"
    bundle: str
    sites: tuple[str, ...]
    why: str


@dataclass(frozen=True)
class Unassign(Action):
    """Remove the desired state of ``sites`` (they had none before the rollout); they
    keep what they run."""

    kind: ClassVar[str] = "unassign"
    sites: tuple[str, ...]
    why: str


@dataclass(frozen=True)
class WaveStarted(Action):
    kind: ClassVar[str] = "wave_started"
    wave: int
    sites: tuple[str, ...]


@dataclass(frozen=True)
class BakeStarted(Action):
    kind: ClassVar[str] = "bake_started"
    wave: int


@dataclass(frozen=True)
class SiteFailed(Action):
    kind: ClassVar[str] = "site_failed"
    site: str
    reason: str


@dataclass(frozen=True)
class Paused(Action):
    kind: ClassVar[str] = "paused"
    reason: str


@dataclass(frozen=True)
class Resumed(Action):
    kind: ClassVar[str] = "resumed"
    excused: int


@dataclass(frozen=True)
class Aborted(Action):
    kind: ClassVar[str] = "aborted"
    reason: str


@dataclass(frozen=True)
class RolledBack(Action):
    kind: ClassVar[str] = "rolled_back"
    reason: str
    to: str | None


@dataclass(frozen=True)
class Completed(Action):
    kind: ClassVar[str] = "completed"


# ------------------------------------------------------------------------------ the state


@dataclass
class SiteProgress:
    """One site in a rollout: its wave, the bundle it ran before (``previous``, what a
    rollback points it back at), its state and when it was assigned and became active.
    ``excused`` marks a failure an operator resumed past: it no longer counts."""

    site: str
    wave: int
    previous: str | None
    state: str = "pending"
    assigned_at: float | None = None
    active_since: float | None = None
    reason: str | None = None
    excused: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SiteProgress:
        return cls(**dict(data))


@dataclass
class Rollout:
    """One rollout's state. Made by :meth:`start`; moved by :meth:`tick` and the operator's
    :meth:`pause`, :meth:`resume`, :meth:`abort` and :meth:`rollback`, each of which
    returns the actions to apply."""

    id: str
    bundle: str
    fleet: str
    policy: RolloutPolicy
    baseline: Mapping[str, float]
    waves: tuple[int, ...]
    started_at: float
    updated_at: float
    sites: dict[str, SiteProgress]
    state: str = "running"
    wave: int = 0
    baking_since: float | None = None
    reason: str | None = None
    rolled_back_to: str | None = None

    # ------------------------------------------------------------------------- start

    @classmethod
    def start(
        cls,
        rollout_id: str,
        bundle: str,
        fleet: str,
        policy: RolloutPolicy,
        previous: Mapping[str, str | None],
        baseline: Mapping[str, float],
        now: float,
    ) -> tuple[Rollout, list[Action]]:
        """A rollout of ``bundle`` to the sites of ``previous`` (site → the bundle it runs
        now, or ``None``), and the first wave's actions."""
        if not previous:
            raise RolloutError(f"fleet {fleet!r} has no sites to roll out to")
        order = cohort_order(f"{bundle}/{fleet}", previous)
        waves = plan_waves(policy, len(order))
        sites: dict[str, SiteProgress] = {}
        wave = 0
        for i, site in enumerate(order):
            while i >= waves[wave]:
                wave += 1
            sites[site] = SiteProgress(site=site, wave=wave, previous=previous[site])
        rollout = cls(
            id=rollout_id,
            bundle=bundle,
            fleet=fleet,
            policy=policy,
            baseline=MappingProxyType(dict(baseline)),
            waves=tuple(waves),
            started_at=now,
            updated_at=now,
            sites=sites,
        )
        return rollout, rollout._start_wave(0, now)

    def _start_wave(self, wave: int, now: float) -> list[Action]:
        self.wave = wave
        self.baking_since = None
        members = tuple(s.site for s in self.sites.values() if s.wave == wave)
        for site in members:
            self.sites[site].assigned_at = now
        return [Assign(self.bundle, members, "wave"), WaveStarted(wave, members)]

    # -------------------------------------------------------------------------- views

    @property
    def finished(self) -> bool:
        return self.state not in _ACTIVE_STATES

    def assigned(self) -> list[SiteProgress]:
        return [s for s in self.sites.values() if s.assigned_at is not None]

    def counted_failures(self) -> tuple[int, int]:
        """Failed (not excused) and assigned sites, which the failure rate compares."""
        assigned = self.assigned()
        failed = sum(1 for s in assigned if s.state == "failed" and not s.excused)
        return failed, len(assigned)

    # --------------------------------------------------------------------------- tick

    def tick(self, now: float, observations: Mapping[str, Observation]) -> list[Action]:
        """One step: the sites' states from their last reports and the timeouts, then the
        failure threshold, the health gate and the bake time."""
        if self.finished:
            return []
        self.updated_at = now
        actions: list[Action] = []
        for progress in self.assigned():
            failure = self._observe(progress, observations.get(progress.site), now)
            if failure is not None:
                actions.append(failure)
        if self.state == "paused":
            return actions
        failed, assigned = self.counted_failures()
        if assigned and failed / assigned > self.policy.max_failure_rate:
            reason = (
                f"{failed} of {assigned} assigned sites failed ({failed / assigned:.1%}), "
                f"over the max failure rate {self.policy.max_failure_rate:.1%}"
            )
            return actions + self._stop(now, reason)
        live = [s for s in self.assigned() if s.state != "failed"]
        if not all(s.state == "active" for s in live):
            self.baking_since = None
            return actions
        if self.baking_since is None:
            self.baking_since = now
            actions.append(BakeStarted(self.wave))
        # The gate judges the reports the wave's sites sent in the second half of the bake:
        # a site's first reports after its swap also cover the swap itself (the download,
        # the warm-up, its neighbours' swaps on shared hardware), which is not the new
        # bundle's steady health. Bad figures then stop the rollout at once; good ones let
        # the wave advance when the bake is over.
        settled = self.baking_since + self.policy.bake_s / 2 if self.policy.bake_s else -math.inf
        fresh = [
            obs.health
            for s in live
            if (obs := observations.get(s.site)) is not None
            and obs.seen_at is not None
            and obs.seen_at >= settled
        ]
        if fresh:
            problems = judge(self.baseline, aggregate_health(fresh), self.policy.tolerance)
            if problems:
                return actions + self._stop(now, f"health gate: {'; '.join(problems)}")
        if now - self.baking_since < self.policy.bake_s or not fresh:
            return actions  # baking, or no report from its second half yet
        if self.wave + 1 >= len(self.waves):
            self.state = "completed"
            self.reason = None
            return [*actions, Completed()]
        return actions + self._start_wave(self.wave + 1, now)

    def _observe(
        self, progress: SiteProgress, obs: Observation | None, now: float
    ) -> SiteFailed | None:
        if progress.state in ("failed", "rolled_back") or progress.assigned_at is None:
            return None
        timeout = self.policy.site_timeout_s
        fresh = obs is not None and obs.seen_at is not None and obs.seen_at >= progress.assigned_at
        if obs is not None and fresh:
            if obs.bundle == self.bundle and obs.phase != "failed":
                if progress.state != "active":
                    progress.state = "active"
                    progress.active_since = now
            elif obs.phase == "failed" and obs.desired in (self.bundle, None):
                return self._fail(progress, f"the site reports: {obs.error or 'failed'}")
            elif obs.phase in ("downloading", "verified"):
                progress.state = obs.phase
        last = obs.seen_at if obs is not None else None
        if progress.state != "active" and now - progress.assigned_at >= timeout:
            return self._fail(progress, f"not active within the site timeout ({timeout:g} s)")
        if progress.state == "active" and (last is None or now - last >= timeout):
            return self._fail(progress, f"no report for the site timeout ({timeout:g} s)")
        return None

    @staticmethod
    def _fail(progress: SiteProgress, reason: str) -> SiteFailed:
        progress.state = "failed"
        progress.reason = reason
        return SiteFailed(progress.site, reason)

    def _stop(self, now: float, reason: str) -> list[Action]:
        if self.policy.auto_rollback:
            return self.rollback(now, reason=f"automatic rollback: {reason}")
        return self.pause(now, reason=reason)

    # ----------------------------------------------------------------------- operator

    def _require(self, allowed: Sequence[str], doing: str) -> None:
        if self.state not in allowed:
            state = self.state.replace("_", " ")
            raise RolloutError(f"rollout {self.id} is {state}: cannot {doing}")

    def pause(self, now: float, reason: str = "paused by the operator") -> list[Action]:
        """Stop starting waves; assigned sites carry on with what they were told."""
        self._require(("running",), "pause it")
        self.state, self.reason, self.updated_at = "paused", reason, now
        return [Paused(reason)]

    def resume(self, now: float) -> list[Action]:
        """Carry on; the sites failed so far are excused (they stay failed, but no longer
        count towards the failure rate), and the bake starts again."""
        self._require(("paused",), "resume it")
        excused = 0
        for progress in self.sites.values():
            if progress.state == "failed" and not progress.excused:
                progress.excused = True
                excused += 1
        self.state, self.reason, self.updated_at = "running", None, now
        self.baking_since = None
        return [Resumed(excused)]

    def abort(self, now: float, reason: str = "aborted by the operator") -> list[Action]:
        """Stop assigning; every assigned site not yet active goes back to its previous
        bundle (sites mid-download included). Active sites keep the new bundle."""
        self._require(_ACTIVE_STATES, "abort it")
        back = [s for s in self.assigned() if s.state not in ("active", "rolled_back")]
        actions = self._point_back(back, None, "abort")
        self.state, self.reason, self.updated_at = "aborted", reason, now
        return [*actions, Aborted(reason)]

    def rollback(
        self, now: float, to: str | None = None, reason: str = "rolled back by the operator"
    ) -> list[Action]:
        """Every assigned site of the rollout back to its previous bundle, or to ``to``."""
        self._require(("running", "paused", "aborted", "completed"), "roll it back")
        if to is None:
            back = [s for s in self.assigned() if s.state != "rolled_back"]
        else:
            back = self.assigned()
        actions = self._point_back(back, to, "rollback")
        self.state, self.reason, self.updated_at = "rolled_back", reason, now
        self.rolled_back_to = to
        return [*actions, RolledBack(reason, to)]

    def _point_back(self, sites: Sequence[SiteProgress], to: str | None, why: str) -> list[Action]:
        groups: dict[str | None, list[str]] = defaultdict(list)
        for progress in sites:
            target = to if to is not None else progress.previous
            if target == self.bundle and to is None:
                target = None  # it ran this bundle already: nothing to go back to
            groups[target].append(progress.site)
            progress.state = "rolled_back"
        actions: list[Action] = []
        for target, members in sorted(groups.items(), key=lambda kv: kv[0] or ""):
            if target is None:
                actions.append(Unassign(tuple(sorted(members)), why))
            else:
                actions.append(Assign(target, tuple(sorted(members)), why))
        return actions

    # ---------------------------------------------------------------------- persisted

    def header(self) -> dict[str, Any]:
        """Everything but the sites, as JSON-ready values."""
        return {
            "id": self.id,
            "bundle": self.bundle,
            "fleet": self.fleet,
            "policy": self.policy.to_dict(),
            "baseline": dict(self.baseline),
            "waves": list(self.waves),
            "started_at": self.started_at,
            "updated_at": self.updated_at,
            "state": self.state,
            "wave": self.wave,
            "baking_since": self.baking_since,
            "reason": self.reason,
            "rolled_back_to": self.rolled_back_to,
        }

    @classmethod
    def from_header(cls, header: Mapping[str, Any], sites: Iterable[SiteProgress]) -> Rollout:
        data = dict(header)
        return cls(
            id=data["id"],
            bundle=data["bundle"],
            fleet=data["fleet"],
            policy=RolloutPolicy.from_dict(data["policy"]),
            baseline=MappingProxyType(dict(data.get("baseline") or {})),
            waves=tuple(data["waves"]),
            started_at=data["started_at"],
            updated_at=data["updated_at"],
            sites={s.site: s for s in sites},
            state=data["state"],
            wave=data["wave"],
            baking_since=data.get("baking_since"),
            reason=data.get("reason"),
            rolled_back_to=data.get("rolled_back_to"),
        )

    def copy(self) -> Rollout:
        return replace(self, sites={k: replace(v) for k, v in self.sites.items()})

    # ------------------------------------------------------------------------ summary

    def wave_table(self, observations: Mapping[str, Observation]) -> list[dict[str, Any]]:
        """Per wave: its sites by state, and the health figures of its active sites."""
        rows = []
        for wave, _count in enumerate(self.waves):
            members = [s for s in self.sites.values() if s.wave == wave]
            counts = dict.fromkeys(SITE_STATES, 0)
            for s in members:
                counts[s.state] += 1
            figures = aggregate_health(
                observations[s.site].health
                for s in members
                if s.state == "active" and s.site in observations
            )
            rows.append(
                {
                    "wave": wave,
                    "sites": len(members),
                    "started": bool(members) and members[0].assigned_at is not None,
                    **counts,
                    "health": figures,
                }
            )
        return rows
