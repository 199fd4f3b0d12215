"""``kakehashi gateway ...``: the aggregation-port gateway and its client module."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import click

from kakehashi.core import options as opt

if TYPE_CHECKING:
    from kakehashi.core.mux import ProtocolMux
    from kakehashi.gateway.client import Gateway

# The heavy modules (TLS, the store, the gateway's server, client and event hub) are
# imported by the commands that use them: a command, or its --help, loads only what it
# needs, and every other system's command starts without them (see kakehashi.cli).

log = logging.getLogger("kakehashi.gateway")
DEFAULT_PORT = 8080

#: set by the top-level command line: (mux, db path) -> an awaitable started route.
#: Lets ``gateway serve --relay`` carry relay sessions without gateway importing relay.
RelayAttach = Callable[["ProtocolMux", str, str | None], Awaitable[None]]


def default_db() -> str:
    from kakehashi.core.paths import state_dir

    return str(state_dir() / "gateway.db")


@click.group()
def gateway() -> None:
    """Aggregation gateway (spec 001): every internal service through one firewall port."""


db_option = opt.db_option(default_db, "gateway.db",
                          "The gateway's database (a SQLite file or redis://HOST:PORT[/DB]): "
                          "proxy users, retained events (and relay users with --relay).")


@gateway.command()
@opt.listen_option(f"0.0.0.0:{DEFAULT_PORT}", "HOST:PORT of the aggregation port.")
@click.option("--allow-target", "allows", multiple=True,
              help="Reachable targets: NET, HOST, *.DOMAIN, each optionally :PORTS "
                   "(repeatable). Nothing else is reachable.")
@opt.deprecated_alias("--allow", "allows", "--allow-target", multiple=True)
@opt.server_tls_options(auto=True, default="auto", names=True,
                        help="auto: TLS and plaintext on the same port (told apart by the "
                             "first byte); on: TLS only; off: plaintext only.")
@db_option
@click.option("--auth/--no-auth", default=False, show_default=True,
              help="Require proxy authentication (Basic, users from 'gateway user add'). "
                   "Refused with --tls off unless --insecure-auth.")
@click.option("--insecure-auth", is_flag=True,
              help="Allow --auth on a plaintext-only listener (passwords cross the network "
                   "readable by anyone on the path).")
@click.option("--login-lockout", type=click.IntRange(min=1), default=20, show_default=True,
              help="With --auth: failed (or still being checked) proxy logins for one user "
                   "from one address within 10 minutes before that address is refused "
                   "for that user (429); 5 times as many over all users.")
@click.option("--relay/--no-relay", default=False, show_default=True,
              help="Also accept kakehashi relay sessions on this port (relay users in --db).")
@click.option("--via-name", default="kakehashi", show_default=True,
              help="This gateway's name in Via headers (loops are detected by it).")
@click.option("--gzip-decode", is_flag=True, help="Decode gzip responses for clients.")
@click.option("--publisher", "publishers", multiple=True,
              help="Networks allowed to publish events (default: loopback).")
@click.option("--durable-events/--memory-events", default=True, show_default=True,
              help="Keep retained events in --db, so a restart keeps them and their "
                   "numbering (watchers' cursors stay valid). With --db redis://... "
                   "events are always in Redis, shared by every gateway using it.")
@click.option("--event-keep", type=click.IntRange(min=1), default=10_000, show_default=True,
              help="Events retained per topic (the oldest go first).")
@click.option("--event-max-age", type=click.FloatRange(min=1), default=3600.0,
              show_default=True, help="Seconds an event is retained.")
@opt.timeout_option("head", 10.0,
                    "Seconds a client has to send a whole request head (slowloris guard).")
@opt.timeout_option("idle", 60.0, "Seconds a kept-alive client connection may sit idle.")
@opt.timeout_option("connect", 10.0, "Seconds to connect to a target (then 504).")
@opt.timeout_option("read", 60.0,
                    "Seconds to wait for a target's response or body data (then 504).")
@opt.connection_limit_options(20_000, "Raise it with --relay and many agents.")
@click.option("--upstream-idle", type=float, default=4.0, show_default=True,
              help="Seconds an idle connection to a target is kept for the next client "
                   "connection to it (0: none are shared).")
@opt.audit_log_option
@click.option("--access-log", type=click.Path(dir_okay=False),
              help="Append one JSON line per request to this file.")
@click.option("--fast-lane", type=click.Choice(["on", "off"]), default="on", show_default=True,
              help="Serve kept-alive requests from readiness callbacks (off: every request "
                   "by the coroutine path; the same decisions, slower).")
@opt.metrics_listen_option
@click.pass_context
def serve(ctx: click.Context, listen, allows, tls_mode, cert, key, names, db, auth,
          insecure_auth, login_lockout, relay, via_name,
          gzip_decode, publishers, durable_events, event_keep, event_max_age, head_timeout,
          idle_timeout, connect_timeout, read_timeout,
          max_connections, max_per_client, upstream_idle, audit_log, access_log,
          fast_lane, metrics_listen) -> None:
    """Run the gateway: HTTP proxy, CONNECT tunnels and events on one port."""
    import asyncio
    import ipaddress

    from kakehashi.core import runner, tls
    from kakehashi.core.audit import AuditLog
    from kakehashi.core.identity import LoginThrottle, ThrottleSettings
    from kakehashi.core.mux import ProtocolMux
    from kakehashi.core.store import describe, is_url, open_store
    from kakehashi.core.stream import Listener
    from kakehashi.gateway.allow import AllowList
    from kakehashi.gateway.event_journal import StoreJournal
    from kakehashi.gateway.events import EventHub, Retention, TopicHub
    from kakehashi.gateway.http import looks_like_request
    from kakehashi.gateway.proxyauth import ProxyAuth
    from kakehashi.gateway.server import GatewayServer, GatewaySettings

    host, port = opt.hostport(listen, "--listen", DEFAULT_PORT)
    if auth and tls_mode == "off" and not insecure_auth:
        raise click.UsageError(
            "--auth on a plaintext listener (--tls off) would send proxy passwords in the "
            "clear: use --tls on or auto, or add --insecure-auth if the network is trusted")
    if auth and tls_mode == "auto":
        log.warning("--auth with --tls auto: clients that speak plaintext send their "
                    "passwords in the clear (use --tls on to refuse them)")
    try:
        allow = AllowList(list(allows))
        nets = [ipaddress.ip_network(p, strict=False) for p in publishers]
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if not allow:
        log.warning("no --allow-target given: no target is reachable through this gateway")
    opt.check_cert_key(cert, key)
    settings = GatewaySettings(via_name=via_name, head_timeout=head_timeout,
                               idle_timeout=idle_timeout, connect_timeout=connect_timeout,
                               read_timeout=read_timeout, gzip_decode=gzip_decode,
                               upstream_idle=max(upstream_idle, 0.0),
                               fast_lane=fast_lane == "on")
    if nets:
        settings.publishers = nets
    store = open_store(db)
    attach: RelayAttach | None = (ctx.obj or {}).get("relay_attach")
    if relay and attach is None:
        raise click.UsageError("--relay is not available in this build")

    retention = Retention(max_events=event_keep, max_age=event_max_age)
    hub: TopicHub
    if is_url(db):  # topics on Redis Streams, shared with every gateway on this Redis
        from kakehashi.gateway.event_redis import RedisEventHub

        hub = RedisEventHub(db, retention)
        log.info("events: topics shared through %s", describe(db))
    else:
        hub = EventHub(retention, journal=StoreJournal(store) if durable_events else None)
        if hub.topics:
            log.info("events: %d topics restored from %s", len(hub.topics), describe(db))

    async def main() -> None:
        server = GatewayServer(allow, settings=settings, hub=hub,
                               auth=ProxyAuth(store, throttle=LoginThrottle(
                                   ThrottleSettings(lockout=login_lockout))) if auth else None,
                               audit=AuditLog(audit_log, system="gateway"),
                               access_log=access_log)
        # (the session-ticket keys rotate: TicketKeys; without, a context's keys would
        # last as long as the process)
        ctx_tls = tls.TicketKeys(
            lambda: tls.server_context(cert, key, names=list(names) or None, cache=False)) \
            if tls_mode != "off" else None
        mux = ProtocolMux(tls=ctx_tls, timeout=head_timeout)
        if tls_mode == "on":
            mux.require_tls = True
        mux.add("http", looks_like_request, server.handle_connection,
                start_now=server.start_now)
        if relay and attach is not None:
            await attach(mux, db, audit_log)
        listener = Listener(host, port, mux, max_connections=max_connections,
                            max_per_client=max_per_client)
        listener.start()
        h, p = listener.address
        click.echo(f"gateway listening on {h}:{p} (http proxy, CONNECT, events"
                   f"{', relay' if relay else ''}; tls {tls_mode})", err=True)
        from kakehashi.core import metrics  # servers only: clients start without it

        try:
            async with metrics.exporter(metrics_listen):
                await asyncio.Event().wait()
        finally:
            await listener.close()
            server.close()
            await hub.aclose()

    try:
        sys.exit(runner.run(main()))
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {listen}: {exc.strerror}") from None


# -- proxy users -------------------------------------------------------------------
def _proxy_users(db: str, **kwargs):
    """The gateway's proxy users in ``db``."""
    from kakehashi.core.store import open_store
    from kakehashi.gateway.proxyauth import ProxyUsers

    return ProxyUsers(open_store(db), **kwargs)


