"""``dsn producer``: stream a synthetic scan or replay a spool file into a session; make keys."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import click

from common.client import DEFAULT_TEMPLATE, TOKEN_ENV, TOKEN_FILE_OPTION, Client, Transport
from common.clitypes import (
    CONTROLPLANE_URLS_HELP,
    ControlPlaneURLs,
    one_for_each,
    scan_shape_option,
    template_params,
)
from common.config import next_port
from common.keys import KeyFileError, KeyPair, create_keypair, load_keypair, load_secret_keypair
from common.protocol import MAX_LANES
from common.receipts import GatewayReport
from common.restclient import ClientError
from common.tokenfile import TokenFileError, token_from
from dataplane.producer import (
    Abandon,
    GatewayTarget,
    GatewayUnresponsive,
    HeaderMode,
    MoveWatch,
    ProducerError,
    ProducerSession,
    StreamStats,
    replay_spool,
    stream_synthetic,
)
from dataplane.receipts import DEFAULT_WAIT_S, ReceiptClient, await_report, check_not_closed
from dataplane.spool import SpoolError, SpoolReader
from dataplane.synthetic import CameraSpec, StreamPlan, SyntheticCamera, SyntheticError


@click.group()
def producer() -> None:
    """Stream detector data into a DSN session."""


def _load_key(path: Path, option: str, secret: bool) -> KeyPair:
    try:
        return load_secret_keypair(path) if secret else load_keypair(path)
    except KeyFileError as exc:
        raise click.BadParameter(str(exc), param_hint=option) from None


@producer.command("stream")
@click.option("--controlplane", "controlplane_urls", type=ControlPlaneURLs(), default=None,
              metavar="URL[,URL...]",
              help="Open the session at this control plane and stream into the gateway it "
                   f"names, with the project token of --project-token-file or ${TOKEN_ENV}. "
                   + CONTROLPLANE_URLS_HELP)
@click.option("--project-token-file", default=None,
              type=click.Path(dir_okay=False, path_type=Path),
              help="With --controlplane: file holding the project token, mode 0600. Or set "
                   f"${TOKEN_ENV} instead (not both: that is an error).")
@click.option("--project", default=None,
              help="With --controlplane: the session's project [default: the token's].")
@click.option("--template", default=DEFAULT_TEMPLATE, show_default=True,
              help="With --controlplane: the DSN template the session is rendered from.")
@click.option("--param", "param_pairs", multiple=True, metavar="NAME=VALUE",
              help="With --controlplane: a template parameter, JSON where it parses "
                   "(hwm=64, sources='[\"10.0.0.0/8\"]'), else a string. Repeatable.")
@click.option("--ttl", type=click.IntRange(min=1), default=None,
              help="With --controlplane: session lifetime in seconds [default: the policy's].")
@click.option("--end-session", is_flag=True,
              help="With --controlplane: end the session when the stream is over (or failed).")
@click.option("--session", "session_id", metavar="ID",
              help="With --controlplane: stream into this open session of the project (opened "
                   "in the console, say) instead of opening one; --client-key must be the key "
                   "pair registered on it.")
@click.option("--follow-wait", type=click.FloatRange(min=0), default=15.0, show_default=True,
              help="With --controlplane: when the gateway stops taking the stream or answering, "
                   "seconds to wait for the control plane to move the session to another "
                   "gateway (it does once the gateway has been silent for its gateway.timeout_s) "
                   "before failing; the scan is then streamed again there. 0: do not wait.")
@click.option("--lanes", type=click.IntRange(1, MAX_LANES), default=1, show_default=True,
              help="With --controlplane: open a session whose scans are split over this many "
                   "registered gateways (lanes, at most one per producer): producer k streams "
                   "through lane k mod N's gateway, and the consumer ranks merge the lanes. A "
                   "stream into a session of several lanes is not streamed again elsewhere when "
                   "a lane's gateway fails: stream the scan again under a new --scan.")
@click.option("--transport", type=click.Choice(["curve", "plain"]), default="curve",
              show_default=True,
              help="With --controlplane: 'plain' streams unencrypted to the gateway's plaintext "
                   "ingress (PLAIN: session id and session token signature); refused unless the "
                   "policy allows unencrypted transport.")
@click.option("--endpoint", "endpoints", multiple=True, metavar="tcp://HOST:PORT",
              help="Without --controlplane: the gateway's producer ingress, as given when the "
                   "session was opened. Repeat it to split the scan over several gateways of the "
                   "session (lanes, at most one per producer): producer k streams through the "
                   "(k mod N)-th.")
@click.option("--server-key", "server_keys", multiple=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="Without --controlplane: the gateway's public CURVE key file (NAME.key); with "
                   "several --endpoint, one for all or one each, in the same order.")
@click.option("--receipts", "receipts_endpoints", multiple=True, metavar="tcp://HOST:PORT",
              help="Without --controlplane: the gateway's receipts endpoint (its "
                   "gateway.receipts; with several --endpoint, one each, in the same order) "
                   "[default: the port after --endpoint's].")
@click.option("--receipt-timeout", type=click.FloatRange(0, min_open=True),
              default=DEFAULT_WAIT_S, show_default=True,
              help="Seconds to wait, after the stream, for the gateway's report of the scan.")
@click.option("--no-receipt", is_flag=True,
              help="Do not ask the gateway what became of the scan: delivery goes unconfirmed.")
@click.option("--client-key", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="This producer's CURVE key pair (NAME.key_secret, mode 0600). Without "
                   "--controlplane it must already be registered with the session; with it, it "
                   "is registered when the session opens [default there: a fresh in-memory pair].")
@click.option("--scan", type=click.IntRange(0, 2**32 - 1), default=None,
              help="Scan number [default: 0, or the spooled scan's number with --spool].")
@click.option("--spool", "spool_files", multiple=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Replay this gateway spool file (as one producer) instead of streaming a "
                   "synthetic scan. Repeat it for the spools of one scan's lanes (each lane's "
                   "gateway spools its part): they are replayed as one scan.")
@scan_shape_option(default="32x32")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the synthetic frames and of the loss, duplicates and reordering.")
@click.option("--loss", type=click.FloatRange(0, 1, max_open=True), default=0.0,
              show_default=True, help="Fraction of (frame, sector) pairs never sent.")
@click.option("--duplicates", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Fraction of sent sectors sent twice.")
@click.option("--reorder", type=click.IntRange(min=0), default=0, show_default=True,
              help="Shuffle each producer's messages within windows of this many messages.")
@click.option("--header", type=click.Choice(["native", "ncem"]), default="native",
              show_default=True, help="Data header format: native DSN or the NCEM 4D Camera array.")
@click.option("--electrons", type=click.IntRange(min=0), default=40, show_default=True,
              help="Electrons planted per frame.")
@click.option("--dark", is_flag=True, help="Add per-pixel dark offsets to every frame.")
@click.option("--timeout", type=click.FloatRange(0, min_open=True), default=30.0,
              show_default=True, help="Seconds a send may block before the stream fails.")
@click.option("--progress/--no-progress", default=None,
              help="Show a progress bar (default: only on a terminal).")
def stream(controlplane_urls: tuple[str, ...] | None, project_token_file: Path | None,
           project: str | None, template: str, param_pairs: tuple[str, ...], ttl: int | None,
           end_session: bool, session_id: str | None, follow_wait: float, lanes: int,
           transport: Transport, endpoints: tuple[str, ...], server_keys: tuple[Path, ...],
           receipts_endpoints: tuple[str, ...], receipt_timeout: float, no_receipt: bool,
           client_key: Path | None, scan: int | None, spool_files: tuple[Path, ...],
           scan_shape: tuple[int, int], seed: int,
           loss: float, duplicates: float, reorder: int, header: HeaderMode, electrons: int,
           dark: bool, timeout: float, progress: bool | None) -> None:
    """Stream a synthetic 4D Camera scan into a session, one producer per sector, or replay a
    spool file.

    Two modes: with --controlplane, open the session there with a project token (registering
    this producer's CURVE key) and stream into the gateway it names; without it, stream into a
    session opened elsewhere, given its --endpoint, --server-key and a registered --client-key.

    Before streaming, the gateway is asked whether the scan number is free in the session; after
    it, what became of the scan: how many messages it forwarded, spooled (and to which file) or
    dropped, and why. The command exits non-zero when anything sent was not delivered, or when
    the gateway's report does not come (--no-receipt skips both questions).
    """
    ctx = click.get_current_context()
    if spool_files:
        _refuse_options(ctx, _SYNTHETIC_OPTIONS, "applies to synthetic scans, not to --spool")
        if len(endpoints) > 1:
            raise click.UsageError("--spool replays through one gateway: give one --endpoint")
        work = _spool_work(list(spool_files), scan, progress, timeout)
    else:
        work = _synthetic_work(0 if scan is None else scan, scan_shape, seed, loss, duplicates,
                               reorder, header, electrons, dark, progress, timeout,
                               max(len(endpoints), lanes))
    wait_s = None if no_receipt else receipt_timeout
    if controlplane_urls is None:
        _refuse_options(ctx, _CONTROLPLANE_OPTIONS, "needs --controlplane")
        targets = _direct_targets(endpoints, server_keys, client_key, receipts_endpoints)
        _guarded(lambda: _deliver(work, targets, wait_s))
        return
    _refuse_options(ctx, _DIRECT_OPTIONS, "is the gateway's own; with --controlplane the "
                                          "control plane names it")
    if session_id is not None:
        _refuse_options(ctx, _OPENING_OPTIONS, "opens a session; --session streams into an "
                                               "open one")
        if client_key is None:
            raise click.UsageError("--session needs --client-key, the key pair registered on it")
    session = ProducerSession(
        _client(controlplane_urls, project_token_file), project=project,
        template=template, params=template_params(param_pairs), ttl=ttl, end_on_exit=end_session,
        client=None if client_key is None else _load_key(client_key, "--client-key", secret=True),
        transport=transport, session_id=session_id, lanes=lanes)
    _guarded(lambda: _stream_in_session(session, work, wait_s, follow_wait))


@dataclass(frozen=True)
class Work:
    """What a stream does once it knows where to go: ``run`` streams scan ``scan`` through the
    gateways given, one per lane."""

    label: str
    scan: int
    run: Callable[[list[GatewayTarget], Abandon | None], StreamStats]
    one_lane: bool = False  # a spool replay: its scan_begin names no lane


_OPENING_OPTIONS = ("template", "param_pairs", "ttl", "transport", "lanes")
_CONTROLPLANE_OPTIONS = ("project_token_file", "project", *_OPENING_OPTIONS, "end_session",
                         "session_id", "follow_wait")
_DIRECT_OPTIONS = ("endpoints", "server_keys", "receipts_endpoints")


def _spool_work(spool_files: list[Path], scan: int | None, progress: bool | None,
                timeout: float) -> Work:
    try:
        with SpoolReader(spool_files[0]) as spool:
            spooled = spool.info.scan
    except SpoolError as exc:
        raise click.BadParameter(str(exc), param_hint="--spool") from None

    def run(targets: list[GatewayTarget], abandon: Abandon | None) -> StreamStats:
        [target] = targets
        return replay_spool(spool_files, target.endpoint, target.server_public, target.client,
                            scan=scan, progress=progress, send_timeout_s=timeout,
                            plain=target.plain, abandon=abandon)
    label = "spool " + " + ".join(path.name for path in spool_files)
    return Work(label, spooled if scan is None else scan, run, one_lane=True)


def _synthetic_work(scan: int, scan_shape: tuple[int, int], seed: int, loss: float,
                    duplicates: float, reorder: int, header: HeaderMode, electrons: int,
                    dark: bool, progress: bool | None, timeout: float, lanes: int) -> Work:
    # The scan is checked here, before any session is opened for it.
    try:
        spec = CameraSpec(scan_shape=scan_shape, seed=seed, electrons_per_frame=electrons,
                          dark=dark)
        plan = StreamPlan(spec, producers=spec.sectors, loss_rate=loss,
                          duplicate_rate=duplicates, reorder_window=reorder, seed=seed)
    except SyntheticError as exc:
        raise click.UsageError(str(exc)) from None
    if lanes > plan.producers:
        raise click.UsageError(f"{lanes} lanes for {plan.producers} producers (one per "
                               "sector): each lane needs a producer")

    def run(targets: list[GatewayTarget], abandon: Abandon | None) -> StreamStats:
        # Lanes share the producer's credentials (_direct_targets makes them so).
        target = targets[0]
        return stream_synthetic(
            [t.endpoint for t in targets], [t.server_public for t in targets], target.client,
            SyntheticCamera(spec), plan, scan, header=header, progress=progress,
            send_timeout_s=timeout, plain=target.plain, abandon=abandon)
    return Work(f"scan {scan}", scan, run)


def _guarded(action: Callable[[], None]) -> None:
    """Run ``action``; a producer or control-plane failure is one error line, exit status 1."""
    try:
        action()
    except (ProducerError, ClientError) as exc:
        raise click.ClickException(str(exc)) from None


def _deliver(work: Work, targets: list[GatewayTarget], wait_s: float | None,
             abandon: Abandon | None = None) -> None:
    """Stream ``work`` through ``targets`` (one per lane) and, unless ``wait_s`` is None, confirm
    its delivery by each; ``abandon`` may end a blocked send or the wait for a report early."""
    if work.one_lane and len(targets) > 1:
        raise ProducerError(f"the session has {len(targets)} lanes; a spool is replayed as one "
                            "lane: replay it into a session of one lane")
    if wait_s is None or any(t.receipts is None for t in targets):
        _report(work.label, work.run(targets, abandon))
        click.echo(f"scan {work.scan}: delivery not confirmed (no receipt asked for)")
        return
    with ExitStack() as stack:
        clients = [stack.enter_context(ReceiptClient(cast(str, t.receipts), t.server_public,
                                                     t.client)) for t in targets]
        for receipts in clients:
            check_not_closed(receipts, work.scan)
        _report(work.label, work.run(targets, abandon))
        reports = [await_report(receipts, work.scan, timeout_s=wait_s, abandon=abandon)
                   for receipts in clients]
    for report in reports:
        _confirm(report)


def _confirm(report: GatewayReport) -> None:
    """Print the gateway's report; ProducerError if anything sent was not delivered."""
    lane = "" if report.lanes is None else f" lane {report.lane} of {report.lanes}"
    click.echo(f"gateway: scan {report.scan}{lane} {report.outcome}"
               f"{f' ({report.reason})' if report.reason else ''}: {report.sent} sent, "
               f"{report.forwarded} forwarded, {report.spooled} spooled, {report.lost} lost")
    if report.spool:
        click.echo(f"gateway: spooled to {report.spool}; replay it into a session with "
                   f"'dsn producer stream --spool {report.spool} --scan NEW_NUMBER ...'")
    if report.lost:
        reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(report.dropped.items()))
        raise ProducerError(f"the gateway did not deliver {report.lost} of the {report.sent} "
                            f"messages of scan {report.scan} ({reasons})")
    if report.accepted < report.sent:
        # Dropped before they could be told apart as this scan's (a malformed header, say), or
        # in flight when the gateway restarted: its metrics count them by reason.
        raise ProducerError(f"the gateway accounts for {report.accepted} of the {report.sent} "
                            f"messages of scan {report.scan}")


