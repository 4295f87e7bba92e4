"""What the supervisors report through the edge's and the cloud's own doors: a Prometheus
counter of thread failures read from the supervisors' counts, and the HTTP server's
supervisor (an ASGI middleware). Both sides serve metrics and HTTP the same way, and this
is the one package both import (see :mod:`fogline.messaging._supervisor`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["ContainedHttp", "ThreadFailures"]


class ThreadFailures(Collector):
    """A counter by thread kind read from the supervisors' own counts when scraped (they
    also count what the MQTT connection counts); every kind in ``kinds`` is reported, 0
    included, so an alert on the series has something to watch from the start."""

    def __init__(self, name: str, documentation: str, kinds: Sequence[str]) -> None:
        self._name = name
        self._doc = documentation
        self._kinds = tuple(kinds)
        self._sources: list[Callable[[], Mapping[str, int]]] = []

    def add(self, counts: Callable[[], Mapping[str, int]]) -> None:
        """Report ``counts()`` (failures by kind) too, summed with the other sources."""
        self._sources.append(counts)

    def totals(self) -> dict[str, int]:
        out = dict.fromkeys(self._kinds, 0)
        for source in list(self._sources):
            for kind, n in source().items():
                out[kind] = out.get(kind, 0) + n
        return out

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(self._name, self._doc, labels=["thread"])
        for kind, n in self.totals().items():
            family.add_metric([kind], float(n))
        yield family

    def describe(self) -> Iterable[Metric]:
        yield CounterMetricFamily(self._name, self._doc, labels=["thread"])


class ContainedHttp:
    """ASGI middleware, the HTTP server's supervisor: a request whose handler raised
    something no handler maps is answered 500 by ``answer(exc)`` (each side's own error
    body), and the failure is logged with its route and counted (``on_error(route, exc)``);
    the server serves the next one. Pure ASGI rather than ``BaseHTTPMiddleware``: it adds
    no task or queue per request."""

    def __init__(
        self,
        app: ASGIApp,
        on_error: Callable[[str, BaseException], None],
        answer: Callable[[BaseException], Callable[[Scope, Receive, Send], Awaitable[Any]]],
    ) -> None:
        self.app = app
        self.on_error = on_error
        self.answer = answer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception as exc:  # noqa: BLE001 - the HTTP server's supervisor
            self.on_error(f"{scope.get('method', '?')} {scope.get('path', '?')}", exc)
            if started:  # the answer is on its way: nothing else can be said
                return
            await self.answer(exc)(scope, receive, send)
