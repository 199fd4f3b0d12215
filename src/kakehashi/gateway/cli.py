"""``kakehashi gateway ...``: the aggregation-port gateway and its client module."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import sys
from collections.abc import Awaitable, Callable

import click

from kakehashi.config import connection_limit_options, hostport
from kakehashi.core import runner, tls
from kakehashi.core.audit import AuditLog
from kakehashi.core.crypto import hash_password
from kakehashi.core.mux import ProtocolMux
from kakehashi.core.paths import state_dir
from kakehashi.core.pump import pump_raw
from kakehashi.core.store import open_store
from kakehashi.core.stream import Conn, FdConn, Listener
from kakehashi.core.tlsmismatch import TLSMismatch
from kakehashi.gateway.allow import AllowList
from kakehashi.gateway.client import EventClient, Gateway, GatewayError, open_tunnel, serve_forward
from kakehashi.gateway.event_journal import StoreJournal
from kakehashi.gateway.events import TOPIC_RE, EventHub, Retention
from kakehashi.gateway.http import looks_like_request
from kakehashi.gateway.server import USER_KIND, GatewayServer, GatewaySettings, ProxyAuth

log = logging.getLogger("kakehashi.gateway")
DEFAULT_PORT = 8080

#: set by the top-level command line: (mux, db path) -> an awaitable started route.
#: Lets ``gateway serve --relay`` carry relay sessions without gateway importing relay.
RelayAttach = Callable[[ProtocolMux, str, str | None], Awaitable[None]]


def default_db() -> str:
    return str(state_dir() / "gateway.db")


@click.group()
def gateway() -> None:
    """Aggregation gateway (spec 001): every internal service through one firewall port."""


@gateway.command()
@click.option("--listen", default=f"0.0.0.0:{DEFAULT_PORT}", show_default=True,
              help="HOST:PORT of the aggregation port.")
@click.option("--allow", "allows", multiple=True,
              help="Reachable targets: NET, HOST, *.DOMAIN, each optionally :PORTS "
                   "(repeatable). Nothing else is reachable.")
@click.option("--tls", "tls_mode", type=click.Choice(["auto", "on", "off"]), default="auto",
              show_default=True,
              help="auto: TLS and plaintext on the same port (told apart by the first byte); "
                   "on: TLS only; off: plaintext only.")
@click.option("--cert", type=click.Path(exists=True, dir_okay=False),
              help="TLS certificate (default: issued by the development CA).")
@click.option("--key", type=click.Path(exists=True, dir_okay=False), help="Its private key.")
@click.option("--db", default=default_db, show_default="state dir gateway.db",
              help="Database of proxy users (and relay users with --relay).")
@click.option("--auth/--no-auth", default=False, show_default=True,
              help="Require proxy authentication (Basic, users from 'gateway user add').")
@click.option("--relay/--no-relay", default=False, show_default=True,
              help="Also accept kakehashi relay sessions on this port (relay users in --db).")
@click.option("--via-name", default="kakehashi", show_default=True,
              help="This gateway's name in Via headers (loops are detected by it).")
@click.option("--gzip-decode", is_flag=True, help="Decode gzip responses for clients.")
@click.option("--publisher", "publishers", multiple=True,
              help="Networks allowed to publish events (default: loopback).")
@click.option("--durable-events/--memory-events", default=True, show_default=True,
              help="Keep retained events in --db, so a restart keeps them and their "
                   "numbering (watchers' cursors stay valid).")
@click.option("--event-keep", type=click.IntRange(min=1), default=10_000, show_default=True,
              help="Events retained per topic (the oldest go first).")
@click.option("--event-max-age", type=click.FloatRange(min=1), default=3600.0,
              show_default=True, help="Seconds an event is retained.")
@click.option("--head-timeout", type=float, default=10.0, show_default=True,
              help="Seconds a client has to send a whole request head (slowloris guard).")
@click.option("--idle-timeout", type=float, default=60.0, show_default=True,
              help="Seconds a kept-alive client connection may sit idle.")
@click.option("--connect-timeout", type=float, default=10.0, show_default=True,
              help="Seconds to connect to a target (then 504).")
@click.option("--read-timeout", type=float, default=60.0, show_default=True,
              help="Seconds to wait for a target's response or body data (then 504).")
@connection_limit_options(20_000, "Raise it with --relay and many agents.")
@click.option("--upstream-idle", type=float, default=4.0, show_default=True,
              help="Seconds an idle connection to a target is kept for the next client "
                   "connection to it (0: none are shared).")
@click.option("--audit-log", type=click.Path(dir_okay=False),
              help="Append allow/deny decisions as JSON lines to this file "
                   "(default: to the log, logger kakehashi.audit).")
@click.option("--access-log", type=click.Path(dir_okay=False),
              help="Append one JSON line per request to this file.")
@click.pass_context
def serve(ctx: click.Context, listen, allows, tls_mode, cert, key, db, auth, relay, via_name,
          gzip_decode, publishers, durable_events, event_keep, event_max_age, head_timeout,
          idle_timeout, connect_timeout, read_timeout,
          max_connections, max_per_client, upstream_idle, audit_log, access_log) -> None:
    """Run the gateway: HTTP proxy, CONNECT tunnels and events on one port."""
    host, port = hostport(listen, "--listen", DEFAULT_PORT)
    try:
        allow = AllowList(list(allows))
        nets = [ipaddress.ip_network(p, strict=False) for p in publishers]
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if not allow:
        log.warning("no --allow given: no target is reachable through this gateway")
    if bool(cert) != bool(key):
        raise click.UsageError("--cert and --key go together")
    settings = GatewaySettings(via_name=via_name, head_timeout=head_timeout,
                               idle_timeout=idle_timeout, connect_timeout=connect_timeout,
                               read_timeout=read_timeout, gzip_decode=gzip_decode,
                               upstream_idle=max(upstream_idle, 0.0))
    if nets:
        settings.publishers = nets
    store = open_store(db)
    attach: RelayAttach | None = (ctx.obj or {}).get("relay_attach")
    if relay and attach is None:
        raise click.UsageError("--relay is not available in this build")

    retention = Retention(max_events=event_keep, max_age=event_max_age)
    hub = EventHub(retention, journal=StoreJournal(store) if durable_events else None)
    if hub.topics:
        log.info("events: %d topics restored from %s", len(hub.topics), db)

    async def main() -> None:
        server = GatewayServer(allow, settings=settings, hub=hub,
                               auth=ProxyAuth(store) if auth else None,
                               audit=AuditLog(audit_log, system="gateway"),
                               access_log=access_log)
        ctx_tls = tls.server_context(cert, key) if tls_mode != "off" else None
        mux = ProtocolMux(tls=ctx_tls, timeout=head_timeout)
        if tls_mode == "on":
            mux.require_tls = True
        mux.add("http", looks_like_request, server.handle_connection)
        if relay and attach is not None:
            await attach(mux, db, audit_log)
        listener = Listener(host, port, mux, max_connections=max_connections,
                            max_per_client=max_per_client)
        listener.start()
        h, p = listener.address
        click.echo(f"gateway listening on {h}:{p} (http proxy, CONNECT, events"
                   f"{', relay' if relay else ''}; tls {tls_mode})", err=True)
        try:
            await asyncio.Event().wait()
        finally:
            await listener.close()
            server.close()

    try:
        sys.exit(runner.run(main()))
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {listen}: {exc.strerror}") from None


# -- proxy users -------------------------------------------------------------------
@gateway.group()
def user() -> None:
    """Manage proxy users (for --auth)."""


@user.command("add")
@click.argument("name")
@click.option("--db", default=default_db, show_default="state dir gateway.db",
              help="The gateway's database.")
@click.option("--password-stdin", is_flag=True, help="Read the password from stdin.")
@click.option("--kdf-n", type=int, default=2**14, hidden=True)
def user_add(name, db, password_stdin, kdf_n) -> None:
    """Add proxy user NAME (password prompted or --password-stdin)."""
    if ":" in name or not name or len(name) > 64:
        raise click.BadParameter("1-64 characters, no ':'", param_hint="NAME")
    if password_stdin:
        pw = sys.stdin.readline().rstrip("\r\n")
    else:
        pw = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    if not pw:
        raise click.UsageError("empty password")
    if not open_store(db).insert(USER_KIND, name, {"password_hash": hash_password(pw, n=kdf_n)}):
        raise click.ClickException(f"user {name} already exists")
    click.echo(f"added proxy user {name}")


@user.command("list")
@click.option("--db", default=default_db, help="The gateway's database.")
def user_list(db) -> None:
    """List proxy users."""
    for name, _ in open_store(db).list(USER_KIND):
        click.echo(name)


@user.command("remove")
@click.argument("name")
@click.option("--db", default=default_db, help="The gateway's database.")
def user_remove(name, db) -> None:
    """Remove proxy user NAME."""
    if not open_store(db).delete(USER_KIND, name):
        raise click.ClickException(f"no proxy user {name}")
    click.echo(f"removed proxy user {name}")


# -- the client module -------------------------------------------------------------
def via_options(f):
    f = click.option("--via", required=True, help="The gateway's HOST:PORT.")(f)
    f = click.option("--via-tls", type=click.Choice(["on", "off"]), default="off",
                     show_default=True, help="Speak TLS to the gateway.")(f)
    f = click.option("--ca", type=click.Path(exists=True, dir_okay=False),
                     help="CA to trust for --via-tls on (default: system + dev CA).")(f)
    f = click.option("--proxy-user", help="Proxy user (password from KAKEHASHI_PROXY_PASSWORD).")(f)
    return f


def _gateway(via, via_tls, ca, proxy_user) -> Gateway:
    import os

    host, port = hostport(via, "--via", DEFAULT_PORT)
    return Gateway(host, port, tls=tls.client_context(ca) if via_tls == "on" else None,
                   user=proxy_user, password=os.environ.get("KAKEHASHI_PROXY_PASSWORD"))


@gateway.command()
@via_options
@click.option("--to", "to", required=True, help="Target HOST:PORT (an HTTP server).")
@click.option("--listen", required=True, help="Local HOST:PORT for the application.")
def forward(via, via_tls, ca, proxy_user, to, listen) -> None:
    """Let an application speak plain HTTP to a local port; requests go via the gateway."""
    gw = _gateway(via, via_tls, ca, proxy_user)
    thost, tport = hostport(to, "--to", 80)
    lhost, lport = hostport(listen, "--listen")

    async def main() -> None:
        listener = await serve_forward(gw, thost, tport, lhost, lport)
        h, p = listener.address
        click.echo(f"forwarding http://{h}:{p} -> {thost}:{tport} via {via}", err=True)
        try:
            await asyncio.Event().wait()
        finally:
            await listener.close()

    sys.exit(runner.run(main()))


@gateway.command()
@via_options
@click.option("--to", "to", required=True, help="Target HOST:PORT.")
@click.option("--listen", help="Local HOST:PORT; without it, stdin/stdout (ProxyCommand).")
def tunnel(via, via_tls, ca, proxy_user, to, listen) -> None:
    """A CONNECT tunnel through the gateway, as a local port or on stdin/stdout."""
    gw = _gateway(via, via_tls, ca, proxy_user)
    thost, tport = hostport(to, "--to")

    async def main() -> int:
        if listen is None:
            try:
                conn = await open_tunnel(gw, thost, tport)
            except (GatewayError, OSError) as exc:
                click.echo(f"kakehashi: tunnel to {to} failed: {exc}", err=True)
                return 1
            try:
                await pump_raw(FdConn(0, 1), conn)
            finally:
                conn.close()
            return 0
        lhost, lport = hostport(listen, "--listen")

        async def handle(app: Conn) -> None:
            try:
                up = await open_tunnel(gw, thost, tport)
            except (GatewayError, OSError) as exc:
                log.error("tunnel to %s failed: %s", to, exc)
                return
            try:
                await pump_raw(app, up)
            except OSError:
                pass
            finally:
                up.close()

        listener = Listener(lhost, lport, handle)
        listener.start()
        h, p = listener.address
        click.echo(f"tunnel {h}:{p} -> {to} via {via}", err=True)
        try:
            await asyncio.Event().wait()
        finally:
            await listener.close()
        return 0

    sys.exit(runner.run(main()))


def _topic(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if not TOPIC_RE.match(value):
        raise click.BadParameter("topic names are 1-128 of A-Z a-z 0-9 _ . -")
    return value


@gateway.group()
def events() -> None:
    """Publish to and watch event topics through the gateway's one port."""


