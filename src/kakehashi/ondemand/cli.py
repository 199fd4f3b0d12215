"""``kakehashi ondemand ...``: the manager, the two relays, tokens and the client side.

Imports are kept light at the top: the client commands (``grant``, ``revoke``, ...)
start, ask the manager and exit, and the servers import their stacks when they run.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click

from kakehashi.core import options
from kakehashi.core.options import hostport

ROLES = ("client", "edge", "inner", "admin")


def _default_db() -> str:
    from kakehashi.core.paths import state_dir

    return str(state_dir() / "ondemand.db")


def _fail(message: str) -> None:
    raise click.ClickException(message)


def _duration(text: str, hint: str) -> float:
    from kakehashi.ondemand.grants import GrantError, parse_duration

    try:
        return parse_duration(text)
    except GrantError as exc:
        raise click.BadParameter(exc.message, param_hint=hint) from None


@click.group()
def ondemand() -> None:
    """On-demand access (spec 002): time-limited, randomly placed entry ports to devices
    on a closed network.

    A manager (REST API) hands out grants; edges open the entry ports; inner relays
    reach the devices. Start with 'kakehashi demo ondemand'; see docs/ondemand.md.
    """


# -- tokens ----------------------------------------------------------------------------
db_option = options.db_option(_default_db, "ondemand.db",
                              "The manager's database: a SQLite file or redis://HOST:PORT[/DB].")


@ondemand.group()
def token() -> None:
    """API tokens with roles (client, edge, inner, admin)."""


@token.command("create")
@db_option
@click.option("--role", type=click.Choice(ROLES), required=True,
              help="client: grants and auth infos; edge / inner: a relay; admin: all.")
@click.option("--name", default="", help="A label for listings (also the inner relay's "
                                          "name a token may register devices for).")
def token_create(db: str, role: str, name: str) -> None:
    """Create a token and print it once (only its hash is stored)."""
    from kakehashi.core.identity import ApiTokens
    from kakehashi.core.store import open_store

    try:
        _, text = ApiTokens(open_store(db), roles=ROLES).create(role, name)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--name") from None
    click.echo(text)


@token.command("list")
@db_option
def token_list(db: str) -> None:
    """List tokens (ids and roles; the tokens themselves are not stored)."""
    from kakehashi.core.identity import ApiTokens
    from kakehashi.core.store import open_store

    rows = [{"id": t.id, "role": t.role, "name": t.name,
             "created": time.strftime("%Y-%m-%d %H:%M", time.localtime(c))}
            for t, c in ApiTokens(open_store(db)).list()]
    _table(rows, ["id", "role", "name", "created"])


@token.command("remove")
@db_option
@click.argument("token_id")
def token_remove(db: str, token_id: str) -> None:
    """Remove a token by id (its holder is refused from then on)."""
    from kakehashi.core.identity import ApiTokens
    from kakehashi.core.store import open_store

    if not ApiTokens(open_store(db)).remove(token_id):
        _fail(f"no token {token_id}")


# -- the manager -----------------------------------------------------------------------
@ondemand.command()
@options.listen_option("127.0.0.1:8700", "Where the REST API listens (HOST:PORT).")
@db_option
@options.server_tls_options(auto=False, default="on",
                            help="HTTPS for the API; 'off' is an explicit opt-in to plaintext.")
@options.audit_log_option
@click.option("--max-ttl", default="24h", show_default=True, help="Longest grant allowed.")
@click.option("--region", "regions", multiple=True, metavar="CIDR=REGION",
              help="Region table for --policy region (repeatable).")
@click.option("--carrier", "carriers", multiple=True, metavar="CIDR=CARRIER",
              help="Carrier table for --policy carrier (repeatable).")
@click.option("--open-timeout", default="5s", show_default=True,
              help="How long a grant waits for its edge to open the port.")
@click.option("--edge-wait", default="5s", show_default=True,
              help="How long a grant waits for a first edge when none is connected.")
@click.option("--retention", default="1h", show_default=True,
              help="How long ended grants and their events stay readable.")
def manager(listen: str, db: str, tls_mode: str, cert: str | None, key: str | None,
            audit_log: str | None, max_ttl: str, regions: tuple[str, ...],
            carriers: tuple[str, ...], open_timeout: str, edge_wait: str,
            retention: str) -> None:
    """The connection management device: REST API under /v1, OpenAPI at /openapi.json."""
    from kakehashi.ondemand import grants as g

    host, port = hostport(listen, "--listen")
    try:
        settings_kw = {
            "limits": g.GrantLimits(max_ttl=_duration(max_ttl, "--max-ttl")),
            "region_table": g.parse_table(regions, "--region"),
            "carrier_table": g.parse_table(carriers, "--carrier"),
            "open_timeout": _duration(open_timeout, "--open-timeout"),
            "edge_wait": _duration(edge_wait, "--edge-wait"),
            "retention": _duration(retention, "--retention"),
        }
    except g.GrantError as exc:
        raise click.UsageError(exc.message) from None
    options.check_cert_key(cert, key)

    async def main() -> None:
        import logging
        from pathlib import Path

        from kakehashi.core import tls, web
        from kakehashi.core.audit import AuditLog
        from kakehashi.core.paths import state_dir
        from kakehashi.core.store import describe, is_url, open_store
        from kakehashi.ondemand.manager import Manager, ManagerSettings, build_app

        certfile, keyfile = tls.listener_cert(host, cert, key) if tls_mode == "on" \
            else (None, None)
        # the relay CA lives beside a SQLite file; with a server URL, in the state dir
        ca_home = state_dir() / "ondemand.relay-ca" if is_url(db) \
            else Path(db).resolve().parent / (Path(db).name + ".relay-ca")
        replicas = None
        if is_url(db):  # replicas of this manager may share the Redis: hear them
            from kakehashi.ondemand.replicas import Replicas

            replicas = Replicas(db)
            logging.getLogger("kakehashi.ondemand.manager").info(
                "manager replica %s on %s", replicas.name, describe(db))
        mgr = Manager(open_store(db), audit=AuditLog(audit_log, system="ondemand"),
                      settings=ManagerSettings(**settings_kw), ca_home=ca_home,
                      replicas=replicas)
        sock = web.bind(host, port)
        await web.serve(build_app(mgr), sock, certfile=certfile, keyfile=keyfile,
                        name="ondemand manager")

    _run(main())


def _run(coro: Any) -> None:
    from kakehashi.core import runner

    sys.exit(runner.run(coro))


# -- the relays ------------------------------------------------------------------------
def _server_options(f: Any) -> Any:
    f = click.option("--ca", type=click.Path(exists=True, dir_okay=False),
                     help="Trust anchor for an https manager (default: system + dev CA).")(f)
    f = options.token_file_option(f)
    return click.option("--server", required=True, metavar="URL", callback=_url,
                        help="The manager: http://HOST:PORT or https://HOST:PORT "
                             "(HOST:PORT alone means https).")(f)


def _relay_server_options(f: Any) -> Any:
    """``--server`` repeatable: a relay holds one control channel, to the first manager
    replica that welcomes it, and moves to the next when that one goes away."""
    f = click.option("--ca", type=click.Path(exists=True, dir_okay=False),
                     help="Trust anchor for an https manager (default: system + dev CA).")(f)
    f = options.token_file_option(f)
    return click.option("--server", required=True, multiple=True, metavar="URL",
                        callback=_urls,
                        help="The manager: http://HOST:PORT or https://HOST:PORT "
                             "(HOST:PORT alone means https). Repeat it for manager "
                             "replicas on one Redis: the relay fails over between them.")(f)


def _url(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A manager address: a URL, or HOST:PORT meaning https (TLS is on by default)."""
    if value is None or "://" in value:
        return value
    hostport(value, "--server")
    return "https://" + value