@gateway.group()
def user() -> None:
    """Manage proxy users (for --auth)."""


@user.command("add")
@click.argument("name")
@db_option
@opt.password_options
@click.option("--kdf-n", type=int, default=2**14, hidden=True)
def user_add(name, db, password_stdin, password_file, kdf_n) -> None:
    """Add proxy user NAME (password from the usual sources, or prompted)."""
    opt.check_name(name)
    pw = opt.password(password_stdin, password_file, confirm=True)
    if not _proxy_users(db, kdf_n=kdf_n).add({"name": name}, pw):
        raise click.ClickException(f"user {name} already exists (use 'passwd')")
    click.echo(f"added proxy user {name}")


@user.command("passwd")
@click.argument("name")
@db_option
@opt.password_options
@click.option("--kdf-n", type=int, default=2**14, hidden=True)
def user_passwd(name, db, password_stdin, password_file, kdf_n) -> None:
    """Set a new password for proxy user NAME (open connections re-check within 1 s)."""
    users = _proxy_users(db, kdf_n=kdf_n)
    if users.get(name) is None:
        raise click.ClickException(f"no proxy user {name}")
    users.set_password(name, opt.password(password_stdin, password_file, confirm=True))
    click.echo(f"password of proxy user {name} changed")


@user.command("list")
@db_option
@opt.json_option
def user_list(db, as_json) -> None:
    """List proxy users."""
    names = _proxy_users(db).names()
    if as_json:
        import json

        click.echo(json.dumps([{"user": name} for name in names]))
        return
    for name in names:
        click.echo(name)


