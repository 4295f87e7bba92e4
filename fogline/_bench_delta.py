"""``fogline bench delta``: what a site downloads when a bundle changes, end to end.

A catalogue and a director (real python-tuf metadata, real keys) in memory, one enrolled
site, and a bundle whose edge part is an INT8 ONNX model of 40 tensors (``--mib`` in all,
values drawn like quantized weights). The site installs release 1, then three releases in
turn, each published with deltas from the one before:

- ``replace``: 4 of the 40 edge tensors replaced by new ones;
- ``finetune``: 10 % of all edge values moved by ±1;
- ``cloud_only``: the cloud part changed, the edge part not.

For each: ``bytes_full`` (the manifest and the edge part whole), ``bytes_transferred``
(what the site's update downloaded of the bundle's targets), their ``ratio``,
``model_bytes`` (transferred less the manifest), ``build_s`` (the publish, deltas made
and signed) and ``apply_s`` (the site's update: metadata, deltas applied, files verified).
``--generic`` adds, for the two edge changes, the size and time of the generic zstd patch
(:mod:`fogline.compression._delta`'s fallback for files that are not ONNX).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import typer

__all__ = ["bench_delta", "fine_tune", "int8_model", "int8_tensors", "replace_tensors"]

TENSORS = 40


def int8_tensors(rng: np.random.Generator, count: int, nbytes: int) -> list[np.ndarray]:
    """``count`` INT8 tensors of ``nbytes`` each, drawn like quantized weights (a normal
    of standard deviation 25, rounded and clipped: zstd keeps about 84 % of them)."""
    return [
        np.clip(np.rint(rng.normal(0.0, 25.0, nbytes)), -128, 127).astype(np.int8)
        for _ in range(count)
    ]


def replace_tensors(
    tensors: Sequence[np.ndarray], which: Sequence[int], rng: np.random.Generator
) -> list[np.ndarray]:
    """``tensors`` with those at ``which`` drawn anew."""
    out = list(tensors)
    for i in which:
        out[i] = int8_tensors(rng, 1, out[i].size)[0]
    return out


def fine_tune(
    tensors: Sequence[np.ndarray], share: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """``tensors`` with ``share`` of all values moved by +1 or -1 (clipped to INT8)."""
    out = []
    for t in tensors:
        moved = (rng.random(t.shape) < share) * rng.choice(np.array([-1, 1]), t.shape)
        out.append(np.clip(t.astype(np.int16) + moved, -128, 127).astype(np.int8))
    return out


def int8_model(tensors: Sequence[np.ndarray], name: str = "edge") -> bytes:
    """An ONNX model (bytes) holding ``tensors`` as initializers ``w0``, ``w1``, …"""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(t, f"w{i}") for i, t in enumerate(tensors)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    data: bytes = model.SerializeToString()
    return data


def _bundle(root: Path, edge: bytes, cloud: bytes) -> Path:
    from fogline.sync import write_manifest

    root.mkdir(parents=True)
    (root / "edge.onnx").write_bytes(edge)
    (root / "cloud.onnx").write_bytes(cloud)
    write_manifest(
        root,
        {
            "name": "bench",
            "version": "0",
            "files": {"edge.onnx": {}, "cloud.onnx": {}},
            "edge": {"model": "edge.onnx", "input": "x", "feature_outputs": ["y"]},
            "cloud": {"model": "cloud.onnx", "output": "y"},
        },
    )
    return root


def run(mib: float, seed: int = 0, *, generic: bool = False) -> dict[str, Any]:
    """The three cases on an edge part of ``mib`` MiB (see the module docstring); with
    ``generic``, also the generic zstd patch of each changed edge part, for comparison."""
    from fogline.sync import (
        Catalogue,
        Director,
        MemoryFetcher,
        MemoryStore,
        Platform,
        RepositoryWriter,
        SiteSync,
        enroll,
        generate_key,
    )

    rng = np.random.default_rng(seed)
    each = max(1, int(mib * (1 << 20)) // TENSORS)
    stores = {"catalogue": MemoryStore(), "director": MemoryStore()}
    writers = {}
    for repository, store in stores.items():
        writer = RepositoryWriter(store, name=repository)
        writer.initialise(
            root_signers=[generate_key()],
            root_threshold=1,
            role_signers={r: generate_key() for r in ("targets", "snapshot", "timestamp")},
            bins_bit_length=1 if repository == "director" else None,
        )
        writers[repository] = writer
    catalogue, director = Catalogue(writers["catalogue"]), Director(writers["director"])
    fetcher = MemoryFetcher()
    fetcher.mount("https://catalogue.bench", stores["catalogue"])
    fetcher.mount("https://director.bench", stores["director"])
    edge = int8_tensors(rng, TENSORS, each)
    cloud = int8_tensors(rng, TENSORS, max(1, each // 4))
    with tempfile.TemporaryDirectory(prefix="fogline-bench-delta-") as tmp:
        root = Path(tmp)
        roots = {r: s.read("metadata/1.root.json") or b"" for r, s in stores.items()}
        enroll(root / "site", roots["catalogue"], roots["director"], "bench-site", "eu")
        site = SiteSync(
            root / "site",
            catalogue_url="https://catalogue.bench",
            director_url="https://director.bench",
            agent_version="0.1.0",
            onnxruntime="1.32.0",
            fetcher=fetcher,
        )

        def release(version: int) -> tuple[float, float, Any]:
            bundle = _bundle(
                root / f"bundle-{version}", int8_model(edge), int8_model(cloud, "cloud")
            )
            start = time.perf_counter()
            released = catalogue.publish(
                bundle,
                name="bench",
                version=str(version),
                platform=Platform("1.20"),
                regions=("eu",),
                min_agent_version="0.1",
            )
            built = time.perf_counter() - start
            director.assign(["bench-site"], released)
            start = time.perf_counter()
            got = site.update()
            applied = time.perf_counter() - start
            if got is None:
                raise RuntimeError("the site found nothing to install")
            site.record_installed(got)
            return built, applied, got

        release(1)
        result: dict[str, Any] = {
            "edge_bytes": len(int8_model(edge)),
            "tensors": TENSORS,
            "cases": {},
        }
        for version, case in enumerate(("replace", "finetune", "cloud_only"), start=2):
            before = int8_model(edge)
            if case == "replace":
                edge = replace_tensors(edge, (3, 13, 23, 33), rng)
            elif case == "finetune":
                edge = fine_tune(edge, 0.10, rng)
            else:
                cloud = fine_tune(cloud, 0.10, rng)
            built, applied, got = release(version)
            result["cases"][case] = {
                "bytes_full": got.bytes_full,
                "bytes_transferred": got.bytes_transferred,
                "ratio": round(got.bytes_transferred / got.bytes_full, 4),
                "model_bytes": got.bytes_transferred - got.release.length,
                "build_s": round(built, 3),
                "apply_s": round(applied, 3),
            }
            if generic and case != "cloud_only":
                from fogline.compression._delta import _patch_delta

                start = time.perf_counter()
                patch = _patch_delta(before, int8_model(edge))
                result["cases"][case]["generic_patch"] = {
                    "bytes": len(patch),
                    "ratio": round(len(patch) / len(before), 4),
                    "build_s": round(time.perf_counter() - start, 3),
                }
        result["delta_failures"] = site.delta_failures
    return result


def bench_delta(
    mib: float = typer.Option(20.0, min=0.01, max=1024.0, help="Size of the edge part in MiB."),
    seed: int = typer.Option(0, help="Seed of the synthetic weights."),
    generic: bool = typer.Option(
        False, "--generic", help="Also make the generic zstd patch of each edge change (slow)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Bytes a site downloads for three kinds of bundle change, through a real signed
    catalogue and director in memory: tensors replaced, a fine-tune, a cloud-only change."""
    from fogline._bench import _emit

    _emit(run(mib, seed, generic=generic), as_json, "Bundle deltas")
