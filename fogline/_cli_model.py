"""``fogline model``: split a model into edge and cloud parts, quantize it, build the reference.

onnx, onnxruntime and torch are imported inside the commands so ``fogline --help`` stays
fast and an edge-only install can still run the rest of the CLI.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Mapping
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fogline._cli import fail
from fogline.compression.errors import ModelError, QuantizationError, SplitError

if TYPE_CHECKING:
    from fogline.compression._quantize import QuantizationReport
    from fogline.compression._split import SplitReport

__all__ = ["app"]

app = typer.Typer(no_args_is_help=True)

PROOF_FAILED = 1
TARGET_MISSED = 1


class MetricChoice(StrEnum):
    auto = "auto"
    top1 = "top1"
    cosine = "cosine"


@contextlib.contextmanager
def _errors_to_exit() -> Iterator[None]:
    """Bad input → ``error: …`` and exit 2; an unmet accuracy target → exit 1. No traceback."""
    try:
        yield
    except QuantizationError as exc:
        fail(str(exc), code=TARGET_MISSED)
    except (ModelError, SplitError, ValueError, TypeError) as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": "))


def _jsonable(value: Any) -> Any:
    """NaN and infinities become ``null`` so the output is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _print_json(data: Mapping[str, Any]) -> None:
    typer.echo(json.dumps(_jsonable(data), indent=2))


def _num(value: float | str | None, spec: str = ".3g") -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    return format(value, spec) if math.isfinite(value) else str(value)


# ------------------------------------------------------------------------------ split