def _direct_targets(endpoints: tuple[str, ...], server_keys: tuple[Path, ...],
                    client_key: Path | None, receipts: tuple[str, ...]) -> list[GatewayTarget]:
    """The gateways to stream through, one per --endpoint (a lane each)."""
    missing = [option for option, value in (("--endpoint", endpoints or None),
                                            ("--server-key", server_keys or None),
                                            ("--client-key", client_key)) if value is None]
    if missing:
        raise click.UsageError(f"without --controlplane, {', '.join(missing)} "
                               f"{'is' if len(missing) == 1 else 'are'} required")
    assert client_key is not None
    if len(receipts) not in (0, len(endpoints)):
        raise click.UsageError(f"{len(endpoints)} --endpoint but {len(receipts)} --receipts: "
                               "give one --receipts per --endpoint, or none")
    key_files = one_for_each(server_keys, len(endpoints))
    if key_files is None:
        raise click.UsageError(f"{len(endpoints)} --endpoint but {len(server_keys)} --server-key: "
                               "give one --server-key for all, or one per --endpoint")
    if len(set(endpoints)) != len(endpoints):
        raise click.UsageError("an --endpoint is given twice: each lane is another gateway")
    keys = [_load_key(path, "--server-key", secret=False).public for path in key_files]
    client = _load_key(client_key, "--client-key", secret=True)
    try:
        answers = receipts or tuple(next_port(endpoint) for endpoint in endpoints)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--endpoint") from None
    return [GatewayTarget(endpoint, server, client, receipts=answer)
            for endpoint, server, answer in zip(endpoints, keys, answers, strict=True)]


