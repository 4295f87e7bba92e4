"""The agent's updater: learn, download, verify, stage, warm up, swap hot — crash-safe.

One :class:`Updater` per site (``update.lock`` in its state directory, see
:mod:`._installed`) runs as a supervised thread of the agent (kind ``sync``; a failure of
one attempt is logged and counted, and the loop carries on). It wakes when the retained
MQTT nudge on ``Topics.sync(site)`` arrives (its payload is never read) or when its poll
timer runs out, and then:

1. asks both repositories what the site should run (``SiteSync.check``: metadata only);
   nothing new: ``idle`` or ``active``;
2. reports ``downloading`` and runs ``SiteSync.update()``: the bundle lands complete and
   verified under ``bundles/<name>/<version>/`` or not at all;
3. reports ``verified``, loads the new bundle and warms up its runtime (dummy batches),
   with the old one still serving;
4. asks the director again: if it changed its mind meanwhile (it pointed back), nothing
   is swapped and the next attempt starts at once;
5. swaps (one attribute of the agent; a running batch finishes on the old bundle), then
   records the new bundle and the one before it in ``current.json`` (fsync, rename),
   raises the site's release floor (``SiteSync.record_installed``), removes every other
   bundle directory, and reports ``active``.

A refusal reports ``failed`` with the error's class and message and installs nothing;
expired metadata (``ExpiredError``) keeps serving the verified bundle, reports
``stale``, and retries at each poll; a transport failure backs off (1 s doubling up to
``poll_s``) and keeps serving. Status reports go out every ``report_s`` and at each phase
change, each with a fresh nonce from the cloud.

``FOGLINE_SYNC_CRASH_AT`` (:data:`CRASH_ENV`) is a test hook, read only by
:func:`crash_point`: set to ``download``, ``verify``, ``stage`` or ``swap``, it kills the
process with SIGKILL at that step of the first install, so tests can prove that a
restart finds a complete, verified bundle whatever the moment.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from fogline.edge_agent._config import SyncConfig
from fogline.edge_agent._health import HealthWindow
from fogline.edge_agent._installed import (
    ImportResult,
    Installed,
    InstalledBundle,
    choose_bundle,
    pending_imports,
    prune_bundles,
    read_installed,
    read_status,
    update_lock,
    write_import_result,
    write_installed,
    write_status,
)
from fogline.edge_agent._loaded import LoadedBundle
from fogline.edge_agent._update_plan import BundleRef, UpdateState, next_action
from fogline.edge_agent._version import fogline_version
from fogline.edge_agent.errors import (
    AgentDataError,
    UpdateError,
    UpdateLockedError,
)
from fogline.messaging import Supervisor
from fogline.sync import (
    ArchiveError,
    ArchiveFetcher,
    ExpiredError,
    FetchError,
    HttpFetcher,
    SiteIdentity,
    SiteSync,
    StatusReport,
    StorageError,
    SyncError,
    VerificationError,
    VerifiedBundle,
    make_status_report,
)

if TYPE_CHECKING:
    from fogline.edge_agent._agent import Agent

__all__ = [
    "CRASH_ENV",
    "CRASH_STEPS",
    "IMPORT_POLL_S",
    "BundleHost",
    "StandaloneHost",
    "SyncPeer",
    "UpdateResult",
    "Updater",
    "import_standalone",
    "standalone_updater",
]

log = logging.getLogger("fogline.edge_agent")

#: The test hook: the step of an install at which to SIGKILL the process.
CRASH_ENV = "FOGLINE_SYNC_CRASH_AT"
CRASH_STEPS = ("download", "verify", "stage", "swap")
_MAX_ERROR_CHARS = 500
_LOCK_RETRY_S = 2.0
#: The longest the running updater goes without looking into ``imports/``.
IMPORT_POLL_S = 1.0


def crash_point(step: str) -> None:
    """The one reader of :data:`CRASH_ENV`: SIGKILL this process when it names ``step``."""
    if os.environ.get(CRASH_ENV) == step:
        log.warning("%s=%s: killing the process at this step", CRASH_ENV, step)
        os.kill(os.getpid(), signal.SIGKILL)


class _CrashingFetcher(HttpFetcher):
    """:class:`HttpFetcher` that dies once the first bytes of a bundle file arrived (the
    ``download`` crash point); used only while :data:`CRASH_ENV` is set."""

    def _stream(self, url: str, limit: int | None) -> Iterator[bytes]:
        for chunk in super()._stream(url, limit):
            yield chunk
            if "/targets/" in url:
                crash_point("download")


def _fetcher() -> HttpFetcher:
    return _CrashingFetcher() if os.environ.get(CRASH_ENV) == "download" else HttpFetcher()


#: What ``import_bundle`` checks an export against: this agent's version, onnxruntime
#: version and execution providers (the agent runs on the CPU provider).
Platform = tuple[str, str, tuple[str, ...]]


def agent_platform() -> Platform:
    import onnxruntime as ort

    return fogline_version(), str(ort.__version__), ("CPUExecutionProvider",)


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= _MAX_ERROR_CHARS else text[: _MAX_ERROR_CHARS - 1] + "…"


class BundleHost(Protocol):
    """What the updater installs into: the running agent, or (``fogline agent update``)
    a stand-in that only loads and warms up the bundle."""

    def stage_bundle(self, path: Path) -> LoadedBundle: ...

    def swap_bundle(self, loaded: LoadedBundle) -> LoadedBundle | None: ...


class SyncPeer:
    """The cloud's sync endpoints besides the repositories: a fresh nonce per report,
    and where reports go (standard library HTTP: two tiny requests)."""

    def __init__(self, url: str, *, timeout_s: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        # No proxy from the environment, as for the repositories (HttpFetcher).
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def nonce(self, site: str) -> str:
        url = f"{self.url}/v1/sync/sites/{urllib.parse.quote(site, safe='')}/nonce"
        # The URL is the configured http(s) sync URL (SyncConfig checks the scheme).
        body = self._request(urllib.request.Request(url, method="GET"), url)  # noqa: S310
        try:
            nonce = json.loads(body)["nonce"]
        except (ValueError, KeyError, TypeError) as exc:
            raise FetchError(f"{url} answered no nonce: {exc}") from None
        if not isinstance(nonce, str) or not nonce:
            raise FetchError(f"{url} answered no nonce")
        return nonce

    def send(self, report: bytes) -> None:
        url = f"{self.url}/v1/sync/reports"
        request = urllib.request.Request(  # noqa: S310 - an http(s) URL, as above
            url, data=report, method="POST", headers={"Content-Type": "application/json"}
        )
        self._request(request, url)

    def _request(self, request: urllib.request.Request, url: str) -> bytes:
        try:
            with self._opener.open(request, timeout=self.timeout_s) as response:
                data: bytes = response.read(65536)
                return data
        except urllib.error.HTTPError as exc:
            raise FetchError(f"{url} answered {exc.code}") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise FetchError(f"{url}: {getattr(exc, 'reason', exc)}") from None


COUNTERS = tuple(
    [
        f"{what}_{kind}"
        for kind in ("first", "update")
        for what in ("installs", "bytes_full", "bytes_transferred")
    ]
    + ["verify_failures"]
)
"""The names :meth:`Updater.counters` counts."""


@dataclass(frozen=True)
class UpdateResult:
    """How one attempt ended: ``outcome`` (``idle``, ``active``, ``installed``,
    ``expired``, ``transport``, ``refused``, ``aborted``), the bundle running after it,
    the one the director wants, and the error, if any."""

    outcome: str
    running: str | None
    desired: str | None
    error: str | None = None


class Updater:
    """The site's updater (see the module docstring). :meth:`attempt` is one update, in
    the caller's thread, with the lock held by the caller; :meth:`start` runs the loop on
    a supervised thread that holds the lock for the agent's life."""

    def __init__(
        self,
        config: SyncConfig,
        host: BundleHost,
        *,
        running: InstalledBundle | None,
        health: HealthWindow | None = None,
        site_sync: SiteSync | None = None,
        peer: SyncPeer | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.state_dir = Path(config.state_dir)
        self.host = host
        self._platform = agent_platform()
        agent_version, onnxruntime, providers = self._platform
        self.site_sync = site_sync or SiteSync(
            self.state_dir,
            catalogue_url=config.catalogue_url,
            director_url=config.director_url,
            agent_version=agent_version,
            onnxruntime=onnxruntime,
            execution_providers=providers,
            fetcher=_fetcher(),
        )
        self.identity: SiteIdentity = self.site_sync.identity
        self.site = self.identity.site
        self.peer = peer or SyncPeer(config.url)
        self.health = health
        self._clock = clock
        self.running = running
        self.state = UpdateState(poll_s=config.poll_s, report_s=config.report_s)
        self._signer: Any = None
        self._wake = threading.Event()
        self._nudged = False
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self._report_failures = 0
        self.reports_sent = 0
        self._counts: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        last = read_status(self.state_dir).get("last_import")
        #: The result of the last import (``update.json`` keeps it across restarts).
        self.last_import: dict[str, Any] | None = last if isinstance(last, dict) else None
        self._stuck_imports: set[str] = set()
        self._imports_error: str | None = None

    @classmethod
    def for_agent(cls, agent: Agent, config: SyncConfig) -> Updater:
        try:
            return cls(config, agent, running=agent.installed_bundle, health=agent.health)
        except SyncError as exc:
            raise UpdateError(f"sync state {config.state_dir}: {exc}") from exc

    # -------------------------------------------------------------------- the thread

    def start(self, supervisor: Supervisor) -> None:
        self._thread = supervisor.thread(
            "sync",
            self._loop,
            fatal=False,
            name=f"fogline-agent-{self.site}-sync",
            halt=self._halt,
        )
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._halt.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)

    def counters(self) -> dict[str, int]:
        """What this updater did since it was made (:data:`COUNTERS`): installs (the
        first on a site that ran no synced bundle, and later ones) with the bytes they
        transferred and would have transferred whole, and refusals by verification."""
        return dict(self._counts)

    def nudge(self) -> None:
        """Refresh now (the MQTT nudge; called on paho's network thread: only a flag)."""
        self._nudged = True
        self._wake.set()

    def _loop(self) -> None:
        waiting_logged = False
        while not self._halt.is_set():
            try:
                with update_lock(self.state_dir):
                    self._serve()
                return
            except UpdateLockedError as exc:
                if not waiting_logged:
                    log.warning("site %s: %s; waiting for it", self.site, exc)
                    waiting_logged = True
                self._halt.wait(_LOCK_RETRY_S)

    def _serve(self) -> None:
        self._prune()
        while not self._halt.is_set():
            self.check_imports()
            now = self._clock()
            if self._nudged:
                self._nudged = False
                self.state.nudge(now)
            if now >= self.state.next_attempt_at:
                self.attempt()
            now = self._clock()
            if self.state.report_due(now):
                self.report()
            wait = min(self.state.wait_s(self._clock()), IMPORT_POLL_S)
            if not self._nudged:
                self._wake.wait(wait)
            self._wake.clear()

    # ------------------------------------------------------------------ one attempt

    def attempt(self) -> UpdateResult:
        """One update: check, and install what the repositories agree on if it is not
        what runs. The caller holds the update lock. Never raises for a refusal or a
        transport failure: the result (and the state, and the reports) say what happened."""
        running = self._running_ref()
        desired: BundleRef | None = None
        try:
            decision = self.site_sync.check()
            if decision is not None:
                desired = BundleRef(decision.release.id, decision.release.sha256)
            action = next_action(running, desired)
            if action != "install" or desired is None:
                return self._end(action, desired)
            if self.state.begin(desired.id):
                self._phase_changed()
            verified = self.site_sync.update()
            if verified is None or verified.manifest_sha256 != desired.manifest_sha256:
                return self._end("aborted", None if verified is None else _ref(verified))
            crash_point("verify")
            if self.state.verified():
                self._phase_changed()
            return self.install_verified(verified, recheck=lambda: self._still_desired(desired))
        except ExpiredError as exc:
            log.warning(
                "site %s: signed metadata expired (%s); serving %s, installing nothing",
                self.site,
                exc,
                self._running_id(),
            )
            return self._end("expired", desired, exc)
        except FetchError as exc:
            log.warning("site %s: the repositories could not be reached: %s", self.site, exc)
            return self._end("transport", desired, exc)
        except (VerificationError, StorageError, AgentDataError, UpdateError) as exc:
            if isinstance(exc, VerificationError):
                self._counts["verify_failures"] += 1
            log.error(  # noqa: TRY400 - a refusal is expected, its line says enough
                "site %s: update to %s refused: %s",
                self.site,
                desired.id if desired else "?",
                _describe(exc),
            )
            return self._end("refused", desired, exc)
        except SyncError as exc:
            log.error("site %s: update failed: %s", self.site, _describe(exc))  # noqa: TRY400
            return self._end("refused", desired, exc)

    def _still_desired(self, desired: BundleRef) -> bool:
        again = self.site_sync.check()
        if again is None or again.release.sha256 != desired.manifest_sha256:
            log.info(
                "site %s: the director changed its mind while %s downloaded; not swapping",
                self.site,
                desired.id,
            )
            return False
        return True

    def install_verified(
        self, verified: VerifiedBundle, *, recheck: Callable[[], bool] | None = None
    ) -> UpdateResult:
        """Install a verified bundle hot — the one path of online updates and imports:
        stage and warm it up beside the running one, ``recheck()`` (False: nothing is
        swapped, ``aborted``), swap, record current and previous in ``current.json``,
        raise the release floor, prune, report ``active``. The caller holds the lock;
        errors of staging and recording propagate (nothing swapped before staging
        succeeded)."""
        first = self.running is None
        installed = _install(self.host, self.site_sync, verified, recheck=recheck)
        if installed is None:
            return self._end("aborted", None)
        kind = "first" if first else "update"
        self._counts[f"installs_{kind}"] += 1
        self._counts[f"bytes_full_{kind}"] += verified.bytes_full
        self._counts[f"bytes_transferred_{kind}"] += verified.bytes_transferred
        self.running = installed.current
        self._prune(installed)
        return self._end("installed", _ref(verified), report=True)

    # ---------------------------------------------------------------------- imports

    def check_imports(self) -> list[ImportResult]:
        """Import every export waiting in ``<state_dir>/imports/`` (oldest first): verify,
        install hot, write ``<name>.result.json`` beside it, remove it. Never raises:
        a directory that cannot be read is logged."""
        try:
            waiting = pending_imports(self.state_dir)
        except UpdateError as exc:
            self._imports_failing(str(exc))
            return []
        self._imports_error = None
        done: list[ImportResult] = []
        for handed in waiting:
            if handed.name in self._stuck_imports:
                continue
            result = self.import_file(handed)
            done.append(result)
            try:
                write_import_result(handed, result)
                handed.unlink()
            except (UpdateError, OSError) as exc:
                # Never the same export again in this run: it would be imported each second.
                self._stuck_imports.add(handed.name)
                log.error("site %s: import %s: %s", self.site, handed, exc)  # noqa: TRY400
        return done

    def _imports_failing(self, why: str) -> None:
        if why != self._imports_error:
            log.error("site %s: imports: %s", self.site, why)
        self._imports_error = why

    def import_file(self, file: Path) -> ImportResult:
        """Verify the export at ``file`` with every check of ``import_bundle`` (the site's
        roots, the site, expiry, release counter, platform, region) and install its bundle
        through :meth:`install_verified`, hot. The caller holds the lock. A refusal
        changes nothing on the serving path and is not an update failure: the update
        phase the cloud sees stays as it was."""
        result = _import_checked(
            file,
            verify=lambda: _verify_export(self.state_dir, file, self._platform),
            running=self.running,
            install=self._install_import,
            record=self.site_sync.record_installed,
        )
        self.last_import = result.to_dict()
        if result.outcome != "ok":
            self._prune()  # a bundle verified but not run does not stay
        self._write_status()
        return result

    def _install_import(self, verified: VerifiedBundle) -> Installed:
        self.install_verified(verified)
        return read_installed(self.state_dir)

    def _prune(self, installed: Installed | None = None) -> None:
        installed = installed or read_installed(self.state_dir)
        keep = installed.keep()
        if self.running is not None:
            keep.add(self.running.path)
        for path in prune_bundles(self.state_dir, keep):
            log.info("site %s: removed %s", self.site, path)

    def _running_ref(self) -> BundleRef | None:
        r = self.running
        return None if r is None else BundleRef(r.id, r.manifest_sha256)

    def _running_id(self) -> str | None:
        return None if self.running is None else self.running.id

    def _end(
        self,
        kind: str,
        desired: BundleRef | None,
        error: BaseException | None = None,
        *,
        report: bool = False,
    ) -> UpdateResult:
        text = None if error is None else _describe(error)
        if kind == "aborted":
            self._prune()
        changed = self.state.outcome(
            kind,  # type: ignore[arg-type]
            self._clock(),
            desired=None if desired is None else desired.id,
            error=text,
        )
        self._write_status()
        if changed or report:
            self._phase_changed()
        return UpdateResult(kind, self._running_id(), self.state.desired, text)

    # ---------------------------------------------------------------------- reports

    def _phase_changed(self) -> None:
        self._write_status()
        self.report()

    def _write_status(self) -> None:
        s = self.state
        try:
            write_status(
                self.state_dir,
                {
                    "site": self.site,
                    "phase": s.phase,
                    "desired": s.desired,
                    "stale": s.stale,
                    "error": s.error,
                    "running": self._running_id(),
                    "time_ms": int(time.time() * 1000),
                    "last_import": self.last_import,
                },
            )
        except UpdateError as exc:
            log.warning("site %s: %s", self.site, exc)

    def report(self) -> bool:
        """Send one status report now (a fresh nonce each); False when the cloud could
        not be reached (logged; the next one is due after ``report_s``)."""
        now = self._clock()
        self.state.reported(now)
        try:
            nonce = self.peer.nonce(self.site)
            if self._signer is None:
                self._signer = self.identity.signer()
            running = self.running
            s = self.state
            health = self.health.take(now) if self.health is not None else {}
            report = StatusReport(
                site=self.site,
                nonce=nonce,
                bundle=None if running is None else running.id,
                release=None if running is None else running.release,
                manifest_sha256=None if running is None else running.manifest_sha256,
                health=health,
                time_ms=int(time.time() * 1000),
                phase=s.phase,
                desired=s.desired,
                stale=s.stale,
                error=s.error if s.phase == "failed" or s.stale else None,
            )
            self.peer.send(make_status_report(report, self._signer))
        except (SyncError, ValueError) as exc:
            self._report_failures += 1
            n = self._report_failures
            if n & (n - 1) == 0:  # 1st, 2nd, 4th … in a row
                log.warning("site %s: status report not sent (%s; %d in a row)", self.site, exc, n)
            return False
        self._report_failures = 0
        self.reports_sent += 1
        return True


