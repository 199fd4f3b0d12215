"""``kakehashi relay ...``: the relay server, its user registry, agents and clients."""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING

import click

from kakehashi.core import options as opt
from kakehashi.core import trace
from kakehashi.core.options import hostport

if TYPE_CHECKING:
    import asyncio

    from kakehashi.relay import messages as m
    from kakehashi.relay.agent import Terminal, TerminalConfig
    from kakehashi.relay.control import UserRecord
    from kakehashi.relay.users import RelayUsers

# The heavy modules (TLS, crypto, the store, the relay's protocol and terminals) are
# imported by the commands that use them: a command, or its --help, loads only what it
# needs, and every other system's command starts without them (see kakehashi.cli).

log = logging.getLogger("kakehashi.relay")
DEFAULT_PORT = 7000
#: the values of ``relay serve --session-cipher`` and of ``KAKEHASHI_SESSION_CIPHER``,
#: which the terminals read too (messages.SESSION_CIPHER)
SESSION_CIPHER_MODES = ("relay", "tls")


def default_db() -> str:
    from kakehashi.core.paths import state_dir

    return str(state_dir() / "relay.db")


@click.group()
def relay() -> None:
    """Rendezvous relay (spec 000): devices behind NAT log in and are reached by user ID."""


# -- user registry ---------------------------------------------------------------
db_option = opt.db_option(default_db, "relay.db",
                          "The relay's database: a SQLite file, redis://HOST:PORT[/DB] or "
                          "redis+sentinel://HOST:PORT[,...]/MASTER[/DB].")


def _registry(db: str, **kwargs) -> RelayUsers:
    """The relay's user registry in ``db``."""
    from kakehashi.core.store import open_store
    from kakehashi.relay.users import RelayUsers

    return RelayUsers(open_store(db), **kwargs)


def _split(values: tuple[str, ...]) -> list[str]:
    return [v for item in values for v in item.split(",") if v]


def user_attr_options(f):
    f = click.option("--encryption", type=click.Choice(["required", "optional", "off"]),
                     help="Pre-registered encryption attribute.")(f)
    f = click.option("--notify", type=click.Choice(["all", "none", "only", "except"]),
                     help="Who may see this user's presence.")(f)
    f = click.option("--notify-users", multiple=True,
                     help="Users for --notify only/except (comma-separated or repeated).")(f)
    f = click.option("--allowed-peers", multiple=True,
                     help="Only these users may connect to this one (default: anyone).")(f)
    f = click.option("--insecure-peer", type=click.Choice(["refuse", "ask"]),
                     help="When a peer cannot encrypt: refuse, or ask this user.")(f)
    f = click.option("--pubkey", help="X25519 public key (base64) for end-to-end mode.")(f)
    return f


@relay.group()
def user() -> None:
    """Manage the users registered on a relay server."""


@user.command("add")
@click.argument("name")
@db_option
@opt.password_options
@click.option("--kdf-n", type=int, default=2**14, hidden=True)
@user_attr_options
def user_add(name, db, password_stdin, password_file, kdf_n, **attrs) -> None:
    """Register user NAME (password prompted, or --password-stdin)."""
    from kakehashi.relay.control import UserRecord

    opt.check_name(name)
    registry = _registry(db, kdf_n=kdf_n)
    pw = opt.password(password_stdin, password_file, confirm=True)
    rec = _apply_attrs(UserRecord(name=name), attrs)
    if not registry.add(rec, pw):
        raise click.ClickException(f"user {name} already exists (use 'passwd' or 'set')")
    click.echo(f"added user {name} (encryption {rec.encryption})")


@user.command("set")
@click.argument("name")
@db_option
@user_attr_options
def user_set(name, db, **attrs) -> None:
    """Change the registered attributes of user NAME."""
    registry = _registry(db)
    rec = registry.get(name)
    if rec is None:
        raise click.ClickException(f"no user {name}")
    registry.update(_apply_attrs(rec, attrs))
    click.echo(f"updated user {name}")