@user.command("remove")
@click.argument("name")
@db_option
def user_remove(name, db) -> None:
    """Remove proxy user NAME."""
    if not _proxy_users(db).remove(name):
        raise click.ClickException(f"no proxy user {name}")
    click.echo(f"removed proxy user {name}")


# -- the client module -------------------------------------------------------------
def client_options(f):
    """The shared client vocabulary, plus the old spellings (hidden, with a note)."""
    f = opt.deprecated_alias("--proxy-user", "user", "--user")(f)
    f = opt.deprecated_alias("--via-tls", "tls_mode", "--tls",
                             type=click.Choice(["on", "off"]))(f)
    f = opt.deprecated_alias("--via", "server", "--server")(f)
    return opt.client_options("The gateway", DEFAULT_PORT, server_required=False,
                              user_required=False,
                              user_help="Proxy user, when the gateway requires "
                                        "authentication (password from the usual sources).")(f)


def _gateway(server, user, password_stdin, password_file, tls_mode, ca) -> Gateway:
    """Where the gateway is and how to reach it, from the client options."""
    from kakehashi.core import tls
    from kakehashi.core.identity import PASSWORD_ENV
    from kakehashi.gateway.client import Gateway

    if not server:
        raise click.UsageError("Missing option '--server'.")
    addr = opt.parse_server(server, "--server", DEFAULT_PORT)
    if not opt.explicit("tls_mode") and not opt.alias_used("tls_mode"):
        if addr.tls is not None:
            tls_mode = "on" if addr.tls else "off"
        elif opt.alias_used("server"):
            tls_mode = "off"  # the old spelling keeps its old default (--via-tls off)
    pw = None
    if user is not None:
        opt.check_name(user, "--user")
        if not (password_stdin or password_file or os.environ.get(PASSWORD_ENV)):
            pw = opt.env_password("KAKEHASHI_PROXY_PASSWORD")  # the old variable, noted
        pw = pw or opt.password(password_stdin, password_file)
    return Gateway(addr.host, addr.port,
                   tls=tls.client_context(ca) if tls_mode == "on" else None,
                   user=user, password=pw)