def _ref(verified: VerifiedBundle) -> BundleRef:
    return BundleRef(verified.id, verified.manifest_sha256)


def _install(
    host: BundleHost,
    site_sync: SiteSync,
    verified: VerifiedBundle,
    *,
    recheck: Callable[[], bool] | None = None,
) -> Installed | None:
    """The steps every install takes, online or imported, with the lock held: stage (load
    and warm up beside the running bundle), ``recheck()`` (False: nothing swapped, None
    returned), swap, ``current.json`` (the new bundle and the one before it), the release
    floor (``record_installed``). The caller prunes and reports."""
    staged = host.stage_bundle(verified.path)
    crash_point("stage")
    if recheck is not None and not recheck():
        return None
    host.swap_bundle(staged)
    crash_point("swap")
    new = InstalledBundle(
        name=verified.release.name,
        version=verified.release.version,
        release=verified.release.release,
        manifest_sha256=verified.manifest_sha256,
        files={name: verified.files[name].sha256 for name in sorted(verified.local)},
        path=verified.path,
    )
    installed = read_installed(site_sync.state_dir).after_swap(new)
    write_installed(site_sync.state_dir, installed)
    site_sync.record_installed(verified)
    log.info(
        "site %s: installed %s (previous %s)",
        site_sync.identity.site,
        new.id,
        installed.previous.id if installed.previous else "none",
    )
    return installed