def _urls(ctx: click.Context, param: click.Parameter,
          value: tuple[str, ...]) -> tuple[str, ...]:
    """Several manager addresses (each as :func:`_url`), duplicates dropped."""
    out: list[str] = []
    for item in value:
        url = _url(ctx, param, item)
        if url is not None and url not in out:
            out.append(url)
    return tuple(out)


def _token(path: str) -> str:
    from kakehashi.core.apiclient import ApiClientError, read_token

    try:
        return read_token(path)
    except ApiClientError as exc:
        raise click.BadParameter(exc.message, param_hint="--token-file") from None


def _manager_tls(server: str | tuple[str, ...], ca: str | None) -> Any:
    servers = (server,) if isinstance(server, str) else server
    if not any(s.startswith("https://") for s in servers):
        return None
    from kakehashi.core import tls

    return tls.client_context(ca)


def _name(name: str, hint: str = "--name") -> str:
    from kakehashi.core.identity import check_name

    try:
        return check_name(name, "relay names")
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=hint) from None


@ondemand.command()
@_relay_server_options
@click.option("--name", required=True, help="This edge's name.")
@click.option("--public-host", required=True, help="The address clients connect to.")
@click.option("--ports", required=True, metavar="A-B", help="Entry port range, e.g. 30000-30999.")
@click.option("--bind", default=None, help="Address the entry ports bind "
                                           "(default: --public-host if it is an IP, else all).")
