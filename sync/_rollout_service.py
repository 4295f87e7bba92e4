"""The rollout service: the planner (:mod:`fogline.sync._rollout`) over the fleet store
and the director.

The HTTP server (or the ``fogline rollout`` commands) call it: sites are registered with
their public keys, ask for a nonce, send signed status reports; operators start, pause,
resume, abort and roll back rollouts; a timer calls :meth:`RolloutService.tick`. Each
change loads the rollout from the store, lets the planner decide, writes the director
once (every site the step moves, in one signing), then saves the rollout with the version
it was loaded at: a change made meanwhile by another process is never overwritten (the
step is dropped and the next tick plans again from what is stored).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from securesystemslib.signer import Key, SSlibKey

from fogline.sync._fleet import FleetStore, SiteRecord, StaleRolloutError
from fogline.sync._home import HomeBusyError, SyncHome
from fogline.sync._names import check_name
from fogline.sync._report import NonceLedger, StatusReport, verify_status_report
from fogline.sync._rollout import (
    Action,
    Assign,
    Observation,
    Rollout,
    RolloutPolicy,
    Unassign,
    aggregate_health,
)
from fogline.sync.errors import ReplayedReportError, ReportError, RolloutError

__all__ = ["OnAssigned", "RolloutService"]

log = logging.getLogger(__name__)

#: Called once per site the director was just changed for: the site and the bundle it is
#: now told to run (``None``: its desired state was removed). The server publishes the
#: site's retained MQTT nudge from it.
OnAssigned = Callable[[str, str | None], None]


class _NonceAfterSigning(NonceLedger):
    """A ledger whose ``consume`` leaves the nonce to the caller: ``receive_report`` uses
    it up in the same transaction that stores the report."""

    def consume(self, site: str, nonce: str) -> None:
        return None


_AFTER_SIGNING = _NonceAfterSigning()


class _SiteKeys(Mapping[str, Key]):
    """Site → public key, read from the store on first use and kept (a site's key never
    changes: the store refuses that)."""

    def __init__(self, store: FleetStore) -> None:
        self._store = store
        self._cache: dict[str, Key] = {}

    def __getitem__(self, site: str) -> Key:
        key = self._cache.get(site)
        if key is None:
            data = self._store.public_key(site)
            if data is None:
                raise KeyError(site)
            try:
                key = SSlibKey.from_dict(
                    data["keyid"], {k: v for k, v in data.items() if k != "keyid"}
                )
            except (KeyError, TypeError, ValueError) as exc:
                raise ReportError(f"the stored key of site {site!r} is unusable: {exc}") from None
            self._cache[site] = key
        return key

    def __iter__(self) -> Iterator[str]:
        return iter(self._cache)

    def __len__(self) -> int:
        return len(self._cache)


def public_key_dict(key: SSlibKey | Mapping[str, Any]) -> dict[str, Any]:
    """A site's public key as the store keeps it: ``{"keyid": …, "keytype": …, …}`` (what
    ``fogline agent enroll --json`` prints)."""
    if isinstance(key, SSlibKey):
        return {"keyid": key.keyid, **key.to_dict()}
    data = dict(key)
    if isinstance(data.get("key"), Mapping) and "keytype" not in data:
        data = {"keyid": data.get("keyid"), **data["key"]}  # site.json's form
    try:
        SSlibKey.from_dict(str(data["keyid"]), {k: v for k, v in data.items() if k != "keyid"})
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"not a site public key: {exc}") from None
    return data


_OPERATE_ATTEMPTS = 20
"""How often an operator's step is planned again when a tick saved the rollout first."""