def _verify_export(state_dir: Path, file: Path, platform: Platform) -> VerifiedBundle:
    """``import_bundle`` without recording: the bundle an export carries, verified into
    ``bundles/``; recording is the install's."""
    from fogline.sync import import_bundle

    if Path(file).is_symlink():
        raise ArchiveError(f"{file} is a symbolic link; an import is a plain file")
    agent_version, onnxruntime, providers = platform
    return import_bundle(
        state_dir,
        file,
        agent_version=agent_version,
        onnxruntime=onnxruntime,
        execution_providers=providers,
        record=False,
    )


def _import_checked(
    file: Path,
    *,
    verify: Callable[[], VerifiedBundle],
    running: InstalledBundle | None,
    install: Callable[[VerifiedBundle], Installed],
    record: Callable[[VerifiedBundle], None],
) -> ImportResult:
    """One import, its outcome whatever happens: ``ok`` (installed, or already the
    running bundle), ``refused`` (the export or its bundle must not be used here),
    ``error`` (a file could not be read or written, or anything unforeseen)."""
    name = str(file)
    try:
        verified = verify()
        found: dict[str, Any] = {
            "bundle": verified.id,
            "release": verified.release.to_dict(),
            "path": str(verified.path),
        }
        if running is not None and running.manifest_sha256 == verified.manifest_sha256:
            if not verified.installed:
                record(verified)
            return ImportResult(
                "ok", name, f"{verified.id} already installed", already_installed=True, **found
            )
        installed = install(verified)
        previous = None if installed.previous is None else installed.previous.id
        message = f"installed {verified.id} (previous {previous or 'none'})"
        return ImportResult("ok", name, message, previous=previous, **found)
    except (VerificationError, AgentDataError) as exc:
        log.error("import of %s refused: %s", file, _describe(exc))  # noqa: TRY400
        return ImportResult("refused", name, str(exc))
    except (SyncError, UpdateError, OSError) as exc:
        log.error("import of %s failed: %s", file, _describe(exc))  # noqa: TRY400
        return ImportResult("error", name, str(exc))
    except Exception as exc:  # one export never ends the updater
        log.exception("import of %s failed", file)
        return ImportResult("error", name, _describe(exc))


