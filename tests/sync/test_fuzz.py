"""Whatever a repository or a report holds, the pure checks answer with a decision or a
fogline.sync error, never with another exception."""

from __future__ import annotations

import contextlib
import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from tuf.api.metadata import TargetFile

from fogline.sync import (
    NonceLedger,
    ReportError,
    SiteState,
    VerificationError,
    decide,
    generate_key,
    manifest_files,
    read_desired,
    verify_status_report,
)

from .test_verify import RELEASE, catalogue_entry, director_entry

SITE = SiteState(site="site-a", region="eu", agent_version="0.1.0", onnxruntime="1.32.0")
FIELDS = ["kind", "site", "target", "name", "version", "release", "platform", "regions",
          "min_agent_version", "counter", "files"]  # fmt: skip

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=20,
)


def mutated(entry: TargetFile, changes: dict[str, Any]) -> TargetFile:
    custom = json.loads(json.dumps(entry.unrecognized_fields))
    custom["custom"]["fogline"].update(changes)
    return TargetFile(entry.length, dict(entry.hashes), entry.path, custom)


@settings(max_examples=300, deadline=None)
@given(
    director=st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=4),
    catalogue=st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=4),
)
def test_any_custom_fields_give_a_decision_or_a_verification_error(
    director: dict[str, Any], catalogue: dict[str, Any]
) -> None:
    try:
        desired = read_desired("site-a", mutated(director_entry(), director))
        if desired is not None:
            decide(SITE, desired, mutated(catalogue_entry(), catalogue))
    except VerificationError:
        pass


@settings(max_examples=300, deadline=None)
@given(
    data=st.binary(max_size=200)
    | json_values.map(lambda v: json.dumps(v).encode())
    | st.dictionaries(st.sampled_from(FIELDS), json_values).map(lambda v: json.dumps(v).encode())
)
def test_any_manifest_gives_files_or_a_verification_error(data: bytes) -> None:
    with contextlib.suppress(VerificationError):
        manifest_files(data, RELEASE)


KEYS = {"site-a": generate_key().public_key}


@settings(max_examples=300, deadline=None)
@given(
    data=st.binary(max_size=200)
    | json_values.map(lambda v: json.dumps(v).encode())
    | st.fixed_dictionaries(
        {"payload": st.text(max_size=40), "payloadType": json_values, "signatures": json_values}
    ).map(lambda v: json.dumps(v).encode())
)
def test_any_report_bytes_give_a_report_or_a_report_error(data: bytes) -> None:
    with contextlib.suppress(ReportError):
        verify_status_report(data, KEYS, NonceLedger())