@user.command("list")
@db_option
@opt.json_option
def user_list(db, as_json) -> None:
    """List registered users and their attributes."""
    users = _registry(db).list()
    if as_json:
        import json

        click.echo(json.dumps([{"user": r.name, "encryption": r.encryption,
                                "notify": r.notify, "notify_users": list(r.notify_users),
                                "allowed_peers": list(r.allowed_peers)
                                if r.allowed_peers is not None else None,
                                "insecure_peer": r.insecure_peer, "e2e_key": bool(r.pubkey)}
                               for r in users]))
        return
    for rec in users:
        peers = ",".join(rec.allowed_peers) if rec.allowed_peers is not None else "*"
        click.echo(f"{rec.name}\tencryption={rec.encryption}\tnotify={rec.notify}"
                   f"\tpeers={peers}\tinsecure-peer={rec.insecure_peer}"
                   f"\te2e-key={'yes' if rec.pubkey else 'no'}")


@user.command("remove")
@click.argument("name")
@db_option
def user_remove(name, db) -> None:
    """Remove user NAME."""
    if not _registry(db).remove(name):
        raise click.ClickException(f"no user {name}")
    click.echo(f"removed user {name}")


@user.command("passwd")
@click.argument("name")
@db_option
@opt.password_options
def user_passwd(name, db, password_stdin, password_file) -> None:
    """Set a new password for user NAME."""
    registry = _registry(db)
    if registry.get(name) is None:
        raise click.ClickException(f"no user {name}")
    registry.set_password(name, opt.password(password_stdin, password_file, confirm=True))
    click.echo(f"password of {name} changed")


def _load_identity(path: str | None):
    from kakehashi.core import crypto

    if not path:
        return None
    try:
        return crypto.load_identity(path)
    except (OSError, ValueError) as exc:
        raise click.BadParameter(
            f"cannot load {path}: {exc} (create one with 'kakehashi relay keygen PATH')",
            param_hint="--identity") from None


def _apply_attrs(rec: UserRecord, attrs: dict) -> UserRecord:
    from dataclasses import replace

    from kakehashi.core import crypto

    changes: dict = {}
    for key in ("encryption", "notify", "insecure_peer"):
        if attrs.get(key):
            changes[key] = attrs[key]
    if attrs.get("notify_users"):
        changes["notify_users"] = tuple(_split(attrs["notify_users"]))
    if attrs.get("allowed_peers"):
        peers = _split(attrs["allowed_peers"])
        changes["allowed_peers"] = None if peers == ["*"] else tuple(peers)
    if attrs.get("pubkey"):
        try:
            crypto.parse_public_b64(attrs["pubkey"])
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--pubkey") from None
        changes["pubkey"] = attrs["pubkey"]
    return replace(rec, **changes)


@relay.command()
@click.argument("path", type=click.Path(dir_okay=False))
def keygen(path) -> None:
    """Create (or show) an X25519 identity key at PATH; prints the public key."""
    from kakehashi.core import crypto

    key = crypto.load_or_create_identity(path)
    click.echo(crypto.public_b64(key))


# -- server ----------------------------------------------------------------------
@relay.command()
@opt.listen_option(f"0.0.0.0:{DEFAULT_PORT}")
@db_option
@opt.server_tls_options(auto=False, default="on", names=True,
                        help="TLS on the relay connection; 'off' is an explicit opt-in to "
                             "plaintext (STARTTLS stays available).")
@click.option("--keepalive", type=float, default=15.0, show_default=True,
              help="Keepalive interval announced to terminals (seconds).")
@click.option("--dead-after", type=int, default=3, show_default=True,
              help="Missed keepalives after which a connection is dead.")
@opt.timeout_option("request", 15.0,
                    "Seconds a connection request may wait for the target's answer.")
