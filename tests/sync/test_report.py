"""Signed status reports: made with the site key, verified against the site's registered
key, each director nonce good once."""

from __future__ import annotations

import json
import math

import pytest

from fogline.sync import (
    NonceLedger,
    ReplayedReportError,
    ReportError,
    StatusReport,
    generate_key,
    make_status_report,
    verify_status_report,
)


@pytest.fixture
def keys() -> dict:
    return {"site-a": generate_key(), "site-b": generate_key()}


def public(keys: dict) -> dict:
    return {site: signer.public_key for site, signer in keys.items()}


def report(nonce: str, site: str = "site-a") -> StatusReport:
    return StatusReport(
        site=site,
        nonce=nonce,
        bundle="tiny@3",
        release=3,
        manifest_sha256="ab" * 32,
        health={"items_per_s": 41.5, "errors": 0},
        time_ms=1,
        phase="downloading",
        desired="tiny@4",
        stale=True,
    )


def test_a_signed_report_verifies_once(keys: dict) -> None:
    ledger = NonceLedger()
    nonce = ledger.issue("site-a")
    data = make_status_report(report(nonce), keys["site-a"])
    got = verify_status_report(data, public(keys), ledger)
    assert got == report(nonce)
    assert got.health == {"items_per_s": 41.5, "errors": 0}


def test_attack_replayed_status_report_is_refused(keys: dict) -> None:
    ledger = NonceLedger()
    data = make_status_report(report(ledger.issue("site-a")), keys["site-a"])
    verify_status_report(data, public(keys), ledger)
    with pytest.raises(ReplayedReportError, match="used already or never issued"):
        verify_status_report(data, public(keys), ledger)


def test_attack_report_signed_by_another_sites_key_is_refused(keys: dict) -> None:
    ledger = NonceLedger()
    nonce = ledger.issue("site-a")
    data = make_status_report(report(nonce), keys["site-b"])
    with pytest.raises(ReportError, match="not signed by its key"):
        verify_status_report(data, public(keys), ledger)
    # The forgery used nothing up: the site's own report still verifies.
    verify_status_report(make_status_report(report(nonce), keys["site-a"]), public(keys), ledger)


def test_attack_nonce_issued_to_another_site_is_refused(keys: dict) -> None:
    ledger = NonceLedger()
    nonce = ledger.issue("site-b")
    data = make_status_report(report(nonce), keys["site-a"])
    with pytest.raises(ReplayedReportError):
        verify_status_report(data, public(keys), ledger)


def test_attack_edited_report_is_refused(keys: dict) -> None:
    ledger = NonceLedger()
    data = json.loads(make_status_report(report(ledger.issue("site-a")), keys["site-a"]))
    import base64

    body = json.loads(base64.b64decode(data["payload"]))
    body["health"]["errors"] = -1
    data["payload"] = base64.b64encode(json.dumps(body).encode()).decode()
    with pytest.raises(ReportError, match="not signed"):
        verify_status_report(json.dumps(data).encode(), public(keys), ledger)


def test_only_the_newest_nonces_of_a_site_stay_valid(keys: dict) -> None:
    ledger = NonceLedger(per_site=2)
    oldest = ledger.issue("site-a")
    ledger.issue("site-a")
    ledger.issue("site-a")
    with pytest.raises(ReplayedReportError):
        ledger.consume("site-a", oldest)


@pytest.mark.parametrize(
    "data",
    [
        b"not json",
        b"[" * 50_000,
        b"{}",
        json.dumps({"payload": "!!", "payloadType": "x", "signatures": []}).encode(),
        b"x" * 70_000,
    ],
)
def test_malformed_reports_are_report_errors(keys: dict, data: bytes) -> None:
    with pytest.raises(ReportError):
        verify_status_report(data, public(keys), NonceLedger())


def test_a_report_of_an_unknown_site_is_refused(keys: dict) -> None:
    ledger = NonceLedger()
    data = make_status_report(report(ledger.issue("site-c"), "site-c"), generate_key())
    with pytest.raises(ReportError, match="unknown site"):
        verify_status_report(data, public(keys), ledger)


@pytest.mark.parametrize(
    "health", [{"x": math.nan}, {"x": math.inf}, {"x": "fast"}, {"../x": 1}, {"x": True}]
)
def test_bad_health_figures_are_refused(health: dict) -> None:
    with pytest.raises((ValueError, TypeError)):
        StatusReport(site="site-a", nonce="n", health=health)


@pytest.mark.parametrize(
    "fields",
    [
        {"phase": "installing"},
        {"phase": ""},
        {"stale": "yes"},
        {"error": "x" * 513},
        {"desired": 4},
    ],
)
def test_bad_update_progress_fields_are_refused(fields: dict) -> None:
    with pytest.raises((ValueError, TypeError)):
        StatusReport(site="site-a", nonce="n", **fields)


def test_a_failed_update_reports_its_reason(keys: dict) -> None:
    ledger = NonceLedger()
    nonce = ledger.issue("site-a")
    sent = StatusReport(site="site-a", nonce=nonce, phase="failed", error="TamperedError: x")
    got = verify_status_report(make_status_report(sent, keys["site-a"]), public(keys), ledger)
    assert (got.phase, got.error, got.stale) == ("failed", "TamperedError: x", False)
