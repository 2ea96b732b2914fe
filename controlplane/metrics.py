"""Prometheus metrics of the control plane, in a registry owned by one app (so two apps in one
process, as in the tests, never collide). Label values are route templates, actions and stable
reason labels, never raw paths or token contents, so their number stays bounded."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)


@dataclass(frozen=True)
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    requests: Counter = field(init=False)
    latency: Histogram = field(init=False)
    decisions: Counter = field(init=False)
    tokens_issued: Counter = field(init=False)
    live_sessions: Gauge = field(init=False)
    live_consumers: Gauge = field(init=False)
    gateway_reports: Counter = field(init=False)
    audit_checkpoint: Gauge = field(init=False)
    audit_checkpoint_failures: Counter = field(init=False)
    leader: Gauge = field(init=False)

    def __post_init__(self) -> None:
        def set_(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        set_("requests", Counter("dsn_cp_http_requests", "HTTP requests served",
                                 ["method", "route", "status"], registry=self.registry))
        set_("latency", Histogram("dsn_cp_http_request_seconds", "HTTP request latency",
                                  ["route"], registry=self.registry))
        set_("decisions", Counter("dsn_cp_authz_decisions",
                                  "Authorization decisions (token checks, rate limits, policy)",
                                  ["action", "decision", "reason"], registry=self.registry))
        set_("tokens_issued", Counter("dsn_cp_tokens_issued", "Tokens signed, by kind",
                                      ["kind"], registry=self.registry))
        set_("live_sessions", Gauge("dsn_cp_live_sessions",
                                    "Sessions published to the gateways", registry=self.registry))
        set_("live_consumers", Gauge("dsn_cp_live_consumers",
                                     "Consumer ranks with a live lease, "
                                     "over all published sessions",
                                     registry=self.registry))
        set_("gateway_reports", Counter("dsn_cp_gateway_scan_reports",
                                        "Interrupted-scan reports from gateways, by outcome",
                                        ["outcome"], registry=self.registry))
        set_("audit_checkpoint", Gauge("dsn_cp_audit_checkpoint_seq",
                                       "The audit record the last signed checkpoint covers",
                                       registry=self.registry))
        set_("audit_checkpoint_failures", Counter("dsn_cp_audit_checkpoint_failures",
                                                  "Audit checkpoints that could not be written",
                                                  registry=self.registry))
        set_("leader", Gauge("dsn_cp_leader", "1 while this replica runs the run-once duties",
                             registry=self.registry))

    def exposition(self) -> tuple[bytes, str]:
        """The text exposition format and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