@opt.timeout_option("login", 15.0, "Seconds a new connection has to log in before it is closed.")
@click.option("--login-lockout", type=click.IntRange(min=1), default=20, show_default=True,
              help="Failed (or still being checked) logins for one user from one address "
                   "within 10 minutes after which that address is refused for that user; "
                   "5 times as many over all users.")
@opt.connection_limit_options(0, "Each agent holds 1 + its spare connections.")
@opt.audit_log_option
@opt.metrics_listen_option
@click.option("--cluster", metavar="redis://HOST:PORT",
              help="Join a cluster of relay nodes coordinated through this Redis: users "
                   "of every node reach each other (relay federation). Also "
                   "redis+sentinel://HOST:PORT[,HOST:PORT...]/MASTER[/DB] (Redis "
                   "Sentinel: the nodes follow a failover).")
@click.option("--node", help="This node's name in the cluster (unique; default: HOST-PORT "
                             "of --advertise).")
@click.option("--advertise", metavar="HOST:PORT",
              help="Where the other nodes reach this one (default: --listen, which must "
                   "then not be a wildcard address).")
@click.option("--cluster-secret-file", type=click.Path(exists=True, dir_okay=False),
              help="Secret that authenticates the links between nodes (default: one "
                   "made by the first node and shared through the cluster's Redis).")
@click.option("--cluster-ttl", type=click.FloatRange(min=1.0), default=6.0,
              show_default=True,
              help="Seconds after which a node that stopped renewing its entries (dead, "
                   "or cut off from Redis) is out of the cluster.")
@click.option("--cluster-ca", type=click.Path(exists=True, dir_okay=False),
              help="CA that issued the nodes' certificates, for TLS links between nodes "
                   "(--tls on, or STARTTLS for sessions that must be encrypted; default: "
                   "the development CA of the state directory).")
@click.option("--session-cipher", type=click.Choice(SESSION_CIPHER_MODES), default="relay",
              show_default=True, envvar="KAKEHASHI_SESSION_CIPHER",
              help="'relay': where both terminals offer it and both hops are TLS on this "
                   "node, issue each session fresh AES-128-GCM keys inside TLS, end TLS on "
                   "both links and forward the sealed frames unchanged (spec 000 step 23, "
                   "'relayed unchanged'); 'tls': decrypt and re-encrypt every session "
                   "(step 23 as written). Env: KAKEHASHI_SESSION_CIPHER.")
@click.option("--plaintext-requesters", type=click.Choice(["upgrade", "refuse"]),
              default="upgrade", show_default=True,
              help="A requester on a plaintext connection whose target requires "
                   "encryption: 'upgrade' - instruct it to STARTTLS (spec 000 step 12); "
                   "'refuse' - treat it as one that cannot encrypt (refused, or the "
                   "target asked, para 0037). With 'refuse' no request from a plaintext "
                   "connection that does not ask for encryption becomes an encrypted "
                   "session, terminals are told so at login, and they send a session's "
                   "first bytes with the request (early data, one round trip sooner).")
