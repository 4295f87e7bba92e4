"""``fogline bench rollout``: the rollout service and fleet store against simulated sites.

Light sites (``--light``): each is a name and an Ed25519 key, no model and no TUF refresh.
They are registered, each reports the bundle it runs (signed, with a fresh nonce), then a
rollout of a second bundle runs in three waves (5 %, 25 %, 100 %, no bake): after every
tick each newly assigned site reports the new bundle active, until the rollout completes.
What is measured is the service: report verification, nonces, the store, the planner and
the director's signing (one per tick).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import typer

__all__ = ["bench_rollout"]

_HEALTH = {
    "error_rate": 0.01,
    "latency_p50_ms": 4.0,
    "latency_p99_ms": 12.0,
    "agreement_rate": 0.97,
}


def _fake_bundle(root: Path) -> Path:
    """A bundle of two small placeholder files: the rollout never loads models."""
    from fogline.sync import write_manifest

    root.mkdir(parents=True)
    for name in ("edge.onnx", "cloud.onnx"):
        (root / name).write_bytes(name.encode() * 64)
    write_manifest(
        root,
        {
            "name": "bench",
            "version": "0",
            "edge": {"model": "edge.onnx", "input": "x", "feature_outputs": ["f"]},
            "cloud": {"model": "cloud.onnx", "output": "y"},
            "files": {"edge.onnx": {}, "cloud.onnx": {}},
        },
    )
    return root


def run_rollout_bench(sites: int, store_url: str | None, tmp: Path) -> dict[str, Any]:
    from fogline.sync import Platform, StatusReport, SyncHome, generate_key, make_status_report
    from fogline.sync._fleet import FleetStore
    from fogline.sync._rollout import RolloutPolicy
    from fogline.sync._rollout_service import RolloutService

    home = SyncHome.init(tmp / "home")
    bundle = _fake_bundle(tmp / "bundle")
    for version in ("1", "2"):
        home.publish(
            bundle,
            name="bench",
            version=version,
            platform=Platform("1.20"),
            regions=("*",),
            min_agent_version="0.1",
        )
    url = store_url or f"sqlite:///{tmp / 'fleet.db'}"
    store = FleetStore(url)
    clock = [1_000_000.0]
    assigned: list[str] = []
    service = RolloutService(
        store, home, on_assigned=lambda s, b: assigned.append(s), clock=lambda: clock[0]
    )
    fleet = f"bench-{int(time.time() * 1000)}"
    signers = {f"{fleet}-{i:05d}": generate_key() for i in range(sites)}
    service.register_sites([(s, "eu", fleet, k.public_key) for s, k in signers.items()])
    reports = 0
    report_s = 0.0

    def report(names: list[str], bundle_id: str) -> None:
        nonlocal reports, report_s
        for site in names:
            nonce = service.issue_nonce(site)
            data = make_status_report(
                StatusReport(site, nonce, bundle=bundle_id, phase="active", health=_HEALTH),
                signers[site],
            )
            t1 = time.perf_counter()  # signing is the site's work; receiving the service's
            service.receive_report(data)
            report_s += time.perf_counter() - t1
            reports += 1

    report(list(signers), "bench@1")
    policy = RolloutPolicy(canary=0.05, waves=(0.25, 1.0), bake_s=0.0, site_timeout_s=3600.0)
    t0 = time.perf_counter()
    status = service.start("bench@2", fleet, policy)
    ticks = 0
    while status["state"] == "running" and ticks < 20:
        fresh, assigned[:] = list(assigned), []
        report(fresh, "bench@2")
        clock[0] += 1.0
        status = service.tick()[0]
        ticks += 1
    seconds = time.perf_counter() - t0
    converged = sum(1 for s in store.sites(fleet) if s.bundle == "bench@2")
    size = store.size_bytes()
    store.close()
    return {
        "sites": sites,
        "store": "postgresql" if url.startswith("postgresql") else "sqlite",
        "state": status["state"],
        "waves": len(status["waves"]),
        "ticks": ticks,
        "converged": converged,
        "seconds_to_converge": round(seconds, 3),
        "reports": reports,
        "reports_per_s": round(reports / report_s, 1) if report_s else None,
        "store_bytes": size,
    }


def bench_rollout(
    sites: Annotated[
        int,
        typer.Option(help="How many simulated sites (default: 10,000 light, 200 real)."),
    ] = 0,
    light: Annotated[
        bool, typer.Option("--light", help="Sites that only sign reports (no models, no TUF).")
    ] = False,
    store: Annotated[
        str | None,
        typer.Option(
            "--store",
            help="Fleet store URL for --light (default: a fresh SQLite file).",
            show_default=False,
        ),
    ] = None,
    per_process: Annotated[int, typer.Option(min=1, max=500, help="Real sites per process.")] = 50,
    rate: Annotated[
        float, typer.Option(min=0.1, max=100.0, help="Inputs per second per real site.")
    ] = 1.0,
    bake_s: Annotated[float, typer.Option(min=0.0, help="Bake time of each wave, seconds.")] = 6.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Roll a second bundle out in three waves to simulated sites, to convergence.

    Real sites (the default): agents in a few processes, each downloading, verifying and
    swapping bundles hot from one cloud on loopback while inputs keep flowing; prints how
    long convergence took, the bytes transferred against a full download, verification
    failures and the inputs dropped during the swaps. With --light: the rollout service
    and its store against sites that only sign reports; reports verified per second and
    the store's size.
    """
    from fogline._bench import _emit
    from fogline._cli import Status, fail
    from fogline.sync import SyncError

    count = sites or (10_000 if light else 200)
    if count < 1:
        fail(f"--sites {count} must be at least 1")
    if store is not None and not light:
        fail("--store is for --light: real sites use the cloud's own fleet store")
    with tempfile.TemporaryDirectory(prefix="fogline-bench-rollout-") as tmp:
        try:
            if light:
                result = run_rollout_bench(count, store, Path(tmp))
            else:
                from fogline._bench_rollout_sites import run_sites_bench
                from fogline._broker import mosquitto_binary

                if mosquitto_binary() is None:
                    fail("bench rollout with real sites needs mosquitto on PATH (or --light)")
                with Status(not as_json, "starting") as status:
                    result = run_sites_bench(
                        count,
                        Path(tmp),
                        per_process=per_process,
                        rate_per_site=rate,
                        bake_s=bake_s,
                        progress=status.update,
                    )
        except ValueError as exc:
            fail(str(exc))
        except (SyncError, OSError, RuntimeError) as exc:
            fail(str(exc), code=1)
    _emit(result, as_json, "fogline bench rollout")
