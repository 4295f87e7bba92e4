"""A sync home served by the cloud's real sync routes on a real uvicorn server, with its
fleet store (SQLite in the home, as ``fogline rollout`` defaults to) and enrolled sites."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI

from fogline.cloud_service import SyncConfig
from fogline.cloud_service._sync import CloudSync
from fogline.messaging import MqttSettings, Topics
from fogline.sync import Platform, SiteIdentity, SyncHome, enroll
from tests.cloud_service.test_app import ServerThread
from tests.conftest import make_tiny_bundle


@dataclass
class Site:
    name: str
    state: Path

    @property
    def identity(self) -> SiteIdentity:
        return SiteIdentity.load(self.state)


@dataclass
class SyncStand:
    home: SyncHome
    sync: CloudSync
    server: ServerThread
    sites: dict[str, Site] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.server.url


def make_home(tmp: Path, versions: tuple[str, ...] = ("1", "2")) -> SyncHome:
    """A sync home with ``tiny@1``, ``tiny@2`` released for region ``eu``."""
    home = SyncHome.init(tmp / "home", site_bins_bits=2)
    for k, version in enumerate(versions):
        home.publish(
            make_tiny_bundle(tmp / f"src-{version}", version=version, seed=k),
            name="tiny",
            version=version,
            platform=Platform("1.20"),
            regions=("eu",),
            min_agent_version="0.0",
        )
    return home


def enroll_site(home: SyncHome, tmp: Path, name: str) -> Site:
    state = tmp / f"state-{name}"
    enroll(state, home.root_file("catalogue"), home.root_file("director"), name, "eu")
    return Site(name, state)


@contextlib.contextmanager
def sync_stand(
    tmp: Path,
    *,
    sites: tuple[str, ...] = ("site-a",),
    register: bool = True,
    tick_s: float = 60.0,
    topic_prefix: str = "fogline/test",
    mqtt: MqttSettings | None = None,
) -> Iterator[SyncStand]:
    """The home, :class:`CloudSync` started (its tick every ``tick_s``; nudges over its own
    connection when ``mqtt`` is given) and mounted on an app served by uvicorn."""
    home = make_home(tmp)
    sync = CloudSync(SyncConfig(home.path, tick_s=tick_s), Topics(topic_prefix))
    enrolled = {name: enroll_site(home, tmp, name) for name in sites}
    if register:
        sync.service.register_sites(
            [(s.name, "eu", "fleet-1", s.identity.public_key) for s in enrolled.values()]
        )
    app = FastAPI()
    sync.mount(app)
    sync.start(mqtt_settings=mqtt)
    try:
        with ServerThread(app) as server:
            yield SyncStand(home, sync, server, enrolled)
    finally:
        sync.stop()