@opt.tls_resume_option
def serve(listen, db, tls_mode, cert, key, names, keepalive, dead_after, request_timeout,
          login_timeout, login_lockout, max_connections, max_per_client, audit_log,
          metrics_listen, cluster, node, advertise, cluster_secret_file, cluster_ttl,
          cluster_ca, session_cipher, plaintext_requesters, tls_resume) -> None:
    """Run the relay server (a node of a cluster with --cluster)."""
    import asyncio

    from kakehashi.core import runner, tls
    from kakehashi.core.audit import AuditLog
    from kakehashi.core.store import describe
    from kakehashi.relay.control import Settings
    from kakehashi.relay.server import RelayServer

    host, port = hostport(listen, "--listen", DEFAULT_PORT)
    opt.check_cert_key(cert, key)
    secret = None
    if cluster:
        from kakehashi.core.store.redis import parse_url

        try:
            parse_url(cluster)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--cluster") from None
        advertise = advertise or listen
        ahost, aport = hostport(advertise, "--advertise", DEFAULT_PORT)
        if ahost in ("0.0.0.0", "::", ""):
            raise click.BadParameter("the other nodes cannot reach a wildcard address: "
                                     "give --advertise HOST:PORT", param_hint="--advertise")
        node = node or f"{ahost.replace(':', '_')}-{aport}"
        opt.check_name(node, "--node", "node names")
        if cluster_secret_file:
            secret = opt.password(password_file=cluster_secret_file)
    elif node or advertise or cluster_secret_file:
        raise click.UsageError("--node, --advertise and --cluster-secret-file need --cluster")
    registry = _registry(db)
    if not registry.list():
        log.warning("no users registered in %s: add one with 'kakehashi relay user add'",
                    describe(db))
    tickets = tls.TicketKeys(
        lambda: tls.server_context(cert, key, names=list(names) or None, cache=False),
        resume=tls_resume == "on")
    server_ctx = tickets.context()
    settings = Settings(keepalive=keepalive, dead_missed=dead_after,
                        request_timeout=request_timeout, login_timeout=login_timeout,
                        fail_lockout=login_lockout, node=node if cluster else "",
                        session_cipher=session_cipher == "relay",
                        instruct_plaintext=plaintext_requesters == "upgrade")

    async def main() -> None:
        server = RelayServer(registry, host=host, port=port,
                             tls=server_ctx if tls_mode == "on" else None,
                             starttls=server_ctx, settings=settings,
                             audit=AuditLog(audit_log, system="relay"),
                             max_connections=max_connections,
                             max_per_client=max_per_client, tickets=tickets)
        try:
            addr = await server.start()
        except OSError as exc:
            raise click.ClickException(f"cannot listen on {listen}: {exc.strerror}") from None
        click.echo(f"relay listening on {addr[0]}:{addr[1]} "
                   f"({'TLS' if tls_mode == 'on' else 'plaintext'})", err=True)
        from kakehashi.core import metrics  # servers only: clients start without it

        node_layer = None
        if cluster:
            from kakehashi.relay.cluster import ClusterError, ClusterNode

            node_layer = ClusterNode(
                server, cluster, node, advertise, ttl=cluster_ttl, secret=secret,
                trunk_tls=tls.client_context(cluster_ca) if tls_mode == "on" else None,
                trunk_starttls=tls.client_context(cluster_ca),
                tls_resume=tls_resume == "on")
            server.cluster = node_layer
            try:
                await node_layer.start()
            except ClusterError as exc:
                await server.close()
                raise click.ClickException(str(exc)) from None
            click.echo(f"relay node {node} in cluster {describe(cluster)}, advertised as "
                       f"{advertise}", err=True)
        try:
            async with metrics.exporter(metrics_listen):
                await asyncio.Event().wait()
        finally:
            if node_layer is not None:
                await node_layer.close()
            await server.close()

    sys.exit(runner.run(main()))


# -- terminals -------------------------------------------------------------------
def terminal_options(f):
    f = opt.client_options("The relay", DEFAULT_PORT, user_help="Your user ID on the relay.",
                           multiple_servers=True)(f)
    f = click.option("--encryption", type=click.Choice(["required", "optional", "off"]),
                     help="Encryption attribute sent at login.")(f)
    f = click.option("--insecure-peer", type=click.Choice(["refuse", "ask"]),
                     help="If a peer cannot encrypt: refuse, or accept (ask = yes).")(f)
    f = click.option("--keepalive", type=float, help="Keepalive interval (default: relay's).")(f)
    f = click.option("--identity", type=click.Path(dir_okay=False),
                     help="X25519 identity key file for end-to-end mode.")(f)
    f = click.option("--peer-key", "peer_keys", multiple=True,
                     help="Pin a peer's X25519 key: NAME=BASE64 (repeatable).")(f)
    return opt.tls_resume_option(f)