def import_standalone(
    state_dir: Path, file: Path, host: BundleHost, *, platform: Platform | None = None
) -> ImportResult:
    """Import ``file`` into a site no agent runs on, as the running agent would (with
    the same install steps), so that the next ``fogline agent run`` starts on it. The
    caller holds the update lock. The result is kept as ``last_import`` in
    ``update.json``; nothing is reported (the agent reports what it runs at its start)."""
    state_dir = Path(state_dir)
    chosen = platform or agent_platform()
    running = choose_bundle(state_dir)

    def recorder() -> SiteSync:
        agent_version, onnxruntime, providers = chosen
        return SiteSync(
            state_dir,
            catalogue_url=ArchiveFetcher.CATALOGUE_URL,
            director_url=ArchiveFetcher.DIRECTOR_URL,
            agent_version=agent_version,
            onnxruntime=onnxruntime,
            execution_providers=providers,
        )

    def install(verified: VerifiedBundle) -> Installed:
        installed = _install(host, recorder(), verified)
        if installed is None:  # pragma: no cover - no recheck, never None
            raise UpdateError(f"{verified.id} was not installed")
        prune_bundles(state_dir, installed.keep())
        return installed

    result = _import_checked(
        file,
        verify=lambda: _verify_export(state_dir, file, chosen),
        running=running,
        install=install,
        record=lambda verified: recorder().record_installed(verified),
    )
    if result.outcome != "ok":
        keep = read_installed(state_dir).keep()
        if running is not None:
            keep.add(running.path)
        prune_bundles(state_dir, keep)
    status = {k: v for k, v in read_status(state_dir).items() if k != "format"}
    current = read_installed(state_dir).current
    status.update(
        running=None if current is None else current.id,
        last_import=result.to_dict(),
        time_ms=int(time.time() * 1000),
    )
    try:
        write_status(state_dir, status)
    except UpdateError as exc:
        log.warning("%s", exc)
    return result


class StandaloneHost:
    """The host of ``fogline agent update`` when no agent runs: staging loads the bundle
    and warms up its edge model (it must run here); swapping is only recording it."""

    def __init__(self, *, threads: int = 1, max_batch: int = 32, warmup_runs: int = 3) -> None:
        self._threads = threads
        self._max_batch = max_batch
        self._warmup_runs = max(1, warmup_runs)

    def stage_bundle(self, path: Path) -> LoadedBundle:
        from fogline.edge_agent._runtime import EdgeRuntime

        loaded = LoadedBundle.load(path)
        runtime = EdgeRuntime(
            loaded.bundle,
            threads=self._threads,
            max_batch=self._max_batch,
            warmup_runs=self._warmup_runs,
        )
        runtime.warm_up()
        return loaded.with_runtime(runtime)

    def swap_bundle(self, loaded: LoadedBundle) -> LoadedBundle | None:
        return None


@contextlib.contextmanager
def standalone_updater(config: SyncConfig, host: BundleHost) -> Iterator[Updater]:
    """An updater for one foreground attempt, holding the site's update lock."""
    with update_lock(config.state_dir):
        yield Updater(config, host, running=choose_bundle(config.state_dir))