@app.command("split", short_help="Cut a model into edge and cloud parts, proven.")
def split(
    model: Annotated[
        Path, typer.Argument(metavar="MODEL", help="ONNX model to cut.", show_default=False)
    ],
    *,
    at: Annotated[
        list[str],
        typer.Option(
            "--at",
            metavar="<tensor>",
            help="Tensor to cut at (repeat for several).",
            show_default=False,
        ),
    ],
    out_dir: Annotated[
        Path,
        typer.Option("-o", "--out", help="Directory for edge.onnx, cloud.onnx, split.json."),
    ],
    inputs: Annotated[
        Path | None,
        typer.Option("--inputs", help="Sample inputs (.npz keyed by input name) for the proof."),
    ] = None,
    rtol: Annotated[float, typer.Option(help="Relative tolerance of the proof.")] = 1e-4,
    atol: Annotated[float, typer.Option(help="Absolute tolerance of the proof.")] = 1e-5,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Cut MODEL into an edge part and a cloud part at the named tensors and prove the cut.

    Exits 0 when edge → cloud reproduces every output, 1 when the proof fails, 2 on bad input.
    """
    with _errors_to_exit():
        from fogline.compression._onnx_util import load_samples
        from fogline.compression._split import split_model

        samples = load_samples(inputs) if inputs is not None else None
        report = split_model(model, at, out_dir, inputs=samples, rtol=rtol, atol=atol)
    if as_json:
        _print_json(report.to_dict())
    else:
        _show_split(report)
    if not report.passed:
        raise typer.Exit(PROOF_FAILED)


def _show_split(report: SplitReport) -> None:
    console = Console()
    cut = Table(title="tensors crossing the cut", title_justify="left")
    for column in ("tensor", "why", "dtype", "shape"):
        cut.add_column(column, overflow="fold")
    why = {"cut": "asked for", "input": "input used after the cut", "skip": "skip connection"}
    for b in report.boundary:
        shape = "?" if b.spec.shape is None else "[" + ", ".join(map(str, b.spec.shape)) + "]"
        name = b.name if b.name == b.source else f"{b.name} (= {b.source})"
        cut.add_row(escape(name), why[b.origin], b.spec.dtype, escape(shape))
    console.print(cut)

    proof = Table(title=f"proof (rtol {report.rtol:g}, atol {report.atol:g})", title_justify="left")
    for column in ("inputs", "output", "part", "max abs err", "max rel err", "result"):
        proof.add_column(column, justify="right" if "err" in column else "left", overflow="fold")
    for case in report.cases:
        if not case.checks:
            style = "yellow" if case.status == "skipped" else "red"
            proof.add_row(
                case.name, "—", "—", "—", "—", f"[{style}]{case.status}: {escape(case.detail)}"
            )
        for check in case.checks:
            verdict = (
                "[green]ok" if check.passed else f"[red]differs {escape(check.detail)}".rstrip()
            )
            proof.add_row(
                case.name,
                escape(check.output),
                check.part,
                _num(check.max_abs_error),
                _num(check.max_rel_error),
                verdict,
            )
    console.print(proof)
    console.print(
        escape(
            f"edge: {report.edge_model} ({report.edge_nodes} nodes)   "
            f"cloud: {report.cloud_model} ({report.cloud_nodes} nodes)"
        )
    )
    if report.passed:
        console.print("[green]proven:[/] edge → cloud reproduces every output")
    else:
        console.print("[red]not proven:[/] edge → cloud does not reproduce the original")


# --------------------------------------------------------------------------- quantize


@app.command("quantize", short_help="INT8 quantization guided by agreement with FP32.")
def quantize(
    *,
    model: Annotated[
        Path,
        typer.Argument(metavar="MODEL", help="FP32 ONNX model (an edge part).", show_default=False),
    ],
    calibration: Annotated[
        Path,
        typer.Option(
            "--calibration",
            help="Samples (.npz keyed by input name, samples along the first axis).",
            show_default=False,
        ),
    ],
    output: Annotated[
        Path,
        typer.Option("-o", "--output", help="Where to write the INT8 model.", show_default=False),
    ],
    target: Annotated[
        float | None,
        typer.Option(
            help="Agreement every output must reach (default: 0.99 for top-1, 0.98 for cosine)."
        ),
    ] = None,
    metric: Annotated[
        MetricChoice, typer.Option(help="How to compare outputs with FP32.")
    ] = MetricChoice.auto,
    measure: Annotated[
        list[str] | None,
        typer.Option(
            "--measure",
            metavar="<output>",
            help="Output to compare (repeat; default: all float outputs).",
        ),
    ] = None,
    holdout: Annotated[
        float, typer.Option(help="Share of the samples held out to measure agreement.")
    ] = 0.25,
    reduce_range: Annotated[
        bool | None,
        typer.Option(
            "--reduce-range/--full-range",
            help=(
                "7-bit weights, which x86 CPUs without VNNI run without saturating, or 8-bit "
                "(default: 7-bit where this CPU lacks VNNI)."
            ),
            show_default=False,
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Quantize MODEL to INT8: the fastest strategy whose outputs agree with FP32.

    Exits 0 with a model that meets the target, 1 when no strategy does, 2 on bad input.
    """
    status_console = Console(stderr=True)
    with _errors_to_exit(), status_console.status("loading", spinner="dots") as status:
        from fogline.compression._onnx_util import load_samples
        from fogline.compression._quantize import quantize_model

        samples = load_samples(calibration)
        report = quantize_model(
            model,
            samples,
            output,
            target=target,
            metric=metric.value,
            outputs=measure or None,
            holdout_fraction=holdout,
            progress=status.update,
            reduce_range=reduce_range,
        )
    for warning in report.warnings:
        # what about the calibration set deserves a look: said whatever the output format
        status_console.print(f"[bold yellow]warning:[/] {escape(warning)}")
    if report.speedup < 1.0:
        # Small or memory-bound models can run slower in INT8: the target was met, but the
        # FP32 model may be the better one to deploy.
        status_console.print(
            f"[yellow]warning:[/] the chosen INT8 model runs at {report.speedup:.2f}× the FP32 "
            "model's speed on this machine; the FP32 model may serve better"
        )
    if as_json:
        _print_json(report.to_dict())
    else:
        _show_quantize(report)


def _show_quantize(report: QuantizationReport) -> None:
    console = Console()
    summary = Table(
        title=escape(f"INT8 model: {report.output}"), title_justify="left", show_header=False
    )
    summary.add_column("what")
    summary.add_column("value")
    summary.add_row("strategy", escape(f"{report.strategy} — {report.description}"))
    summary.add_row(
        "size",
        f"{report.int8_bytes:,} B vs {report.fp32_bytes:,} B FP32 (ratio {report.size_ratio:.2f})",
    )
    summary.add_row(
        "speed",
        f"{report.speedup:.2f}× FP32 ({report.int8_latency_ms:.3f} ms vs "
        f"{report.fp32_latency_ms:.3f} ms per batch, 1 thread)",
    )
    for o in report.outputs:
        summary.add_row(
            escape(f"agreement {o.output}"),
            f"{o.metric} {o.agreement:.4f} (target {o.target:.10g})",
        )
    summary.add_row(
        "samples", f"{report.calibration_samples} calibration, {report.holdout_samples} held out"
    )
    console.print(summary)

    candidates = Table(title="strategies tried", title_justify="left")
    for column in ("strategy", "agreement", "latency ms", "speedup", "accepted"):
        candidates.add_column(
            column, justify="left" if column == "strategy" else "right", overflow="fold"
        )
    for c in report.candidates:
        chosen = c.strategy == report.strategy
        accepted = "[red]failed" if c.error else ("[green]yes" if c.accepted else "no")
        candidates.add_row(
            f"[bold]{c.strategy}[/]" if chosen else c.strategy,
            _num(c.agreement, ".4f"),
            _num(c.latency_ms, ".3f"),
            _num(c.speedup, ".2f") + ("×" if c.speedup is not None else ""),
            accepted + (" (chosen)" if chosen else ""),
        )
    console.print(candidates)


# -------------------------------------------------------------------- build-reference


@app.command("build-reference", short_help="Rebuild the shipped reference bundle.")
def build_reference(
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "-o", "--out", help="Bundle directory (default: the packaged reference bundle)."
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for data, training and calibration.")] = 0,
    quick: Annotated[
        bool, typer.Option("--quick", help="A small, fast build (for tests; not for use).")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Train, export, split and quantize the reference model; write its bundle."""
    from fogline.reference import BUNDLE_DIR

    target_dir = out_dir if out_dir is not None else BUNDLE_DIR
    try:
        from fogline.reference._build import build_reference as build
    except ImportError as exc:
        fail(
            f"building the reference model needs the 'tools' extra "
            f"(pip install 'fogline[tools]'): {exc}"
        )
    status_console = Console(stderr=True)
    with _errors_to_exit(), status_console.status("building the reference model") as status:
        summary = build(target_dir, seed=seed, quick=quick, progress=status.update)
    if as_json:
        _print_json(summary)
        return
    table = Table(
        title=escape(f"reference bundle: {target_dir}"), title_justify="left", show_header=False
    )
    table.add_column("what")
    table.add_column("value")
    for key, value in _flatten(summary):
        table.add_row(escape(key), escape(value))
    Console().print(table)


def _flatten(data: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    """Dotted keys with printable values; long lists are shown as JSON."""
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from _flatten(value, name + ".")
        elif isinstance(value, float):
            yield name, f"{value:.4g}"
        elif isinstance(value, list | tuple):
            yield name, json.dumps(_jsonable(value))
        else:
            yield name, str(value)