def _client(urls: tuple[str, ...], token_file: Path | None) -> Client:
    try:
        token = token_from(token_file, env=TOKEN_ENV, option=TOKEN_FILE_OPTION)
    except TokenFileError as exc:
        raise click.BadParameter(str(exc), param_hint=TOKEN_FILE_OPTION) from None
    try:
        return Client(urls, token.token, token_source=token.source)
    except ClientError as exc:
        raise click.BadParameter(str(exc), param_hint="--controlplane") from None


def _stream_in_session(session: ProducerSession, work: Work, wait_s: float | None,
                       follow_wait_s: float) -> None:
    # The session ends (with --end-session) only once the gateway has reported the scan: ending
    # it earlier would have the gateway drop what it had not read yet.
    with session:
        opened = session.session
        targets = session.gateways()
        click.echo(f"session {opened.id} (expires {opened.expires_at.isoformat()}), "
                   f"{'gateway' if len(targets) == 1 else f'{len(targets)} lanes: gateways'} "
                   f"{', '.join(target.endpoint for target in targets)}"
                   f"{' (plain, unencrypted)' if targets[0].plain is not None else ''}")
        if not opened.consumer_endpoints:
            click.echo(f"session {opened.id} has no consumer yet: the gateway spools its scans "
                       "until a consumer job registers")
        _deliver_following(session, work, wait_s, follow_wait_s)
    if session.end_on_exit:
        click.echo(f"session {opened.id} ended")