@click.option("--region", default="", help="Region tag (--policy region).")
@click.option("--carrier", default="", help="Carrier tag (--policy carrier).")
@click.option("--cert", type=click.Path(exists=True, dir_okay=False),
              help="Certificate --tls grants' clients see (default: development CA).")
@click.option("--key", type=click.Path(exists=True, dir_okay=False), help="Private key of --cert.")
@options.audit_log_option
@click.option("--burst", type=click.IntRange(min=0), default=100, show_default=True,
              help="Connection attempts one grant takes at once before refusing (0: no limit).")
@options.metrics_listen_option
def edge(server: tuple[str, ...], token_file: str, ca: str | None, name: str, public_host: str,
         ports: str, bind: str | None, region: str, carrier: str, cert: str | None,
         key: str | None, audit_log: str | None, burst: int,
         metrics_listen: str | None) -> None:
    """A first relay: opens grants' entry ports and relays through inner relays."""
    import ipaddress

    from kakehashi.ondemand.grants import GrantError, parse_port_range

    try:
        lo_hi = parse_port_range(ports)
    except GrantError as exc:
        raise click.BadParameter(exc.message, param_hint="--ports") from None
    if bind is None:
        try:
            ipaddress.ip_address(public_host)
            bind = public_host
        except ValueError:
            bind = "0.0.0.0"
    options.check_cert_key(cert, key)
    tok = _token(token_file)
    name = _name(name)

    async def main() -> None:
        from kakehashi.core import metrics
        from kakehashi.core.audit import AuditLog
        from kakehashi.ondemand.edge import Edge, EdgeConfig

        cfg = EdgeConfig(server=server, token=tok, name=name, public_host=public_host,
                         ports=lo_hi, bind=bind, region=region, carrier=carrier,
                         manager_tls=_manager_tls(server, ca), cert=cert, key=key,
                         burst_rate=burst / 2, burst=burst)
        async with metrics.exporter(metrics_listen):
            await Edge(cfg, audit=AuditLog(audit_log, system="ondemand-edge")).run()

    _run(main())


@ondemand.command()
@_relay_server_options
@click.option("--name", required=True, help="This inner relay's name.")
@click.option("--listen", required=True, help="Where edges connect (HOST:PORT, mutual TLS).")
@click.option("--advertise", default=None, metavar="HOST:PORT",
              help="The address edges are told (default: --listen).")
@click.option("--device", "devices", multiple=True, metavar="IMSI=ADDRESS",
              help="A device this relay reaches (repeatable).")
@click.option("--link-tls", type=click.Choice(["on", "off"]), default="on", show_default=True,
              help="Mutual TLS on links from edges; 'off' (plain TCP, faster) only where "
                   "edges and this relay share a trusted network.")
@options.audit_log_option
@options.metrics_listen_option
def inner(server: tuple[str, ...], token_file: str, ca: str | None, name: str, listen: str,
          advertise: str | None, devices: tuple[str, ...], link_tls: str,
          audit_log: str | None, metrics_listen: str | None) -> None:
    """A second relay inside the closed network: dials only granted devices."""
    from kakehashi.ondemand.grants import GrantError, check_imsi

    addr = hostport(listen, "--listen")
    table: dict[str, str] = {}
    for item in devices:
        imsi, sep, address = item.partition("=")
        try:
            check_imsi(imsi.strip())
        except GrantError as exc:
            raise click.BadParameter(exc.message, param_hint="--device") from None
        if not sep or not address.strip():
            raise click.BadParameter(f"{item!r}: expected IMSI=ADDRESS", param_hint="--device")
        table[imsi.strip()] = address.strip()
    tok = _token(token_file)
    name = _name(name)

    async def main() -> None:
        from kakehashi.core import metrics
        from kakehashi.core.audit import AuditLog
        from kakehashi.ondemand.inner import Inner, InnerConfig

        cfg = InnerConfig(server=server, token=tok, name=name, listen=addr, devices=table,
                          advertise=advertise, manager_tls=_manager_tls(server, ca),
                          link_tls=link_tls == "on")
        async with metrics.exporter(metrics_listen):
            await Inner(cfg, audit=AuditLog(audit_log, system="ondemand-inner")).run()

    _run(main())