def _terminal_config(server, user, password_file, password_stdin, tls_mode, ca, encryption,
                     insecure_peer, keepalive, identity, peer_keys, tls_resume, *,
                     spares: int,
                     services: list[str] | None = None,
                     allowed_peers: list[str] | None = None) -> TerminalConfig:
    from kakehashi.core import crypto, tls
    from kakehashi.relay import messages as m
    from kakehashi.relay.agent import TerminalConfig

    opt.check_name(user, "--user")
    mode = os.environ.get("KAKEHASHI_SESSION_CIPHER")
    if mode is not None and mode not in SESSION_CIPHER_MODES:
        # as `relay serve` refuses it: a typo must not silently mean "on"
        raise click.BadParameter(
            f"{mode!r} is not one of " + ", ".join(map(repr, SESSION_CIPHER_MODES))
            + " ('tls': do not offer the relay's session cipher)",
            param_hint="KAKEHASHI_SESSION_CIPHER")
    addrs = opt.parse_servers(server, "--server", DEFAULT_PORT)
    addr = addrs[0]
    host, port = addr.host, addr.port
    if addr.tls is not None and not opt.explicit("tls_mode"):
        tls_mode = "on" if addr.tls else "off"
    if keepalive is not None and keepalive <= 0:
        raise click.BadParameter("must be positive", param_hint="--keepalive")
    pw = opt.password(password_stdin, password_file)
    ctx = tls.client_context(ca)
    keys = {}
    for item in peer_keys:
        name, sep, key_b64 = item.partition("=")
        if not sep:
            raise click.BadParameter("expected NAME=BASE64", param_hint="--peer-key")
        try:
            crypto.parse_public_b64(key_b64)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--peer-key") from None
        keys[name] = key_b64
    attrs = m.Attrs(encryption=encryption, services=services or [],
                    insecure_peer=insecure_peer, allowed_peers=allowed_peers)
    return TerminalConfig(
        server=host, port=port, user=user, password=pw,
        servers=[(a.host, a.port) for a in addrs],
        tls=ctx if tls_mode == "on" else None, starttls=ctx, attrs=attrs, spares=spares,
        keepalive=keepalive,
        identity=_load_identity(identity),
        peer_keys=keys, insecure_ok=insecure_peer == "ask", tls_resume=tls_resume == "on",
    )


@relay.command()
@terminal_options
@click.option("--expose", "exposes", multiple=True, required=True,
              help="Service to offer: NAME=HOST:PORT (repeatable).")
@click.option("--spares", type=int, default=2, show_default=True,
              help="Idle logged-in connections kept ready.")
@click.option("--allowed-peers", "allowed", multiple=True,
              help="Only these users may connect (sent at login; narrows the registered "
                   "--allowed-peers, never widens it).")
@opt.deprecated_alias("--allow", "allowed", "--allowed-peers", multiple=True)
def agent(exposes, spares, allowed, **opts) -> None:
    """Log in and keep connections open so others can reach the exposed services."""
    import asyncio

    from kakehashi.relay.agent import Terminal, service_acceptor

    services: dict[str, tuple[str, int]] = {}
    for item in exposes:
        name, sep, target = item.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"{item!r}: expected NAME=HOST:PORT", param_hint="--expose")
        opt.check_name(name, "--expose", "service names")
        services[name] = hostport(target, "--expose")
    cfg = _terminal_config(**opts, spares=spares, services=list(services),
                           allowed_peers=_split(allowed) or None)

    async def main() -> None:
        term: Terminal

        def spawn(c):
            term.spawn(c)

        term = Terminal(cfg, accept=service_acceptor(services, spawn),
                        on_message=_print_message)
        maintainer = asyncio.create_task(term.maintain())
        try:
            await _online(term, maintainer)
            click.echo(f"agent {cfg.user} online at {term.server[0]}:{term.server[1]}, exposing "
                       + ", ".join(f"{k}={h}:{p}" for k, (h, p) in services.items()), err=True)
            await maintainer
        finally:
            maintainer.cancel()
            await term.close(logout=True)  # the terminal stops using the relay (step 6)

    sys.exit(_run_client(main()))


