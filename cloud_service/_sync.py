"""The cloud serving signed model sync (docs/cloud.md, "Sync"): :class:`CloudSync`.

It opens the fleet store and a :class:`~fogline.sync.RolloutService` over the sync home,
mounts the repositories (:mod:`._sync_http`) and the nonce and report routes
(:mod:`._sync_api`) on an app, steps running rollouts on a supervised thread every
``tick_s`` (kind ``rollout_tick``: a failed tick is logged and counted, and the next one
comes as planned), and nudges each site whose desired bundle the service changed: a
retained JSON message ``{"bundle": "name@version"}`` (``null`` when its desired state was
removed) on ``Topics.sync(site)`` at QoS 1. The site never trusts the nudge, only the
signed director it then reads, and polls anyway: a nudge that cannot be sent is logged
and dropped. Changes made by another hand — `fogline rollout start`, `pause`, `abort`,
`rollback` write the store and the director themselves — are found at the next tick by
comparing each site's desired bundle in the store with what was last nudged or seen, and
nudged then.

The nudges go out on a connection it is given (the cloud worker's) or on its own.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from paho.mqtt.enums import MQTTErrorCode

from fogline.cloud_service._config import SyncConfig
from fogline.cloud_service._sync_api import add_sync_api_routes
from fogline.cloud_service._sync_http import add_sync_file_routes
from fogline.cloud_service.errors import ConfigError, StoreError
from fogline.messaging import (
    MessagingError,
    MqttConnection,
    MqttSettings,
    Supervisor,
    Topics,
    mapped_errors,
)
from fogline.sync import RolloutService, StorageError, SyncHome

if TYPE_CHECKING:
    from fastapi import FastAPI

    from fogline.sync import FleetStore

__all__ = ["CloudSync"]

log = logging.getLogger("fogline.cloud.sync")

#: Where the nudges go: a function returning the connection to publish on now (``None``:
#: none yet, the nudge is dropped).
ConnectionSource = Callable[[], MqttConnection | None]


class CloudSync:
    """Sync served by the cloud (see the module docstring).

    Construction opens the fleet store (:class:`ConfigError` for a home that is not
    initialised or a store URL that is not one, :class:`StoreError` for a store that
    cannot be opened); :meth:`mount` adds the routes to an app; :meth:`start` starts the
    tick thread and, given ``mqtt_settings`` instead of ``connection``, its own broker
    connection; :meth:`stop` ends both and closes the store. ``supervisor``: whose thread
    failures the tick's count among (the worker's, for its metrics), else its own.
    """

    def __init__(
        self,
        config: SyncConfig,
        topics: Topics,
        *,
        supervisor: Supervisor | None = None,
    ) -> None:
        from fogline.sync import FleetStore

        self.config = config
        self.topics = topics
        self.home = SyncHome(config.home, config.keys)
        try:
            self.home.settings  # noqa: B018 - read to refuse a home not initialised
        except StorageError as exc:
            raise ConfigError(f"sync.home: {exc}") from None
        try:
            self.store: FleetStore = FleetStore(config.store_url)
        except ValueError as exc:
            raise ConfigError(f"sync.store: {exc}") from None
        except StorageError as exc:
            raise StoreError(str(exc)) from exc
        self.service = RolloutService(self.store, self.home, on_assigned=self._nudge)
        self.supervisor = supervisor or Supervisor("cloud sync", log)
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self._connection: ConnectionSource = lambda: None
        self._own: MqttConnection | None = None
        self._lock = threading.Lock()
        self.ticks = 0
        """Ticks completed (one ``RolloutService.tick`` each)."""
        self.tick_failures = 0
        """Ticks that raised (logged and counted under ``rollout_tick``)."""
        self.nudges = 0
        """Nudges handed to the broker connection."""
        self.nudge_failures = 0
        """Nudges that could not be published (logged, dropped)."""
        self._seen: dict[str, str | None] | None = None
        """Each site's desired bundle as last nudged or read from the store (None: not
        read yet)."""

    # ------------------------------------------------------------------------ serving

    def mount(self, app: FastAPI) -> None:
        """Add ``/sync/catalogue/…``, ``/sync/director/…``, the nonce and report routes."""
        add_sync_file_routes(
            app, self.home.repository_dir("catalogue"), self.home.repository_dir("director")
        )
        add_sync_api_routes(app, self.service)

    # ---------------------------------------------------------------------- lifecycle

    def start(
        self,
        *,
        connection: ConnectionSource | None = None,
        mqtt_settings: MqttSettings | None = None,
    ) -> CloudSync:
        """Start the tick thread; nudge through ``connection`` (read at each nudge), or
        through an own connection made from ``mqtt_settings`` (in the background: nudges
        before it connects are queued by the client), or not at all."""
        if connection is not None and mqtt_settings is not None:
            raise ValueError("give a connection or mqtt_settings, not both")
        with self._lock:
            if self._thread is not None:
                raise RuntimeError("CloudSync is started once")
            if mqtt_settings is not None:
                own = self._own = MqttConnection(mqtt_settings)
                own.start(wait=False)
                self._connection = lambda: own
            elif connection is not None:
                self._connection = connection
            try:
                # What the store says now is what sites were told before this start.
                self._seen = self._desired()
            except StorageError as exc:
                log.warning("fleet store not readable at start (%s); read at the first tick", exc)
            self._thread = self.supervisor.thread(
                "rollout_tick", self._run, fatal=False, name="fogline-rollout-tick", halt=self._halt
            )
            self._thread.start()
        log.info(
            "serving sync from %s (fleet store %s); rollouts step every %g s",
            self.home.path,
            self.store.url,
            self.config.tick_s,
        )
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """End the tick thread (a tick under way finishes first), the own connection and
        the store. Idempotent."""
        self._halt.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)
        own, self._own = self._own, None
        if own is not None:
            own.stop()
        self.store.close()

    # ------------------------------------------------------------------------ the tick

    def _run(self) -> None:
        while not self._halt.wait(self.config.tick_s):
            self.tick()

    def tick(self) -> None:
        """One step of every running rollout; a failure is logged and counted, not raised
        (the next tick plans again from what is stored)."""
        try:
            self.service.tick()
            self._nudge_changes()
        except Exception as exc:  # noqa: BLE001 - one failed tick must not end the loop
            self.tick_failures += 1
            self.supervisor.contained("rollout_tick", "a rollout tick", exc)
            return
        self.ticks += 1

    # ----------------------------------------------------------------------- the nudge

    def _desired(self) -> dict[str, str | None]:
        return {site: desired for site, _bundle, desired in self.store.assignments()}

    def _nudge_changes(self) -> None:
        """Nudge each site whose desired bundle in the store changed since it was last
        nudged or seen: assignments made by the ``fogline rollout`` commands."""
        desired = self._desired()
        seen, self._seen = self._seen, desired
        if seen is None:
            return  # the first read: nothing to compare with
        for site, bundle in desired.items():
            if seen.get(site) != bundle:
                self._nudge(site, bundle)

    def _nudge(self, site: str, bundle: str | None) -> None:
        """Publish ``site``'s retained nudge; best effort (the site polls too)."""
        if self._seen is not None:
            self._seen[site] = bundle  # the tick's own change: not nudged again
        connection = self._connection()
        if connection is None:
            return
        payload = json.dumps({"bundle": bundle}).encode()
        try:
            topic = self.topics.sync(site)
            with mapped_errors(f"cannot publish the sync nudge of site {site!r}"):
                rc = connection.client.publish(topic, payload, qos=1, retain=True).rc
        except (MessagingError, ValueError) as exc:
            self._nudge_failed(str(exc))
            return
        # Success, or kept by the client until the connection is back (QoS 1).
        if rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            self._nudge_failed(f"the broker connection refused the sync nudge of {site!r}: {rc}")
            return
        self.nudges += 1

    def _nudge_failed(self, why: str) -> None:
        self.nudge_failures += 1
        log.warning("%s; the site finds the change at its next poll", why)