# -- the client side -------------------------------------------------------------------
def client_options(f: Any) -> Any:
    return _server_options(options.json_option(f))


def _api(server: str, token_file: str, ca: str | None) -> Any:
    from kakehashi.core.apiclient import ApiClient, ApiClientError

    try:
        return ApiClient(server, _token(token_file), ca=ca)
    except ApiClientError as exc:
        raise click.BadParameter(exc.message, param_hint="--server") from None


def _call(api: Any, method: str, path: str, body: Any = None, **kw: Any) -> Any:
    from kakehashi.core.apiclient import ApiClientError

    try:
        return api.request(method, path, body, **kw)
    except ApiClientError as exc:
        _fail(str(exc))


def _table(rows: list[dict[str, Any]], cols: list[str]) -> None:
    if not rows:
        click.echo("(none)")
        return
    cells = [[_cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    click.echo("  ".join(c.upper().ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip())
    for row in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ",".join(map(str, value)) or "-"
    return str(value)


def _out(doc: Any, as_json: bool, cols: list[str]) -> None:
    if as_json:
        click.echo(json.dumps(doc, indent=None if isinstance(doc, dict) else 1))
    else:
        _table(doc if isinstance(doc, list) else [doc], cols)


GRANT_COLS = ["id", "host", "port", "imsi", "target_port", "expires_at", "edge", "policy",
              "status"]


@ondemand.command()
@click.argument("targets", nargs=-1, required=True, metavar="IMSI:PORT...")
@client_options
@click.option("--ttl", default="1h", show_default=True, help="Validity, e.g. 30s, 10m, 1h.")
@click.option("--cidr", "cidrs", multiple=True, help="Client address range (repeatable).")
@click.option("--auth-info", default=None, help="Auth info ID: client certificates it checks.")
@click.option("--tls", is_flag=True, help="TLS ends at the edge (device leg plain).")
@click.option("--policy", type=click.Choice(["random", "region", "carrier", "load"]),
              default="random", show_default=True, help="How the edge is chosen.")
@click.option("--max-connections", type=click.IntRange(min=0), default=0, show_default=True,
              help="Concurrent connections on the grant (0: no limit).")
@click.option("--client-address", default=None, help="Your address, for region/carrier.")
@click.option("--carrier", default=None, help="Your carrier, for --policy carrier.")
def grant(targets: tuple[str, ...], server: str, token_file: str, ca: str | None,
          as_json: bool, ttl: str, cidrs: tuple[str, ...], auth_info: str | None, tls: bool,
          policy: str, max_connections: int, client_address: str | None,
          carrier: str | None) -> None:
    """Ask for access to IMSI:PORT; returns once the entry port accepts connections."""
    from kakehashi.ondemand.grants import GrantError, parse_target

    try:
        parsed = [parse_target(t) for t in targets]
    except GrantError as exc:
        raise click.BadParameter(exc.message, param_hint="IMSI:PORT") from None
    body = {"targets": [{"imsi": i, "port": p} for i, p in parsed],
            "ttl": _duration(ttl, "--ttl"), "cidrs": list(cidrs), "auth_info": auth_info,
            "tls": tls, "policy": policy, "max_connections": max_connections,
            "client_address": client_address, "carrier": carrier}
    made = _call(_api(server, token_file, ca), "POST", "/v1/grants", body)["grants"]
    if as_json:
        click.echo(json.dumps(made[0] if len(made) == 1 else made))
    else:
        _table(made, GRANT_COLS)
        for g in made:
            click.echo(f"{g['id']}: edge {g['edge']} chosen by {g['policy']}: {g['reason']}")


@ondemand.command("grants")
@client_options
@click.option("--all", "show_all", is_flag=True, help="Ended grants too.")
def grants_cmd(server: str, token_file: str, ca: str | None, as_json: bool,
               show_all: bool) -> None:
    """List grants."""
    rows = _call(_api(server, token_file, ca), "GET", "/v1/grants",
                 params={"all": "true"} if show_all else None)
    _out(rows, as_json, GRANT_COLS)


@ondemand.command()
@click.argument("grant_id")
@client_options
def revoke(grant_id: str, server: str, token_file: str, ca: str | None, as_json: bool) -> None:
    """Revoke a grant: its port closes and live connections are cut at once."""
    doc = _call(_api(server, token_file, ca), "DELETE", f"/v1/grants/{grant_id}")
    if as_json:
        click.echo(json.dumps(doc))
    else:
        click.echo(f"grant {doc['id']} revoked; port {doc['port']} on {doc['edge']} closed")


@ondemand.command()
@click.argument("grant_id")
@client_options
@click.option("--ttl", required=True, help="New remaining validity from now, e.g. 10m.")
def extend(grant_id: str, server: str, token_file: str, ca: str | None, as_json: bool,
           ttl: str) -> None:
    """Extend (or shorten) a live grant: it now expires TTL from now."""
    doc = _call(_api(server, token_file, ca), "POST", f"/v1/grants/{grant_id}/extend",
                {"ttl": _duration(ttl, "--ttl")})
    if as_json:
        click.echo(json.dumps(doc))
    else:
        click.echo(f"grant {doc['id']} now expires at {doc['expires_at']}")


@ondemand.group("auth-info")
def auth_info() -> None:
    """Authentication information: the CA (and pin) client certificates are checked against."""


@auth_info.command("add")
@click.option("--server", required=True, metavar="URL", callback=_url,
              help="The manager: http://HOST:PORT or https://HOST:PORT.")
@options.token_file_option
@click.option("--server-ca", type=click.Path(exists=True, dir_okay=False),
              help="Trust anchor for an https manager.")
@click.option("--ca", "ca_file", type=click.Path(exists=True, dir_okay=False), required=True,
              help="The CA certificate (PEM) that signs the clients' certificates.")
@click.option("--pin", type=click.Path(exists=True, dir_okay=False),
              help="The one public key (or certificate) allowed, PEM.")
@options.json_option
def auth_info_add(server: str, token_file: str, server_ca: str | None, ca_file: str,
                  pin: str | None, as_json: bool) -> None:
    """Register a CA (S1-S4); prints the auth info ID to give to 'grant --auth-info'."""
    from pathlib import Path

    body = {"ca_pem": Path(ca_file).read_text(errors="replace"),
            "pin_pem": Path(pin).read_text(errors="replace") if pin else None}
    doc = _call(_api(server, token_file, server_ca), "POST", "/v1/auth-infos", body)
    click.echo(json.dumps(doc) if as_json else doc["id"])


@auth_info.command("list")
@client_options
def auth_info_list(server: str, token_file: str, ca: str | None, as_json: bool) -> None:
    """List registered auth infos."""
    _out(_call(_api(server, token_file, ca), "GET", "/v1/auth-infos"), as_json,
         ["id", "pin", "created_at"])


@ondemand.command()
@client_options
def devices(server: str, token_file: str, ca: str | None, as_json: bool) -> None:
    """Devices the inner relays registered."""
    _out(_call(_api(server, token_file, ca), "GET", "/v1/devices"), as_json,
         ["imsi", "address", "inner", "online"])


@ondemand.command()
@client_options
def edges(server: str, token_file: str, ca: str | None, as_json: bool) -> None:
    """Edge relays, their port ranges, tags and load."""
    _out(_call(_api(server, token_file, ca), "GET", "/v1/edges"), as_json,
         ["name", "public_host", "ports", "region", "carrier", "online", "sessions",
          "free_ports"])


EVENT_COLS = ["time", "event", "client", "reason", "bytes_up", "bytes_down", "duration"]


@ondemand.command()
@click.argument("grant_id")
@client_options
@click.option("--follow", "-f", is_flag=True, help="Keep printing new events as they come.")
def events(grant_id: str, server: str, token_file: str, ca: str | None, as_json: bool,
           follow: bool) -> None:
    """A grant's audit trail: created, access, connected, denied, closed, expired..."""
    api = _api(server, token_file, ca)
    path = f"/v1/grants/{grant_id}/events"
    evs = _call(api, "GET", path)
    if not follow:
        if as_json:
            click.echo(json.dumps(evs, indent=1))
        else:
            _table(evs, EVENT_COLS)
        return
    after, ended = 0, False
    while True:
        for ev in evs:
            after = max(after, ev.get("seq", 0))
            ended = ended or ev["event"] in ("expired", "deleted")
            if as_json:
                click.echo(json.dumps(ev))
            else:
                extra = " ".join(f"{k}={ev[k]}" for k in ev
                                 if k not in ("event", "grant", "ts", "time", "seq"))
                click.echo(f"{ev['time']} {ev['event']:<9} {extra}")
        sys.stdout.flush()
        # once the grant has ended only its last connections' events can follow
        evs = _call(api, "GET", path, params={"after": after, "wait": 2 if ended else 25},
                    timeout=40)
        if not evs and ended:
            return
