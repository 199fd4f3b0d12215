"""``kakehashi switch ...``: the socket switch (spec 003).

Imports stay light at the top: the client commands (``list``, ``open``, ...) start,
ask the server and exit; the server and the gateway import their stacks when they run.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from kakehashi.core import options
from kakehashi.core.options import hostport
from kakehashi.switch import MAX_GATEWAYS_PER_USER, MAX_TUNNELS_PER_USER

ROLES = ("asp", "user", "admin")


def _default_db() -> str:
    from kakehashi.core.paths import state_dir

    return str(state_dir() / "switch.db")


def _fail(message: str) -> None:
    raise click.ClickException(message)


def _run(coro: Any) -> None:
    from kakehashi.core import runner

    sys.exit(runner.run(coro))


@click.group()
def switch() -> None:
    """The socket switch (spec 003): ASPs register services, users pick them from a
    catalog, and a tunnel between two gateways gives the user's unmodified client a
    local pseudo socket of the service; only outbound HTTP(S) from either side.

    Start with 'kakehashi demo switch'; see docs/switch.md.
    """


db_option = options.db_option(_default_db, "switch.db",
                              "The switch's database: a SQLite file or redis://HOST:PORT[/DB].")


# -- users ------------------------------------------------------------------------------
@switch.group()
def user() -> None:
    """Users of the switch: asp (registers services), user (uses them), admin."""


@user.command("add")
@click.argument("name")
@db_option
@click.option("--role", type=click.Choice(ROLES), default="user", show_default=True)
@options.password_options
def user_add(name: str, db: str, role: str, password_stdin: bool,
             password_file: str | None) -> None:
    """Add user NAME with a password (from stdin, a file or KAKEHASHI_PASSWORD)."""
    from kakehashi.core.store import open_store
    from kakehashi.switch.server import SwitchUsers

    options.check_name(name)
    pw = options.password(password_stdin, password_file, confirm=True)
    if not SwitchUsers(open_store(db)).add({"name": name, "role": role}, pw):
        _fail(f"user {name} exists")
    click.echo(f"added {role} {name}")


@user.command("list")
@db_option
@options.json_option
def user_list(db: str, as_json: bool) -> None:
    """List users and their roles."""
    from kakehashi.core.store import open_store
    from kakehashi.switch.server import SwitchUsers

    rows = [{"name": u["name"], "role": u.get("role", "user")}
            for u in SwitchUsers(open_store(db)).list()]
    _out(rows, ["name", "role"], as_json)


@user.command("remove")
@click.argument("name")
@db_option
def user_remove(name: str, db: str) -> None:
    """Remove user NAME."""
    from kakehashi.core.store import open_store
    from kakehashi.switch.server import SwitchUsers

    if not SwitchUsers(open_store(db)).remove(name):
        _fail(f"no user {name}")


# -- the server -------------------------------------------------------------------------
@switch.command()
@options.listen_option("127.0.0.1:8443", "Where the one HTTP(S) port listens (API, "
                                         "catalog, gateway links).")
@db_option
@options.server_tls_options(auto=False, default="on",
                            help="HTTPS; 'off' is an explicit opt-in to plaintext.")
@options.audit_log_option
@options.timeout_option("setup", 10.0, "How long a tunnel waits for both gateways (S4).")
@options.timeout_option("delete", 10.0, "How long a deletion waits for both gateways (S7).")
@click.option("--poll-hold", type=click.FloatRange(min=0.5, max=120), default=20.0,
              show_default=True, help="How long a long poll is held when nothing waits.")
@click.option("--offline-grace", type=click.FloatRange(min=0), default=60.0,
              show_default=True,
              help="How long a gateway may be away before its tunnels are deleted.")
@options.timeout_option("client", 30.0, "How long a client may take to send a request's "
                        "head, or to take some of a reply that waits for it, before its "
                        "connection is cut.")
@click.option("--max-gateways-per-user", type=click.IntRange(min=0),
              default=MAX_GATEWAYS_PER_USER, show_default=True,
              help="Gateway names one user may own (0: no limit; admins have none); a "
                   "gateway with a new name beyond it is refused.")
@click.option("--max-tunnels-per-user", type=click.IntRange(min=0),
              default=MAX_TUNNELS_PER_USER, show_default=True,
              help="Tunnels one user may hold at once, on every node together (0: no "
                   "limit; admins have none); opening one more is refused.")
@click.option("--node", default="", metavar="NAME",
              help="This server's name among several switch nodes sharing one Redis "
                   "store (--db redis://...): a tunnel's gateways may then be attached "
                   "to different nodes.")
def server(listen: str, db: str, tls_mode: str, cert: str | None, key: str | None,
           audit_log: str | None, setup_timeout: float, delete_timeout: float,
           poll_hold: float, offline_grace: float, client_timeout: float,
           max_gateways_per_user: int, max_tunnels_per_user: int, node: str) -> None:
    """The socket management server and switch server: JSON API under /v1 (OpenAPI at
    /openapi.json), the web catalog at /, and the gateways' tunnel endpoint."""
    host, port = hostport(listen, "--listen")
    options.check_cert_key(cert, key)
    if node:
        from kakehashi.core.identity import valid_name
        from kakehashi.core.store import is_url

        if not valid_name(node):
            raise click.BadParameter("1-64 of A-Z a-z 0-9 _ . @ -", param_hint="--node")
        if not is_url(db):
            raise click.BadParameter("several nodes share a Redis store: give --db "
                                     "redis://HOST:PORT", param_hint="--node")

    async def main() -> None:
        from kakehashi.core import tls, web
        from kakehashi.core.audit import AuditLog
        from kakehashi.core.store import open_store
        from kakehashi.switch.server import ServerSettings, SwitchServer, build_app

        certfile, keyfile = tls.listener_cert(host, cert, key) if tls_mode == "on" \
            else (None, None)
        srv = SwitchServer(open_store(db), audit=AuditLog(audit_log, system="switch"),
                           settings=ServerSettings(setup_timeout=setup_timeout,
                                                   delete_timeout=delete_timeout,
                                                   poll_hold=poll_hold,
                                                   offline_grace=offline_grace,
                                                   max_gateways_per_user=max_gateways_per_user,
                                                   max_tunnels_per_user=max_tunnels_per_user),
                           node=node, cluster_url=db if node else "")
        import asyncio

        if srv.cluster is not None:
            await srv.cluster.start()

        serving = asyncio.ensure_future(web.serve(build_app(srv), web.bind(host, port),
                                                  certfile=certfile, keyfile=keyfile,
                                                  name="switch server",
                                                  client_timeout=client_timeout))
        try:
            await asyncio.shield(serving)
        finally:
            # end the gateways' links first: uvicorn's graceful stop waits for them
            srv.stop_links()
            serving.cancel()
            await asyncio.gather(serving, return_exceptions=True)
            if srv.cluster is not None:
                await srv.cluster.close()

    _run(main())


