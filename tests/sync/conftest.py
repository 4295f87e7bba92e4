"""A fleet in memory: a catalogue and a director (real python-tuf metadata, real Ed25519
keys) served by a :class:`MemoryFetcher`, and sites enrolled against them."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from securesystemslib.signer import CryptoSigner

from fogline.sync import (
    Catalogue,
    Director,
    Expiry,
    MemoryFetcher,
    MemoryStore,
    Platform,
    Release,
    RepositoryWriter,
    SiteSync,
    enroll,
    generate_key,
)

CATALOGUE_URL = "https://catalogue.example"
DIRECTOR_URL = "https://director.example"
ROLES = ("targets", "snapshot", "timestamp")


@dataclasses.dataclass
class Fleet:
    """Both repositories of one fleet, their keys, and the fetcher that serves them."""

    tmp: Path
    bundle_dir: Path
    stores: dict[str, MemoryStore]
    writers: dict[str, RepositoryWriter]
    root_signers: dict[str, list[CryptoSigner]]
    role_signers: dict[str, dict[str, CryptoSigner]]
    fetcher: MemoryFetcher

    @property
    def catalogue(self) -> Catalogue:
        return Catalogue(self.writers["catalogue"])

    @property
    def director(self) -> Director:
        return Director(self.writers["director"])

    def publish(
        self,
        *,
        name: str = "tiny",
        version: str = "1",
        release: int | None = None,
        regions: tuple[str, ...] = ("eu",),
        platform: Platform | None = None,
        min_agent_version: str = "0.1",
        bundle_dir: Path | None = None,
    ) -> Release:
        return self.catalogue.publish(
            bundle_dir or self.bundle_dir,
            name=name,
            version=version,
            release=release,
            regions=regions,
            platform=platform or Platform("1.20"),
            min_agent_version=min_agent_version,
        )

    def release_to(self, sites: list[str], **kwargs: Any) -> Release:
        release = self.publish(**kwargs)
        self.director.assign(sites, release)
        return release

    def root_bytes(self, repository: str) -> bytes:
        data = self.stores[repository].read("metadata/1.root.json")
        assert data is not None
        return data

    def site(
        self,
        name: str = "site-a",
        region: str = "eu",
        *,
        agent_version: str = "0.1.0",
        onnxruntime: str = "1.32.0",
        providers: tuple[str, ...] = ("CPUExecutionProvider",),
    ) -> SiteSync:
        state = self.tmp / f"state-{name}"
        if not (state / "site.json").exists():
            enroll(state, self.root_bytes("catalogue"), self.root_bytes("director"), name, region)
        return SiteSync(
            state,
            catalogue_url=CATALOGUE_URL,
            director_url=DIRECTOR_URL,
            agent_version=agent_version,
            onnxruntime=onnxruntime,
            execution_providers=providers,
            fetcher=self.fetcher,
        )

    def url(self, repository: str, path: str) -> str:
        base = CATALOGUE_URL if repository == "catalogue" else DIRECTOR_URL
        return f"{base}/{path}"


def make_fleet(
    tmp: Path, bundle_dir: Path, *, root_keys: int = 3, root_threshold: int = 2
) -> Fleet:
    stores = {"catalogue": MemoryStore(), "director": MemoryStore()}
    writers: dict[str, RepositoryWriter] = {}
    root_signers: dict[str, list[CryptoSigner]] = {}
    role_signers: dict[str, dict[str, CryptoSigner]] = {}
    for repository, store in stores.items():
        root_signers[repository] = [generate_key() for _ in range(root_keys)]
        role_signers[repository] = {role: generate_key() for role in ROLES}
        writer = RepositoryWriter(store, expiry=Expiry(), name=repository)
        writer.initialise(
            root_signers=root_signers[repository],
            root_threshold=root_threshold,
            role_signers=role_signers[repository],
            bins_bit_length=4 if repository == "director" else None,
        )
        writers[repository] = writer
    fetcher = MemoryFetcher()
    fetcher.mount(CATALOGUE_URL, stores["catalogue"])
    fetcher.mount(DIRECTOR_URL, stores["director"])
    return Fleet(
        tmp=tmp,
        bundle_dir=bundle_dir,
        stores=stores,
        writers=writers,
        root_signers=root_signers,
        role_signers=role_signers,
        fetcher=fetcher,
    )


@pytest.fixture
def fleet(tmp_path: Path, tiny_bundle: Path) -> Fleet:
    return make_fleet(tmp_path / "fleet", tiny_bundle)


@pytest.fixture
def make_other_fleet(tmp_path: Path, tiny_bundle: Path) -> Callable[[], Fleet]:
    def make() -> Fleet:
        return make_fleet(tmp_path / "other-fleet", tiny_bundle)

    return make


def endless(chunk: bytes = b"x" * 65536) -> tuple[Callable[[], Iterator[bytes]], list[int]]:
    """A body that never ends, and a list that counts the chunks taken from it."""
    taken = [0]

    def body() -> Iterator[bytes]:
        while True:
            taken[0] += 1
            yield chunk

    return body, taken


def resign_root(data: bytes, signers: list[CryptoSigner]) -> bytes:
    """A root file re-signed by ``signers`` only."""
    from tuf.api.metadata import Metadata, Root
    from tuf.api.serialization.json import JSONSerializer

    md = Metadata[Root].from_bytes(data)
    md.signatures.clear()
    for signer in signers:
        md.sign(signer, append=True)
    return md.to_bytes(JSONSerializer(compact=True))