def _print_message(msg: m.Msg) -> None:
    from kakehashi.relay import messages as m

    if isinstance(msg, m.Deliver):
        click.echo(f"message from {msg.sender}: {msg.body.decode(errors='replace')}", err=True)
    elif isinstance(msg, m.Presence):
        click.echo(f"presence: {msg.user} {'online' if msg.online else 'offline'}", err=True)


def _target(spec: str) -> tuple[str, str]:
    name, _, service = spec.partition("/")
    opt.check_name(name, "TARGET")
    if service:
        opt.check_name(service, "TARGET", "service names")
    return name, service


@relay.command("connect")
@terminal_options
@click.argument("target")
@click.option("--listen", required=True, help="Local HOST:PORT to accept connections on.")
@click.option("--spares", type=int, default=2, show_default=True)
@click.option("--e2e", is_flag=True, help="End-to-end encryption with the target.")
@click.option("--encrypt", is_flag=True, help="Require encryption for these sessions.")
def connect_cmd(target, listen, spares, e2e, encrypt, **opts) -> None:
    """Forward a local port to TARGET[/SERVICE] through the relay."""
    import asyncio

    from kakehashi.core.stream import Listener
    from kakehashi.relay.agent import RelayError, Terminal, run_session

    cfg = _terminal_config(**opts, spares=spares)
    name, service = _target(target)
    host, port = hostport(listen, "--listen")

    async def main() -> int:
        term = Terminal(cfg, on_message=_print_message)
        maintainer = asyncio.create_task(term.maintain())

        async def handle(conn) -> None:
            trace.event("local accepted")
            try:
                link, info = await term.connect(name, service, encrypt=encrypt, e2e=e2e,
                                                app=conn)
            except (RelayError, OSError) as exc:
                log.error("cannot connect to %s: %s", target, exc)
                return
            why = await run_session(link, conn, info, initiator=True)
            if why.startswith("closed by"):  # the target's service failed after it accepted
                log.error("cannot connect to %s: %s", target, why)

        listener = Listener(host, port, handle)
        listener.start()
        try:
            await _online(term, maintainer)
            h, p = listener.address
            click.echo(f"forwarding {h}:{p} -> {target} via {term.server[0]}:{term.server[1]}",
                       err=True)
            await maintainer
        finally:
            await listener.close()
            maintainer.cancel()
            await term.close()
        return 0

    sys.exit(_run_client(main()))


@relay.command()
@terminal_options
@click.argument("target")
@click.option("--e2e", is_flag=True, help="End-to-end encryption with the target.")
@click.option("--encrypt", is_flag=True, help="Require encryption for this session.")
def pipe(target, e2e, encrypt, **opts) -> None:
    """Connect stdin/stdout to TARGET[/SERVICE] (for ssh -o ProxyCommand)."""
    from kakehashi.core import runner
    from kakehashi.core.stream import FdConn
    from kakehashi.relay.agent import RelayError, Terminal, run_session

    cfg = _terminal_config(**opts, spares=0)
    name, service = _target(target)

    async def main() -> int:
        term = Terminal(cfg)
        # made before the request: what the client has written by then (an ssh
        # client's banner) goes with it as early data, one round trip sooner
        app = FdConn(0, 1)
        try:
            link, info = await term.connect(name, service, encrypt=encrypt, e2e=e2e,
                                            app=app)
        except (RelayError, OSError) as exc:
            app.close()
            click.echo(f"kakehashi: cannot connect to {target}: {exc}", err=True)
            return 1
        except BaseException:
            app.close()
            raise
        try:
            why = await run_session(link, app, info, initiator=True)
        finally:
            await term.close()
        if why.startswith(("end-to-end", "session aborted", "closed by")):
            click.echo(f"kakehashi: {why}", err=True)
            return 1
        return 0

    sys.exit(runner.run(main()))


