"""Registered gateways and the placement of sessions on them.

A gateway announces itself over the state service (``common.clone`` REGISTER): where producers
reach it, its CURVE server key and how many sessions it takes. Its name is the allow-list file
that admitted its key (``STATE_DIR/gateways/NAME.key``). Each announcement is stored (table
``gateways``) with the time it arrived, so a restarted or second control plane knows the gateways
at once and a gateway's heartbeat is the announcement itself: a gateway is live while its last one
is younger than ``gateway_timeout_s``.

Placement rule (``choose``), in order:

1. the live gateways (other than the one a session is moved off); none: no placement (the caller
   falls back to the configured gateway, or refuses);
2. of these, the ones the policy lets the session's project use (section ``gateways``); none:
   refused (``Unavailable``), never placed elsewhere;
3. of these, for a plaintext session, the ones with a plaintext ingress; none: refused;
4. of these, the ones below ``capacity`` open sessions; none: refused;
5. the least loaded of these, open sessions relative to capacity, ties broken by name.

A session whose scans are split over several gateways (``lanes``) takes one gateway per lane,
all different, each chosen by this rule among the gateways not chosen yet (``choose_lanes``); a
lane counts as a session on its gateway. Fewer gateways that can take it than lanes: refused.

The choice of a new session runs inside the transaction that stores it, so concurrent opens count
each other.
"""

from __future__ import annotations

import binascii
import json
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from zmq.utils import z85

from common.clone import Registration
from common.config import parse_endpoint
from controlplane.errors import Unavailable
from controlplane.policy import GatewayAllowance
from controlplane.store.engine import Conn, Store


@dataclass(frozen=True)
class GatewayRecord:
    name: str
    endpoint: str
    receipts_endpoint: str
    plain_endpoint: str | None
    server_key: str
    capacity: int
    registered_at: float
    last_seen: float

    def live(self, now: float, timeout_s: float) -> bool:
        return self.last_seen > now - timeout_s


def registration_problem(registration: Registration, authenticated_key: str) -> str | None:
    """Why a registration is refused, or None. The key producers are handed must be the one the
    gateway authenticated with: its identity and its ingress's server key are one key pair."""
    endpoints = {"endpoint": registration.endpoint,
                 "receipts_endpoint": registration.receipts_endpoint,
                 "plain_endpoint": registration.plain_endpoint}
    for field, endpoint in endpoints.items():
        if endpoint is None:
            continue
        try:
            parse_endpoint(endpoint)
        except ValueError as exc:
            return f"{field}: {exc}"
    try:
        valid_key = len(z85.decode(registration.server_key)) == 32
    except (ValueError, KeyError, binascii.Error):
        valid_key = False
    if not valid_key:
        return "server_key: not a Z85 CURVE public key"
    if registration.server_key != authenticated_key:
        return "server_key: not the key this gateway authenticated with"
    return None


async def register(store: Store, name: str, registration: Registration, now: float) -> bool:
    """Store (or refresh) gateway ``name``'s announcement, seen at ``now``; True if it is new or
    says something new (a heartbeat repeats the last one)."""
    async def body(conn: Conn) -> bool:
        async with conn.execute("SELECT endpoint, receipts_endpoint, plain_endpoint, server_key, "
                                "capacity FROM gateways WHERE name = ?", (name,)) as cursor:
            before = await cursor.fetchone()
        await conn.execute(
            "INSERT INTO gateways (name, endpoint, receipts_endpoint, plain_endpoint, server_key, "
            "capacity, registered_at, last_seen) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (name) DO UPDATE SET endpoint = excluded.endpoint, "
            "receipts_endpoint = excluded.receipts_endpoint, "
            "plain_endpoint = excluded.plain_endpoint, server_key = excluded.server_key, "
            "capacity = excluded.capacity, last_seen = excluded.last_seen",
            (name, registration.endpoint, registration.receipts_endpoint,
             registration.plain_endpoint, registration.server_key, registration.capacity, now,
             now))
        announced = (registration.endpoint, registration.receipts_endpoint,
                     registration.plain_endpoint, registration.server_key, registration.capacity)
        return before is None or tuple(before) != announced
    return await store.write(body)