# How many times one stream follows its session to another gateway before giving up.
MAX_MOVES = 3
FOLLOW_POLL_S = 0.5


def _deliver_following(session: ProducerSession, work: Work, wait_s: float | None,
                       follow_wait_s: float) -> None:
    """``_deliver`` to the session's gateway; when that fails and the control plane has moved the
    session to another gateway (the first one's heartbeats stopped), stream the whole scan again
    there. While a send or the wait for the receipt is blocked, the control plane is asked every
    second whether the session has moved, and the stream is given up as soon as it has; a gateway
    whose stream failed before that (its send timeout) is given ``follow_wait_s`` for the control
    plane to notice and move the session. Nothing sent to the failed gateway is known to have
    arrived unless a receipt said so, so all of it is listed as unconfirmed and sent again: the
    new gateway's receipt accounts for the scan, and consumers count what reached them twice as
    duplicates.

    A session of several lanes is streamed once: its other lanes' gateways hold their part of
    the scan, so the stream ends, saying why, as soon as a lane's gateway fails or moves."""
    if len(session.gateways()) > 1:
        _deliver(work, session.gateways(), wait_s, MoveWatch(session))
        return
    for moves in range(MAX_MOVES + 1):
        target = session.gateway()
        try:
            _deliver(work, [target], wait_s, MoveWatch(session))
            return
        except ProducerError as exc:
            if moves == MAX_MOVES or not _moved(session, target, exc, follow_wait_s):
                raise
            opened = session.session
            click.echo(f"session {opened.id} moved from gateway {opened.previous_gateway} to "
                       f"{opened.gateway_name} ({session.gateway().endpoint}): every message of "
                       f"{work.label} sent to {target.endpoint} is unconfirmed; streaming it "
                       "again there")


