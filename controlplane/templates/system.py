"""System values: what the control plane supplies to a template (session id, keys, endpoints,
paths, the consumer command), never chosen by the user directly, yet validated like user values:
typed, bounded, free of control characters, consumer endpoints inside the policy's targets.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    AwareDatetime,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
)

from common.config import BindEndpoint, ConnectEndpoint, CurveKey, SessionId, parse_endpoint
from controlplane.policy import PolicySet
from controlplane.templates.base import Kind, Strict, field_errors, invalid, show

_URL = re.compile(r"^https?://[A-Za-z0-9.\-]+(:[0-9]{1,5})?(/[A-Za-z0-9._~/-]*)?$"
                  r"|^https?://\[[0-9a-fA-F:.]+\](:[0-9]{1,5})?(/[A-Za-z0-9._~/-]*)?$")
_ONE_URL = (r"https?://(?:[A-Za-z0-9.\-]+|\[[0-9a-fA-F:.]+\])(?::[0-9]{1,5})?"
            r"(?:/[A-Za-z0-9._~/-]*)?")
# The replicas' URLs as DSN_CONTROLPLANE_URL and --controlplane take them: comma-separated.
_URLS = re.compile(rf"^{_ONE_URL}(?:,{_ONE_URL})*$")


def _printable(value: str) -> str:
    if not value.isprintable():
        raise ValueError("contains a newline or control character")
    return value


def _absolute(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError(f"{show(value)} is not an absolute path")
    return _printable(value)


Argument = Annotated[StrictStr, Field(min_length=1, max_length=1024), AfterValidator(_printable)]
AbsolutePath = Annotated[StrictStr, Field(max_length=1024), AfterValidator(_absolute)]


class DSNSystem(Strict):
    """What the control plane supplies to a DSN template: never chosen by the user directly."""

    session_id: SessionId
    client_key: CurveKey
    expires_at: AwareDatetime
    ingress: BindEndpoint
    server_secret_key_file: AbsolutePath
    consumers: list[ConnectEndpoint] = Field(default_factory=list, max_length=4096)


class JobSystem(Strict):
    """What the control plane supplies to a job template."""

    session_id: SessionId
    job_id: StrictStr = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
    ranks: StrictInt = Field(ge=1, le=4096)
    config_path: AbsolutePath
    output_dir: AbsolutePath
    token_file: AbsolutePath
    controlplane_url: StrictStr = Field(pattern=_URL.pattern, max_length=1024)
    # Every replica's URL, this one's first; the same as controlplane_url with one replica.
    controlplane_urls: StrictStr = Field(pattern=_URLS.pattern, max_length=16 * 1024)
    consumer_command: list[Argument] = Field(min_length=1, max_length=16)
    mpiexec: list[Argument] = Field(default_factory=lambda: ["mpiexec"], min_length=1,
                                    max_length=16)


System = DSNSystem | JobSystem
SYSTEM_MODELS: dict[str, type[DSNSystem | JobSystem]] = {"dsn": DSNSystem, "job": JobSystem}


def validate_system(kind: Kind, values: Mapping[str, Any], policy: PolicySet) -> System:
    """The control plane's values for a template of ``kind``, checked like user values: consumer
    endpoints must lie inside the policy's targets."""
    try:
        system = SYSTEM_MODELS[kind].model_validate(dict(values))
    except ValidationError as exc:
        raise invalid("invalid system values", field_errors(exc, "system")) from None
    if isinstance(system, DSNSystem):
        outside = [c for c in system.consumers if not policy.target_allowed(parse_endpoint(c)[0])]
        if outside:
            raise invalid("invalid system values", [
                {"field": "system.consumers",
                 "message": f"{', '.join(outside)} outside the targets the policy allows"}])
    return system


_SAMPLE_KEY = "0" * 40  # a valid Z85 key (32 zero bytes): dry runs need one, and never connect


def sample_system(kind: Kind) -> dict[str, Any]:
    """Sample system values for a dry run of a template of ``kind``."""
    if kind == "dsn":
        return {"session_id": "dry-run", "client_key": _SAMPLE_KEY,
                "expires_at": datetime(2030, 1, 1, tzinfo=UTC), "ingress": "tcp://*:5555",
                "server_secret_key_file": "/var/lib/dsn/keys/gateway.key_secret",
                "consumers": []}
    return {"session_id": "dry-run", "job_id": "dry-run", "ranks": 2,
            "config_path": "/var/lib/dsn/dry-run.yaml",
            "output_dir": "/var/lib/dsn/output", "token_file": "/var/lib/dsn/consumer.token",
            "controlplane_url": "http://127.0.0.1:8750",
            "controlplane_urls": "http://127.0.0.1:8750",
            "consumer_command": ["/usr/bin/python3", "-m", "dataplane.consumer"]}
