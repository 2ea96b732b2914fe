"""Prometheus metrics for the gateway, read from the router's and ZAP handler's plain counters at
scrape time, so the forwarding loop never calls into prometheus_client."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.errors import GatewayError
from gateway.router import Router
from gateway.sessions import SessionTable


class _Observed(Protocol):
    """What the collector reads: the running gateway's ZAP handler, router (L7 only), table."""

    table: SessionTable

    @property
    def router(self) -> Router | None: ...

    def auth_decisions(self) -> dict[tuple[str, str], int]: ...

    def spool_files(self) -> dict[str, int]: ...

    def connections(self) -> dict[str, int]: ...

    def backpressure(self) -> dict[str, tuple[int, float, float]]: ...

    def thread_cpu(self) -> dict[str, float]: ...


class GatewayCollector(Collector):
    """dsn_gateway_* metrics for one gateway."""

    def __init__(self, gateway: _Observed) -> None:
        self._gateway = gateway

    def collect(self) -> Iterator[Metric]:
        yield self._auth()
        yield self._connections()
        yield self._consumers()
        yield self._thread_cpu()
        router = self._gateway.router
        if router is not None:
            yield from self._routing(router)
            yield self._spool_files()
            yield from self._backpressure()

    def _auth(self) -> Metric:
        family = CounterMetricFamily("dsn_gateway_auth_decisions",
                                     "Ingress connection decisions (ZAP and handshake)",
                                     labels=["decision", "reason"])
        for (decision, reason), count in self._gateway.auth_decisions().items():
            family.add_metric([decision, reason], count)
        return family

    def _connections(self) -> Metric:
        family = CounterMetricFamily("dsn_gateway_connections",
                                     "Ingress TCP connections accepted and closed (a connection "
                                     "accepted that never reached a handshake decision is junk)",
                                     labels=["event"])
        for event, count in self._gateway.connections().items():
            family.add_metric([event], count)
        return family

    def _backpressure(self) -> Iterator[Metric]:
        waits = CounterMetricFamily("dsn_gateway_backpressure_waits",
                                    "Sends that waited for a consumer (its queue was full)",
                                    labels=["session"])
        seconds = CounterMetricFamily("dsn_gateway_backpressure_seconds",
                                      "Seconds the forwarding loop waited for consumers",
                                      labels=["session"])
        now = GaugeMetricFamily("dsn_gateway_backpressure_waiting_seconds",
                                "How long the send waiting for a consumer now has waited (0: "
                                "none is)", labels=["session"])
        for session, (count, waited, waiting) in self._gateway.backpressure().items():
            waits.add_metric([session], count)
            seconds.add_metric([session], waited)
            now.add_metric([session], waiting)
        yield from (waits, seconds, now)

    def _thread_cpu(self) -> Metric:
        family = CounterMetricFamily("dsn_gateway_thread_cpu_seconds",
                                     "CPU seconds of the forwarding loop (one thread) and of "
                                     "libzmq's I/O threads", labels=["thread"])
        for thread, seconds in self._gateway.thread_cpu().items():
            family.add_metric([thread], seconds)
        return family

    def _consumers(self) -> Metric:
        family = GaugeMetricFamily("dsn_gateway_consumers", "Consumer endpoints per session",
                                   labels=["session"])
        for entry in self._gateway.table:
            family.add_metric([entry.id], len(entry.session.consumers))
        return family

    @staticmethod
    def _routing(router: Router) -> Iterator[Metric]:
        messages = CounterMetricFamily("dsn_gateway_messages", "Data messages forwarded",
                                       labels=["session"])
        volume = CounterMetricFamily("dsn_gateway_bytes", "Payload bytes forwarded",
                                     labels=["session"])
        spooled = CounterMetricFamily("dsn_gateway_spooled_messages",
                                      "Data messages written to spool files", labels=["session"])
        spooled_bytes = CounterMetricFamily("dsn_gateway_spooled_bytes",
                                            "Payload bytes written to spool files",
                                            labels=["session"])
        scans = GaugeMetricFamily("dsn_gateway_scans_open", "Open scans", labels=["session"])
        connected = GaugeMetricFamily("dsn_gateway_consumers_connected",
                                      "Consumers whose connection is up (new scans are spooled "
                                      "while one that was up is down)", labels=["session"])
        interrupted = CounterMetricFamily("dsn_gateway_scans_interrupted",
                                          "Scans a consumer left mid-scan (rest spooled, reported)",
                                          labels=["session"])
        idle = CounterMetricFamily("dsn_gateway_scans_idle_closed",
                                   "Scans closed after limits.scan_idle_s without a message",
                                   labels=["session"])
        for stats in router.stats():
            messages.add_metric([stats.session], stats.messages)
            volume.add_metric([stats.session], stats.bytes)
            spooled.add_metric([stats.session], stats.spooled)
            spooled_bytes.add_metric([stats.session], stats.spooled_bytes)
            interrupted.add_metric([stats.session], stats.interrupted)
            idle.add_metric([stats.session], stats.idle_closed)
            if stats.live:  # an ended session's totals stay; its gauges go with it
                scans.add_metric([stats.session], stats.open_scans)
                connected.add_metric([stats.session], stats.connected)
        drops = CounterMetricFamily("dsn_gateway_drops", "Messages dropped, by reason",
                                    labels=["session", "reason"])
        for (session, reason), count in router.drops.copy().items():
            drops.add_metric([session, reason], count)
        yield from (messages, volume, spooled, spooled_bytes, scans, connected, interrupted, idle,
                    drops)

    def _spool_files(self) -> Metric:
        family = CounterMetricFamily("dsn_gateway_spool_files",
                                     "Spool files published (complete scans)", labels=["session"])
        for session, count in self._gateway.spool_files().items():
            family.add_metric([session], count)
        return family


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65_535:
        raise GatewayError(f"metrics address {address!r} is not HOST:PORT")
    return host, int(port)


def serve_metrics(address: str, gateway: _Observed) -> WSGIServer:
    """Serve /metrics for ``gateway`` at ``address`` (HOST:PORT) from a daemon thread."""
    host, port = parse_address(address)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GatewayCollector(gateway))
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise GatewayError(f"metrics: cannot listen on {address}: {exc.strerror}") from None
    return server
