"""The pure two-repository check: target entries in, a decision or a named refusal out.
No repository, no file, no network: entries are built as the metadata would hold them."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from tuf.api.metadata import TargetFile

from fogline.sync import (
    AgentVersionError,
    DisagreementError,
    MetadataError,
    NotReleasedError,
    Platform,
    PlatformError,
    RegionError,
    Release,
    ReleaseRollbackError,
    SiteState,
    TamperedError,
    UnsafePathError,
    WrongSiteError,
    check_file,
    check_target_path,
    decide,
    manifest_files,
    read_desired,
)
from fogline.sync._names import parse_version, version_at_least
from fogline.sync._verify import FileEntry

RELEASE = Release(
    name="tiny",
    version="3",
    release=3,
    platform=Platform("1.20"),
    regions=("eu",),
    min_agent_version="0.1",
    length=900,
    sha256="ab" * 32,
)
SITE = SiteState(site="site-a", region="eu", agent_version="0.1.0", onnxruntime="1.32.0")


def catalogue_entry(of: Release = RELEASE, **custom: Any) -> TargetFile:
    fields = {"kind": "bundle", **of.fields(), **custom}
    return TargetFile(of.length, {"sha256": of.sha256}, of.path, {"custom": {"fogline": fields}})


def director_entry(release: Release = RELEASE, site: str = "site-a", **custom: Any) -> TargetFile:
    fields = {"kind": "desired", "site": site, "target": release.path, **release.fields()}
    fields.update(custom)
    return TargetFile(
        release.length, {"sha256": release.sha256}, f"sites/{site}", {"custom": {"fogline": fields}}
    )


def test_agreeing_entries_give_the_release() -> None:
    desired = read_desired("site-a", director_entry())
    assert desired is not None
    decision = decide(SITE, desired, catalogue_entry())
    assert decision.release == RELEASE
    assert not decision.installed
    assert decision.target == "tiny/3/manifest.json"


def test_the_installed_release_is_marked_installed() -> None:
    desired = read_desired("site-a", director_entry())
    assert desired is not None
    state = dataclasses.replace(SITE, releases={"tiny": 3})
    assert decide(state, desired, catalogue_entry()).installed


def test_no_director_entry_is_no_decision() -> None:
    assert read_desired("site-a", None) is None


def test_a_release_the_catalogue_lacks_is_not_released() -> None:
    desired = read_desired("site-a", director_entry())
    assert desired is not None
    with pytest.raises(NotReleasedError):
        decide(SITE, desired, None)


@pytest.mark.parametrize(
    ("field", "director", "catalogue"),
    [
        ("length", {"length": 901}, {}),
        ("hashes", {"sha256": "cd" * 32}, {}),
        ("release", {"release": 4}, {}),
        ("platform", {"platform": Platform("1.21")}, {}),
        ("regions", {"regions": ("eu", "us")}, {}),
        ("name", {}, {}),
    ],
)
def test_any_disagreement_is_named(
    field: str, director: dict[str, Any], catalogue: dict[str, Any]
) -> None:
    if field == "name":
        entry = director_entry(name="other")
    else:
        entry = director_entry(dataclasses.replace(RELEASE, **director))
    desired = read_desired("site-a", entry)
    assert desired is not None
    with pytest.raises(DisagreementError) as exc:
        decide(SITE, desired, catalogue_entry(**catalogue))
    assert exc.value.field == field


def test_a_release_counter_below_the_installed_one_is_refused() -> None:
    desired = read_desired("site-a", director_entry())
    assert desired is not None
    state = dataclasses.replace(SITE, releases={"tiny": 4})
    with pytest.raises(ReleaseRollbackError, match="lower than the installed 4"):
        decide(state, desired, catalogue_entry())


def test_another_bundle_names_release_counter_does_not_count() -> None:
    desired = read_desired("site-a", director_entry())
    assert desired is not None
    state = dataclasses.replace(SITE, releases={"other": 99})
    assert not decide(state, desired, catalogue_entry()).installed


def test_an_entry_for_another_site_is_refused() -> None:
    with pytest.raises(WrongSiteError):
        read_desired("site-a", director_entry(site="site-b"))


def test_an_unsafe_director_target_is_refused() -> None:
    with pytest.raises(UnsafePathError):
        read_desired("site-a", director_entry(target="tiny/../../x"))


def test_a_director_entry_that_is_not_desired_state_is_refused() -> None:
    entry = director_entry(kind="bundle")
    with pytest.raises(MetadataError, match="not a 'desired'"):
        read_desired("site-a", entry)


def test_a_catalogue_entry_for_another_path_is_refused() -> None:
    desired = read_desired("site-a", director_entry())
    assert desired is not None
    moved = catalogue_entry()
    moved.path = "tiny/4/manifest.json"
    with pytest.raises(MetadataError):
        decide(SITE, desired, moved)


def test_garbage_release_fields_are_metadata_errors() -> None:
    desired = read_desired("site-a", director_entry())
    assert desired is not None
    for bad in ({"release": "3"}, {"release": True}, {"regions": "eu"}, {"platform": None}):
        with pytest.raises(MetadataError):
            decide(SITE, desired, catalogue_entry(**bad))


@pytest.mark.parametrize(
    ("state", "error"),
    [
        ({"region": "us"}, RegionError),
        ({"onnxruntime": "1.19.9"}, PlatformError),
        ({"execution_providers": ("CUDAExecutionProvider",)}, PlatformError),
        ({"agent_version": "0.0.9"}, AgentVersionError),
    ],
)
def test_a_release_the_site_cannot_run_is_refused(
    state: dict[str, Any], error: type[Exception]
) -> None:
    desired = read_desired("site-a", director_entry())
    assert desired is not None
    with pytest.raises(error):
        decide(dataclasses.replace(SITE, **state), desired, catalogue_entry())


def manifest(**release: Any) -> bytes:
    return json.dumps(
        {
            "name": "tiny",
            "version": "3",
            "release": {
                "counter": 3,
                "platform": {"onnxruntime": "1.20", "execution_provider": "CPUExecutionProvider"},
                "regions": ["eu"],
                "min_agent_version": "0.1",
                **release,
            },
            "files": {"edge.onnx": {"bytes": 10, "sha256": "11" * 32}},
        }
    ).encode()


def test_a_manifest_stating_its_own_release_lists_its_files() -> None:
    files = manifest_files(manifest(), RELEASE)
    assert files == {"edge.onnx": FileEntry("edge.onnx", 10, "11" * 32)}


def test_a_manifest_stating_another_release_is_refused() -> None:
    with pytest.raises(DisagreementError):
        manifest_files(manifest(counter=2), RELEASE)


def test_a_manifest_naming_a_path_outside_the_bundle_is_refused() -> None:
    data = json.loads(manifest())
    data["files"] = {"../edge.onnx": {"bytes": 1, "sha256": "11" * 32}}
    with pytest.raises(UnsafePathError):
        manifest_files(json.dumps(data).encode(), RELEASE)


@pytest.mark.parametrize("name", ["manifest.json", "models/edge.onnx"])
def test_a_manifest_file_that_would_shadow_the_manifest_or_nest_is_refused(name: str) -> None:
    data = json.loads(manifest())
    data["files"] = {name: {"bytes": 1, "sha256": "11" * 32}}
    with pytest.raises(UnsafePathError):
        manifest_files(json.dumps(data).encode(), RELEASE)


def test_a_manifest_nested_without_end_is_refused() -> None:
    with pytest.raises(MetadataError):
        manifest_files(b"[" * 100_000, RELEASE)


def test_a_file_the_catalogue_lists_differently_is_tampered() -> None:
    entry = FileEntry("edge.onnx", 10, "11" * 32)
    listed = TargetFile(
        10,
        {"sha256": "22" * 32},
        "tiny/3/edge.onnx",
        {"custom": {"fogline": {"kind": "file", "bundle": "tiny@3"}}},
    )
    with pytest.raises(TamperedError):
        check_file(RELEASE, entry, listed)
    with pytest.raises(NotReleasedError):
        check_file(RELEASE, entry, None)


@pytest.mark.parametrize(
    "path",
    [
        "../x",
        "a/../b",
        "/etc/passwd",
        "a//b",
        "a/./b",
        ".hidden/x",
        "a\\b",
        "C:/x",
        "a/%2e%2e/b",
        "a/b\x00",
        "",
        "a/" * 9 + "b",
        "x" * 600,
        "a/-rf",
    ],
)
def test_attack_unsafe_target_names_are_refused(path: str) -> None:
    with pytest.raises(UnsafePathError):
        check_target_path(path)


def test_plain_target_names_pass() -> None:
    assert check_target_path("tiny/3/manifest.json") == "tiny/3/manifest.json"
    assert check_target_path("sites/plant-7") == "sites/plant-7"


def test_versions_compare_as_numbers() -> None:
    assert version_at_least("1.10", "1.9")
    assert version_at_least("1.32", "1.32.0")
    assert not version_at_least("1.9.9", "1.10")
    assert parse_version("0.1.0+local", "v") == (0, 1)
    with pytest.raises(ValueError, match="dotted version"):
        parse_version("1.2rc1", "v")