def _where(gw: Gateway) -> str:
    return f"{gw.authority.decode()} ({'TLS' if gw.tls else 'plaintext'})"


@gateway.command()
@client_options
@click.option("--to", "to", required=True, help="Target HOST:PORT (an HTTP server).")
@click.option("--listen", required=True, help="Local HOST:PORT for the application.")
def forward(to, listen, **conn) -> None:
    """Let an application speak plain HTTP to a local port; requests go via the gateway."""
    import asyncio

    from kakehashi.core import runner
    from kakehashi.gateway.client import serve_forward

    gw = _gateway(**conn)
    thost, tport = opt.hostport(to, "--to", 80)
    lhost, lport = opt.hostport(listen, "--listen")

    async def main() -> None:
        listener = await serve_forward(gw, thost, tport, lhost, lport)
        h, p = listener.address
        click.echo(f"forwarding http://{h}:{p} -> {thost}:{tport} via {_where(gw)}", err=True)
        try:
            await asyncio.Event().wait()
        finally:
            await listener.close()

    sys.exit(runner.run(main()))


@gateway.command()
@client_options
@click.option("--to", "to", required=True, help="Target HOST:PORT.")
@click.option("--listen", help="Local HOST:PORT; without it, stdin/stdout (ProxyCommand).")
def tunnel(to, listen, **conn) -> None:
    """A CONNECT tunnel through the gateway, as a local port or on stdin/stdout."""
    import asyncio

    from kakehashi.core import runner
    from kakehashi.core.pump import pump_raw
    from kakehashi.core.stream import Conn, FdConn, Listener
    from kakehashi.gateway.client import GatewayError, open_tunnel

    gw = _gateway(**conn)
    thost, tport = opt.hostport(to, "--to")

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
        lhost, lport = opt.hostport(listen, "--listen")

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
        click.echo(f"tunnel {h}:{p} -> {to} via {_where(gw)}", err=True)
        try:
            await asyncio.Event().wait()
        finally:
            await listener.close()
        return 0

    sys.exit(runner.run(main()))


def _topic(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from kakehashi.gateway.events import TOPIC_RE

    if not TOPIC_RE.match(value):
        raise click.BadParameter("topic names are 1-128 of A-Z a-z 0-9 _ . -")
    return value


@gateway.group()
def events() -> None:
    """Publish to and watch event topics through the gateway's one port."""


@events.command()
@client_options
@click.argument("topic", callback=_topic)
@click.option("--data", help="Event text (default: read stdin).")
def publish(topic, data, **conn) -> None:
    """Publish one event to TOPIC (from an internal network)."""
    from kakehashi.core import runner
    from kakehashi.gateway.client import EventClient, GatewayError

    gw = _gateway(**conn)
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
@client_options
@click.argument("topic", callback=_topic)
@click.option("--cursor", type=int, default=0, show_default=True,
              help="Start after this event number (0: oldest retained, -1: only new).")
@click.option("--wait", type=float, default=25.0, show_default=True,
              help="Long-poll wait per request (seconds).")
@click.option("--count", type=int, help="Stop after this many events.")
def watch(topic, cursor, wait, count, **conn) -> None:
    """Print TOPIC's events as JSON lines, long polling through the gateway."""
    import json

    from kakehashi.core import runner
    from kakehashi.core.tlsmismatch import TLSMismatch
    from kakehashi.gateway.client import EventClient

    gw = _gateway(**conn)

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