def _gateway(row: Any) -> GatewayRecord:
    return GatewayRecord(**{name: row[name] for name in GatewayRecord.__dataclass_fields__})


async def gateways(store: Store) -> dict[str, GatewayRecord]:
    """Every gateway that ever registered, by name."""
    rows = await store.read("SELECT * FROM gateways ORDER BY name", ())
    return {row["name"]: _gateway(row) for row in rows}


@dataclass(frozen=True)
class Load:
    gateway: GatewayRecord
    sessions: int  # lanes of open sessions placed on it

    @property
    def share(self) -> Fraction:
        return Fraction(self.sessions, self.gateway.capacity)


_GATEWAYS = "SELECT * FROM gateways ORDER BY name"
_PLACED = ("SELECT gateway, lane_gateways FROM sessions WHERE gateway IS NOT NULL AND "
           "ended_at IS NULL AND expires_at > ?")


def _loads(gateways: Iterable[Any], placed: Iterable[Any]) -> list[Load]:
    # A lane is a session to the gateway that carries it: it serves the session's producers
    # and connects to its consumers.
    counts = Counter(name for row in placed
                     for name in (row["gateway"], *json.loads(row["lane_gateways"])))
    return [Load(record, counts[record.name]) for record in map(_gateway, gateways)]


async def loads_in(conn: Conn, now: float) -> list[Load]:
    """Every registered gateway with its open sessions' lanes, inside the caller's
    transaction."""
    async with conn.execute(_GATEWAYS, ()) as cursor:
        gateways = await cursor.fetchall()
    async with conn.execute(_PLACED, (now,)) as cursor:
        placed = await cursor.fetchall()
    return _loads(gateways, placed)


async def loads(store: Store, now: float) -> list[Load]:
    """Every registered gateway with its open sessions' lanes, as committed."""
    return _loads(await store.read(_GATEWAYS, ()), await store.read(_PLACED, (now,)))


def choose(loads: Sequence[Load], now: float, timeout_s: float, allowance: GatewayAllowance,
           *, plain: bool, exclude: Collection[str] = ()) -> GatewayRecord | None:
    """The placement rule (module doc) over ``loads`` for a session of ``allowance.project``:
    None when no gateway (other than those of ``exclude``) is live, ``Unavailable`` when live ones
    are but none can take the session."""
    live = [load for load in loads
            if load.gateway.live(now, timeout_s) and load.gateway.name not in exclude]
    if not live:
        return None
    project = allowance.project
    allowed = [load for load in live if allowance.allows(load.gateway.name)]
    if not allowed:
        raise Unavailable(f"no gateway project {project!r} may use is live: the policy allows it "
                          f"{allowance}")
    if plain:
        allowed = [load for load in allowed if load.gateway.plain_endpoint]
        if not allowed:
            raise Unavailable(f"no live gateway project {project!r} may use has a plaintext "
                              "ingress")
    room = [load for load in allowed if load.sessions < load.gateway.capacity]
    if not room:
        raise Unavailable(f"every live gateway project {project!r} may use is at its capacity "
                          f"({len(allowed)}: {', '.join(load.gateway.name for load in allowed)}); "
                          "end a session or add a gateway")
    return min(room, key=lambda load: (load.share, load.gateway.name)).gateway


def choose_lanes(loads: Sequence[Load], now: float, timeout_s: float,
                 allowance: GatewayAllowance, *, plain: bool,
                 lanes: int) -> list[GatewayRecord] | None:
    """``lanes`` different gateways for a session's lanes, lane by lane (``choose``, each among
    those not chosen yet): None when no gateway is live, ``Unavailable`` when fewer than
    ``lanes`` can take the session."""
    chosen: list[GatewayRecord] = []
    for _ in range(lanes):
        try:
            record = choose(loads, now, timeout_s, allowance, plain=plain,
                            exclude={gateway.name for gateway in chosen})
        except Unavailable:
            if not chosen:
                raise
            record = None
        if record is None and chosen:
            raise Unavailable(
                f"a session of {lanes} lanes needs {lanes} gateways project "
                f"{allowance.project!r} may use, live and with room; {len(chosen)} can take it "
                f"({', '.join(gateway.name for gateway in chosen)})")
        if record is None:
            return None
        chosen.append(record)
    return chosen