# -- clients ----------------------------------------------------------------------------
def _url(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A server address: a URL, or HOST:PORT meaning https (TLS is on by default)."""
    if value is None or "://" in value:
        return value
    hostport(value, "--server")
    return "https://" + value


def proxy_options(f: Any) -> Any:
    f = click.option("--proxy-user", help="User for the proxy (else from the --proxy URL).")(f)
    return click.option(
        "--proxy", metavar="http://[USER@]HOST:PORT",
        help="Reach the server through this HTTP CONNECT proxy (Basic auth: the password "
             "from the URL or KAKEHASHI_PROXY_PASSWORD).")(f)


def _proxy(proxy: str | None, proxy_user: str | None) -> Any:
    from kakehashi.core.httpdial import Proxy

    try:
        return Proxy.parse(proxy, proxy_user) if proxy else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--proxy") from None


def client_options(f: Any) -> Any:
    f = proxy_options(f)
    f = click.option("--ca", type=click.Path(exists=True, dir_okay=False),
                     help="Trust anchor for an https server (default: system + dev CA).")(f)
    f = options.password_options(f)
    f = options.user_option("Your user name on the switch.")(f)
    return click.option("--server", required=True, metavar="URL", callback=_url,
                        help="The switch server: https://HOST:PORT or http://HOST:PORT "
                             "(HOST:PORT alone means https).")(f)


def _client(server: str, user: str, password_stdin: bool, password_file: str | None,
            ca: str | None, proxy: str | None = None, proxy_user: str | None = None) -> Any:
    from kakehashi.core.apiclient import ApiClient, ApiClientError

    px = _proxy(proxy, proxy_user)
    pw = options.password(password_stdin, password_file)
    try:
        return ApiClient(server, ca=ca, basic=(user, pw), timeout=60, proxy=px)
    except ApiClientError as exc:
        raise click.BadParameter(exc.message, param_hint="--server") from None


def _call(client: Any, method: str, path: str, body: Any = None, **params: Any) -> Any:
    from kakehashi.core.apiclient import ApiClientError

    try:
        return client.request(method, path, body, params=params or None)
    except ApiClientError as exc:
        _fail(str(exc))


def _out(rows: list[dict[str, Any]], cols: list[str], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("(none)")
        return
    cells = [[_cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    click.echo("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip())
    for row in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def _cell(v: Any) -> str:
    if isinstance(v, list):
        return ",".join(map(str, v)) or "-"
    if v is None or v == "":
        return "-"
    return str(v)


@switch.command()
@click.option("--name", required=True, help="This gateway's name (yours once used).")
@client_options
@click.option("--transport", type=click.Choice(["auto", "websocket", "poll"]),
              default="auto", show_default=True,
              help="WebSocket, HTTP/1.1 long polling, or WebSocket falling back to polling.")
def gateway(name: str, server: str, user: str, password_stdin: bool,
            password_file: str | None, ca: str | None, proxy: str | None,
            proxy_user: str | None, transport: str) -> None:
    """A gateway (edge client): outbound only to the server, it builds and deletes the
    pseudo sockets the server instructs (S3/S6) and carries their streams."""
    options.check_name(name, "--name", "gateway names")
    px = _proxy(proxy, proxy_user)
    pw = options.password(password_stdin, password_file)

    async def main() -> int:
        from kakehashi.switch.gateway import Fatal, Gateway, GatewayConfig

        gw = Gateway(GatewayConfig(server=server, user=user, password=pw, name=name,
                                   transport=transport, proxy=px, ca=ca))
        try:
            await gw.run()
        except Fatal as exc:
            click.echo(f"kakehashi: {exc}", err=True)
            return 1
        return 0

    _run(main())


@switch.command()
@click.argument("name")
@client_options
@click.option("--gateway", required=True, help="The (server-side) gateway that reaches it.")
@click.option("--target", required=True, metavar="HOST:PORT",
              help="The real server, as that gateway reaches it.")
@click.option("--udp", is_flag=True, help="A UDP service (default TCP).")
@click.option("--allow", multiple=True, metavar="USER",
              help="Users it is valid for (repeatable, or comma-separated; * for all).")
@click.option("--max-connections", type=click.IntRange(min=0), default=0, show_default=True,
              help="Connections at once over all its tunnels (0: no limit).")
@options.json_option
def register(name: str, server: str, user: str, password_stdin: bool,
             password_file: str | None, ca: str | None, proxy: str | None,
             proxy_user: str | None, gateway: str, target: str,
             udp: bool, allow: tuple[str, ...], max_connections: int, as_json: bool) -> None:
    """S1: register service NAME (its socket information and its usage clients)."""
    hostport(target, "--target")
    users = [u.strip() for a in allow for u in a.split(",") if u.strip()]
    client = _client(server, user, password_stdin, password_file, ca, proxy, proxy_user)
    doc = _call(client, "POST", "/v1/services", {
        "name": name, "gateway": gateway, "target": target, "proto": "udp" if udp else "tcp",
        "allow": users, "max_connections": max_connections})
    if as_json:
        click.echo(json.dumps(doc))
    else:
        click.echo(f"registered {doc['name']} ({doc['proto']} {doc['target']} via "
                   f"{doc['gateway']}) for {', '.join(doc['allow']) or 'nobody else'}")


@switch.command()
@click.argument("name")
@client_options
def unregister(name: str, server: str, user: str, password_stdin: bool,
               password_file: str | None, ca: str | None, proxy: str | None,
               proxy_user: str | None) -> None:
    """Withdraw service NAME (its tunnels are deleted)."""
    client = _client(server, user, password_stdin, password_file, ca, proxy, proxy_user)
    _call(client, "DELETE", f"/v1/services/{name}")
    click.echo(f"withdrew {name}")


@switch.command("list")
@client_options
@options.json_option
def list_(server: str, user: str, password_stdin: bool, password_file: str | None,
          ca: str | None, proxy: str | None, proxy_user: str | None,
          as_json: bool) -> None:
    """S2: the services valid for you (an ASP also sees its own with live counts)."""
    client = _client(server, user, password_stdin, password_file, ca, proxy, proxy_user)
    rows = _call(client, "GET", "/v1/services")
    _out(rows, ["name", "proto", "owner", "online", "connections", "max_connections"],
         as_json)


@switch.command("open")
@click.argument("service")
@client_options
@click.option("--gateway", required=True, help="Your (client-side) gateway.")
@click.option("--listen", default="127.0.0.1:0", show_default=True, metavar="HOST:PORT",
              help="Where the pseudo socket listens, in your gateway.")
@options.json_option
def open_(service: str, server: str, user: str, password_stdin: bool,
          password_file: str | None, ca: str | None, proxy: str | None,
          proxy_user: str | None, gateway: str, listen: str, as_json: bool) -> None:
    """S2 selection -> S3 -> S4 -> S5: open a tunnel to SERVICE; returns once the pseudo
    socket accepts (or says why the setup was rolled back)."""
    hostport(listen, "--listen")
    client = _client(server, user, password_stdin, password_file, ca, proxy, proxy_user)
    t = _call(client, "POST", "/v1/tunnels",
              {"service": service, "gateway": gateway, "listen": listen})
    if as_json:
        click.echo(json.dumps({"tunnel": t["tunnel"], "listen": t["listen"],
                               "state": t["state"], "service": t["service"],
                               "gateway": t["gateway"]}))
    else:
        click.echo(f"tunnel {t['tunnel']}: {t['service']} at {t['listen']} ({t['state']})")


@switch.command("close")
@click.argument("tunnel")
@client_options
@options.json_option
def close(tunnel: str, server: str, user: str, password_stdin: bool,
          password_file: str | None, ca: str | None, proxy: str | None,
          proxy_user: str | None, as_json: bool) -> None:
    """S6 -> S7: delete TUNNEL (both pseudo sockets)."""
    client = _client(server, user, password_stdin, password_file, ca, proxy, proxy_user)
    t = _call(client, "DELETE", f"/v1/tunnels/{tunnel}")
    if as_json:
        click.echo(json.dumps({"tunnel": t["tunnel"], "state": t["state"],
                               "reason": t["reason"]}))
    else:
        click.echo(f"tunnel {t['tunnel']}: {t['state']}")


@switch.command()
@client_options
@click.option("--all", "everything", is_flag=True, help="Deleted tunnels too.")
@options.json_option
def tunnels(server: str, user: str, password_stdin: bool, password_file: str | None,
            ca: str | None, proxy: str | None, proxy_user: str | None, everything: bool,
            as_json: bool) -> None:
    """Your tunnels and their states (setting, established, deleting, deleted)."""
    client = _client(server, user, password_stdin, password_file, ca, proxy, proxy_user)
    rows = _call(client, "GET", "/v1/tunnels", all=int(everything))
    _out(rows, ["tunnel", "service", "gateway", "listen", "state", "connections", "reason"],
         as_json)