def _moved(session: ProducerSession, target: GatewayTarget, failure: ProducerError,
           wait_s: float) -> bool:
    """Whether the control plane names another gateway for the session; for a gateway that
    stopped answering, asked every ``FOLLOW_POLL_S`` for up to ``wait_s``. The failure is said
    before waiting, or once the session has moved (else the caller raises it)."""
    if not isinstance(failure, GatewayUnresponsive):
        wait_s = 0.0
    deadline = time.monotonic() + wait_s
    first = True
    while True:
        try:
            moved = session.follow_gateway()
        except ClientError:
            return False  # it cannot say: the failure stands as it is
        if first and (moved or wait_s):
            click.echo(f"gateway {target.endpoint} failed: {failure}")
        if moved:
            return True
        if time.monotonic() >= deadline:
            return False
        if first:
            click.echo(f"waiting up to {wait_s:g} s for the control plane to move session "
                       f"{session.session.id} to another gateway")
            first = False
        time.sleep(FOLLOW_POLL_S)


_SYNTHETIC_OPTIONS = ("scan_shape", "seed", "loss", "duplicates", "reorder", "header", "electrons",
                      "dark")


def _refuse_options(ctx: click.Context, names: tuple[str, ...], reason: str) -> None:
    # An option the chosen mode does not use would be silently ignored: refuse it instead.
    for name in names:
        if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT:
            option = next(p for p in ctx.command.params if p.name == name)
            raise click.UsageError(f"{option.opts[0]} {reason}")