@events.command()
@via_options
@click.argument("topic", callback=_topic)
@click.option("--data", help="Event text (default: read stdin).")
def publish(via, via_tls, ca, proxy_user, topic, data) -> None:
    """Publish one event to TOPIC (from an internal network)."""
    gw = _gateway(via, via_tls, ca, proxy_user)
    payload = data.encode() if data is not None else sys.stdin.buffer.read()

    async def main() -> int:
        try:
            seq = await EventClient(gw).publish(topic, payload)
        except (GatewayError, OSError) as exc:
            click.echo(f"kakehashi: publish failed: {exc}", err=True)
            return 1
        click.echo(f"published {topic} #{seq}")
        return 0

    sys.exit(runner.run(main()))


@events.command()
@via_options
@click.argument("topic", callback=_topic)
@click.option("--cursor", type=int, default=0, show_default=True,
              help="Start after this event number (0: oldest retained, -1: only new).")
@click.option("--wait", type=float, default=25.0, show_default=True,
              help="Long-poll wait per request (seconds).")
@click.option("--count", type=int, help="Stop after this many events.")
def watch(via, via_tls, ca, proxy_user, topic, cursor, wait, count) -> None:
    """Print TOPIC's events as JSON lines, long polling through the gateway."""
    gw = _gateway(via, via_tls, ca, proxy_user)

    async def main() -> int:
        seen = 0
        try:
            async for event in EventClient(gw).watch(topic, cursor, wait):
                click.echo(json.dumps(event))
                sys.stdout.flush()
                seen += 1
                if count is not None and seen >= count:
                    return 0
        except TLSMismatch as exc:  # retrying would not help: say which flag to change
            click.echo(f"kakehashi: watch failed: {exc}", err=True)
            return 1
        return 0

    sys.exit(runner.run(main()))