@relay.command()
@terminal_options
@opt.json_option
def who(as_json, **opts) -> None:
    """List logged-in users visible to you (their notify policy decides)."""
    from kakehashi.relay.agent import Terminal

    cfg = _terminal_config(**opts, spares=0)

    async def main() -> int:
        term = Terminal(cfg)
        try:
            users = await term.who()
        finally:
            await term.close()
        if as_json:
            import json

            click.echo(json.dumps([{"user": u.user, "encryption": u.encryption,
                                    "services": u.services, "connections": u.connections}
                                   for u in users]))
        else:
            for u in users:
                click.echo(f"{u.user}\tencryption={u.encryption}\t"
                           f"services={','.join(u.services) or '-'}\tconnections={u.connections}")
        return 0

    sys.exit(_run_client(main()))


@relay.command()
@terminal_options
@click.argument("targets", nargs=-1, required=True)
@click.option("--message", "-m", required=True, help="Text to send.")
def broadcast(targets, message, **opts) -> None:
    """Send one message to several logged-in users at once."""
    from kakehashi.relay.agent import Terminal

    cfg = _terminal_config(**opts, spares=0)

    async def main() -> int:
        term = Terminal(cfg)
        try:
            res = await term.broadcast(_split(targets), message.encode())
        finally:
            await term.close()
        click.echo(f"delivered: {', '.join(res.delivered) or '-'}")
        if res.missing:
            click.echo(f"not delivered (offline or not allowed): {', '.join(res.missing)}")
        return 0 if not res.missing else 3

    sys.exit(_run_client(main()))


@relay.command()
@terminal_options
def watch(**opts) -> None:
    """Print presence notices (logins/logouts) and messages as they arrive."""
    import asyncio

    from kakehashi.relay.agent import Terminal

    cfg = _terminal_config(**opts, spares=1)

    async def main() -> int:
        term = Terminal(cfg, on_message=lambda msg: _print_watch(msg))
        maintainer = asyncio.create_task(term.maintain())
        try:
            await _online(term, maintainer)
            await term.subscribe()
            click.echo("watching presence; Ctrl-C to stop", err=True)
            await maintainer
        finally:
            await term.close()
        return 0

    sys.exit(_run_client(main()))


def _print_watch(msg: m.Msg) -> None:
    from kakehashi.relay import messages as m

    if isinstance(msg, m.Presence):
        click.echo(f"{msg.user} {'online' if msg.online else 'offline'} "
                   f"encryption={msg.encryption}", nl=True)
        sys.stdout.flush()
    elif isinstance(msg, m.Deliver):
        click.echo(f"message from {msg.sender}: {msg.body.decode(errors='replace')}")
        sys.stdout.flush()


async def _online(term: Terminal, maintainer: asyncio.Task) -> None:
    """Wait until the first link is up; a refused login ends the command."""
    import asyncio

    waiter = asyncio.ensure_future(term.connected.wait())
    done, _ = await asyncio.wait({waiter, maintainer}, return_when=asyncio.FIRST_COMPLETED)
    if maintainer in done:
        waiter.cancel()
        maintainer.result()  # raises the RelayError


def _run_client(coro) -> int:
    from kakehashi.core import runner
    from kakehashi.relay.agent import RelayError

    async def wrapped() -> int:
        try:
            return await coro
        except RelayError as exc:
            click.echo(f"kakehashi: {exc}", err=True)
            return 1
        except OSError as exc:
            click.echo(f"kakehashi: {exc}", err=True)
            return 1

    return runner.run(wrapped())