def _report(what: str, stats: StreamStats) -> None:
    click.echo(f"{what}: {stats.messages} messages, {stats.bytes / 1e6:.1f} MB in "
               f"{stats.seconds:.2f} s ({stats.gbytes_per_s:.3f} GB/s, "
               f"{stats.messages_per_s:.0f} msg/s); lost {stats.lost}, "
               f"duplicated {stats.duplicated}")


@producer.command("keygen")
@click.option("--out", "directory", required=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Directory for NAME.key (public) and NAME.key_secret (0600).")
@click.option("--name", required=True, help="Key name, e.g. the producer host.")
def keygen(directory: Path, name: str) -> None:
    """Create a CURVE key pair for a producer and print its public key."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name):
        raise click.BadParameter(f"{name!r} must be letters, digits, '_', '.' or '-'",
                                 param_hint="--name")
    existing = [p for p in (directory / f"{name}.key", directory / f"{name}.key_secret")
                if p.exists()]
    if existing:
        raise click.ClickException(f"{existing[0]} already exists; choose another --name")
    try:
        public_path, secret_path = create_keypair(directory, name)
    except OSError as exc:
        raise click.ClickException(f"cannot write keys to {directory}: {exc}") from None
    click.echo(f"public key file: {public_path}\nsecret key file: {secret_path}")
    click.echo(load_keypair(public_path).public.decode("ascii"))
