"""The gateway's account of a scan, and the receipts producers ask it for.

When the gateway closes a scan (its last producer sent ``scan_end``, it went idle, or its session
ended) it writes a ``GatewayReport``: what the producers said they sent, what it accepted (forwarded
to consumers, or spooled), what it dropped, by reason and one by one, and where the spool is. The
control plane records the reports of scans a consumer will not report (spooled or interrupted ones;
``common.clone`` carries them), and any producer of the session may ask for a scan's report.

Receipts socket: a ROUTER at ``gateway.receipts``, a CURVE server with the gateway's key in the
same ZAP domain as the ingress, so exactly the producers the ingress admits may ask, each only about
its own session (the ZAP ``User-Id``). Every message is one MessagePack map (a DEALER sends it as
one frame; the ROUTER adds and strips the peer's identity):

    request  {v: 1, type: "receipt_request", scan}
    answer   {v: 1, type: "receipt", scan, state, report, refused}
             ``state``: "open" (the scan is still going on; ``report`` is nil), "closed" (``report``
             is its GatewayReport), or "unknown" (no such scan open or recently closed; nil);
             ``refused``: the drop reason of the scan's latest refused scan_begin ("" if none),
             e.g. "scan_closed" for a scan number the session has used already
"""

from __future__ import annotations

from typing import Annotated, Final, Literal, TypeVar

import msgspec

from common.errors import DsnError
from common.protocol import (
    MAX_MANIFEST,
    U32,
    U63,
    Lane,
    Lanes,
    ReasonLabel,
    SectorIndex,
    SessionId,
)

MAX_SPOOL_PATH: Final = 4096
MAX_REQUEST_BYTES: Final = 256
# A receipt with a full loss manifest is the largest answer.
MAX_RECEIPT_BYTES: Final = 4 * 1024 * 1024

# What became of a scan's accepted messages: all forwarded to its consumers, spooled because its
# session had no consumer able to take it, or interrupted (a consumer left mid-scan: what it was
# forwarded is listed lost, the rest spooled).
Outcome = Literal["forwarded", "spooled", "interrupted"]
# Why the scan closed: its producers' scan_ends, every sector of every frame arrived (a scan opened
# by NCEM headers, which have no scan_end), ``limits.scan_idle_s`` without a message (a producer
# went silent), or its session leaving the gateway (ended, expired, revoked).
ClosedBy = Literal["scan_end", "complete", "idle", "session_end"]
ReceiptState = Literal["open", "closed", "unknown"]


class ReceiptError(DsnError, ValueError):
    """A receipt message that breaks the format above."""


class GatewayReport(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One closed scan as the gateway saw it.

    ``sent``: the producers' own total (their ``scan_end``s); ``accepted``: data messages the
    gateway took, ``forwarded`` to consumers plus ``spooled`` to the file ``spool`` ("" if none);
    ``lost``: messages dropped, ``dropped`` by reason and ``drops`` one by one ([frame, sector,
    reason], at most MAX_MANIFEST; ``drops_truncated`` if more). ``reason`` says why a scan was
    spooled or interrupted ("" for one forwarded).
    """

    session: SessionId
    scan: U32
    outcome: Outcome
    reason: Annotated[str, msgspec.Meta(pattern=r"^[a-z_]{0,40}$")]
    closed_by: ClosedBy
    sent: U63
    accepted: U63
    forwarded: U63
    spooled: U63
    lost: U63
    dropped: dict[ReasonLabel, U63]
    drops: Annotated[list[tuple[U32, SectorIndex, ReasonLabel]],
                     msgspec.Meta(max_length=MAX_MANIFEST)]
    drops_truncated: bool
    spool: Annotated[str, msgspec.Meta(max_length=MAX_SPOOL_PATH)]
    # The gateway restarted mid-scan: its counts start at the restart, ``sent`` does not.
    resumed: bool = False
    # A scan split over several gateways: this report is lane ``lane`` of ``lanes``, its counts
    # are that lane's (None: the scan has one lane, and this is all of it).
    lane: Lane | None = None
    lanes: Lanes | None = None


class ReceiptRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True,
                     tag="receipt_request", tag_field="type"):
    v: Literal[1]
    scan: U32


class Receipt(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="receipt",
              tag_field="type"):
    v: Literal[1]
    scan: U32
    state: ReceiptState
    report: GatewayReport | None
    refused: Annotated[str, msgspec.Meta(pattern=r"^[a-z_]{0,40}$")]


_ENCODER: Final = msgspec.msgpack.Encoder()
T = TypeVar("T")
_REQUEST: Final = msgspec.msgpack.Decoder(ReceiptRequest)
_RECEIPT: Final = msgspec.msgpack.Decoder(Receipt)


def encode(message: ReceiptRequest | Receipt) -> bytes:
    return _ENCODER.encode(message)


def decode_request(frame: bytes) -> ReceiptRequest:
    return _decode(frame, _REQUEST, MAX_REQUEST_BYTES, "a receipt request")


def decode_receipt(frame: bytes) -> Receipt:
    return _decode(frame, _RECEIPT, MAX_RECEIPT_BYTES, "a receipt")


def _decode(frame: bytes, decoder: msgspec.msgpack.Decoder[T], limit: int, what: str) -> T:
    if len(frame) > limit:
        raise ReceiptError(f"{what} is at most {limit} bytes")
    try:
        return decoder.decode(frame)
    except msgspec.DecodeError as exc:
        raise ReceiptError(f"not {what}: {exc}") from None