class RolloutService:
    """Sites, their reports and rollouts (see the module docstring). Thread-safe."""

    def __init__(
        self,
        store: FleetStore,
        home: SyncHome,
        *,
        on_assigned: OnAssigned | None = None,
        clock: Callable[[], float] = time.time,
        nonces_per_site: int = 8,
    ) -> None:
        self.store = store
        self.home = home
        self._on_assigned = on_assigned
        self._clock = clock
        self._lock = threading.RLock()
        self._nonces_per_site = nonces_per_site
        self._keys = _SiteKeys(store)

    # --------------------------------------------------------------------------- sites

    def register_site(
        self, site: str, region: str, fleet: str, public_key: SSlibKey | Mapping[str, Any]
    ) -> bool:
        """Register a site (idempotent); true when it is new."""
        return self.register_sites([(site, region, fleet, public_key)]) == 1

    def register_sites(
        self, sites: list[tuple[str, str, str, SSlibKey | Mapping[str, Any]]]
    ) -> int:
        """Register many sites in one transaction; how many were new."""
        rows = [(s, r, f, public_key_dict(k)) for s, r, f, k in sites]
        with self._lock:
            return self.store.register_sites(rows, self._clock())

    def issue_nonce(self, site: str) -> str:
        """A nonce for the site's next status report (good once; the newest 8 stay valid)."""
        if self.store.public_key(site) is None:
            raise RolloutError(f"site {site!r} is not registered")
        check_name(site, "site")
        # In the fleet store: every process serving the fleet shares them, and a restart
        # forgets none.
        nonce = secrets.token_hex(16)
        self.store.issue_nonce(site, nonce, self._clock(), keep=self._nonces_per_site)
        return nonce

    def receive_report(self, data: bytes) -> StatusReport:
        """Verify a signed status report with the site's registered key and use its nonce
        up; store what it says. :class:`ReportError` / :class:`ReplayedReportError` on a
        bad one, which changes nothing."""
        # The signature first (nothing written), then the nonce used up and the report
        # stored in one transaction: a replay changes nothing.
        report = verify_status_report(data, self._keys, _AFTER_SIGNING)
        if not self.store.record_report_with_nonce(report, self._clock()):
            raise ReplayedReportError(
                f"report of site {report.site!r} carries a nonce that was used already or "
                "never issued to it (a replayed report)"
            )
        return report

    def sites(self, fleet: str | None = None) -> list[SiteRecord]:
        return self.store.sites(fleet)

    # ------------------------------------------------------------------------ rollouts

    def start(
        self,
        bundle: str,
        fleet: str,
        policy: RolloutPolicy | None = None,
        *,
        now: float | None = None,
    ) -> dict[str, Any]:
        """Start rolling ``bundle`` (``name@version``) out to ``fleet``: its first wave is
        assigned at once. One rollout a fleet at a time."""
        now = self._clock() if now is None else now
        name, _, version = bundle.replace(":", "@", 1).partition("@")
        check_name(name, "bundle name")
        check_name(version, "bundle version")
        bundle = f"{name}@{version}"
        with self._lock:
            if self.home.catalogue().get(name, version) is None:
                raise RolloutError(f"{bundle} is not released")
            for row in self.store.rollouts(fleet):
                if row["state"] in ("running", "paused"):
                    raise RolloutError(
                        f"fleet {fleet!r} already has rollout {row['id']} of {row['bundle']} "
                        f"({row['state']}); abort it or let it finish first"
                    )
            sites = self.store.sites(fleet)
            if not sites:
                raise RolloutError(f"fleet {fleet!r} has no registered sites")
            previous = {s.site: s.bundle for s in sites}
            baseline = aggregate_health(
                s.health for s in sites if s.bundle is not None and s.bundle != bundle
            )
            rollout_id = f"{name}-{version}-{secrets.token_hex(4)}"
            rollout, actions = Rollout.start(
                rollout_id, bundle, fleet, policy or RolloutPolicy(), previous, baseline, now
            )
            self._apply(rollout, None, None, actions, now)
            return self._status(rollout)

    def _current(self, rollout_id: str | None, fleet: str | None = None) -> str:
        rows = self.store.rollouts(fleet)
        if rollout_id is not None:
            if not any(r["id"] == rollout_id for r in rows):
                raise RolloutError(f"no rollout {rollout_id!r}")
            return rollout_id
        for row in rows:
            if row["state"] in ("running", "paused"):
                return str(row["id"])
        if rows:
            return str(rows[0]["id"])
        raise RolloutError("no rollout" + (f" of fleet {fleet!r}" if fleet else "") + " yet")

    def _load(self, rollout_id: str) -> tuple[Rollout, int]:
        loaded = self.store.load_rollout(rollout_id)
        if loaded is None:
            raise RolloutError(f"no rollout {rollout_id!r}")
        return loaded

    def _operate(
        self,
        rollout_id: str | None,
        fleet: str | None,
        step: Callable[[Rollout, float], list[Action]],
    ) -> dict[str, Any]:
        """An operator's step: load, step, save. A serving cloud's tick may save the
        rollout between the load and the save (its reports move it on); the operation is
        then planned again from what the tick saved, so that a pause, an abort or a
        rollback always takes effect. (The director written for a dropped attempt is
        rewritten by the next.)"""
        with self._lock:
            target = self._current(rollout_id, fleet)
            for attempt in range(_OPERATE_ATTEMPTS):
                now = self._clock()
                rollout, version = self._load(target)
                before = rollout.copy()
                actions = step(rollout, now)
                try:
                    self._apply(rollout, version, before, actions, now)
                except (StaleRolloutError, HomeBusyError):
                    # a tick saved it first, or holds the home while it signs
                    if attempt == _OPERATE_ATTEMPTS - 1:
                        raise
                    log.info("rollout %s changed meanwhile; planning the step again", target)
                    time.sleep(0.05 * (attempt + 1))
                    continue
                return self._status(rollout)
        raise AssertionError("unreachable")  # the loop returns or raises

    def pause(self, rollout_id: str | None = None, *, fleet: str | None = None) -> dict[str, Any]:
        return self._operate(rollout_id, fleet, lambda r, now: r.pause(now))

    def resume(self, rollout_id: str | None = None, *, fleet: str | None = None) -> dict[str, Any]:
        return self._operate(rollout_id, fleet, lambda r, now: r.resume(now))

    def abort(self, rollout_id: str | None = None, *, fleet: str | None = None) -> dict[str, Any]:
        return self._operate(rollout_id, fleet, lambda r, now: r.abort(now))

    def rollback(
        self, rollout_id: str | None = None, *, to: str | None = None, fleet: str | None = None
    ) -> dict[str, Any]:
        """Every site of the rollout back to its previous bundle, or to version ``to`` of
        the rollout's bundle name (which must be released)."""

        def step(rollout: Rollout, now: float) -> list[Action]:
            target = None
            if to is not None:
                name = rollout.bundle.partition("@")[0]
                version = to.rpartition("@")[2].rpartition(":")[2]
                check_name(version, "bundle version")
                if self.home.catalogue().get(name, version) is None:
                    raise RolloutError(f"{name}@{version} is not released")
                target = f"{name}@{version}"
            return rollout.rollback(now, to=target)

        return self._operate(rollout_id, fleet, step)

    def tick(self, now: float | None = None) -> list[dict[str, Any]]:
        """One step of every running or paused rollout; what each did (its status)."""
        now = self._clock() if now is None else now
        out = []
        with self._lock:
            active = [r["id"] for r in self.store.rollouts() if r["state"] in ("running", "paused")]
            for rollout_id in active:
                rollout, version = self._load(rollout_id)
                before = rollout.copy()
                observations = self._observations(rollout.fleet)
                actions = rollout.tick(now, observations)
                try:
                    self._apply(rollout, version, before, actions, now)
                except (StaleRolloutError, HomeBusyError):
                    # Another process (an operator's command) changed it meanwhile or is
                    # signing now: its change stands; the next tick plans from it.
                    log.info("rollout %s changed meanwhile; this tick is dropped", rollout_id)
                    continue
                out.append(self._status(rollout, observations))
        return out

    def status(self, rollout_id: str | None = None, *, fleet: str | None = None) -> dict[str, Any]:
        """A rollout (by default the fleet's running one, else the newest) as JSON-ready
        data: state, reason, waves with their sites by state and health figures."""
        with self._lock:
            rollout, _ = self._load(self._current(rollout_id, fleet))
            return self._status(rollout)

    def rollouts(self, fleet: str | None = None) -> list[dict[str, Any]]:
        return self.store.rollouts(fleet)

    # ------------------------------------------------------------------------ internal

    def _observations(self, fleet: str) -> dict[str, Observation]:
        return {s.site: s.observation() for s in self.store.sites(fleet)}

    def _apply(
        self,
        rollout: Rollout,
        version: int | None,
        before: Rollout | None,
        actions: list[Action],
        now: float,
    ) -> None:
        """Write the director for ``actions`` (one signing), then save the rollout loaded
        at ``version`` (``None``: a new one), then nudge the sites.

        When the director changes, all of it happens under the home's lock, which every
        process writing this home's director takes: the stored version is checked first
        (:class:`StaleRolloutError` before anything is signed when another process saved
        the rollout meanwhile), so a step planned from an old state can never write the
        director after an operator's abort or rollback was saved."""
        assign: dict[str, list[str]] = defaultdict(list)
        unassign: list[str] = []
        desired: dict[str, str | None] = {}
        for action in actions:
            if isinstance(action, Assign):
                assign[action.bundle].extend(action.sites)
                desired.update(dict.fromkeys(action.sites, action.bundle))
            elif isinstance(action, Unassign):
                unassign.extend(action.sites)
                desired.update(dict.fromkeys(action.sites))
        events = [(getattr(a, "site", None), a.kind, a.detail()) for a in actions]

        def save() -> None:
            if version is None or before is None:
                self.store.create_rollout(rollout, desired=desired, events=events, now=now)
                return
            changed = [p for site, p in rollout.sites.items() if before.sites.get(site) != p]
            if changed or events or rollout.header() != before.header():
                self.store.save_rollout(
                    rollout, version, changed, desired=desired, events=events, now=now
                )

        if desired:
            with self.home.lock():
                if version is not None and self.store.rollout_version(rollout.id) != version:
                    raise StaleRolloutError(
                        f"rollout {rollout.id} was changed by another command meanwhile; try again"
                    )
                # The director first: a failure here leaves the stored rollout as it was,
                # and the next step plans the same again (a desired state is idempotent).
                self.home.apply(assign, unassign, locked=True)
                save()
        else:
            save()
        for action in actions:
            if action.kind in ("paused", "rolled_back", "aborted", "completed", "site_failed"):
                log.info("rollout %s: %s %s", rollout.id, action.kind, action.detail())
        if self._on_assigned is not None:
            for site, bundle in desired.items():
                try:
                    self._on_assigned(site, bundle)
                except Exception:  # a nudge is best effort: the site polls anyway
                    log.exception("rollout %s: on_assigned failed for site %s", rollout.id, site)

    def _status(
        self, rollout: Rollout, observations: Mapping[str, Observation] | None = None
    ) -> dict[str, Any]:
        if observations is None:
            observations = self._observations(rollout.fleet)
        failed, assigned = rollout.counted_failures()
        return {
            **rollout.header(),
            "sites": len(rollout.sites),
            "assigned": assigned,
            "failed": failed,
            "failure_rate": failed / assigned if assigned else 0.0,
            "wave_table": rollout.wave_table(observations),
        }
