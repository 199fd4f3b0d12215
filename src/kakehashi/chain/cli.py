"""``kakehashi chain ...``: proxies of a multi-firewall UDP chain and its client ends.

Tables (keys, routes, ACL) are TOML tables/arrays in ``[chain.proxy]`` and
``[chain.forward]``; on the command line the same keys are repeatable flags
(``--key NAME=@FILE``, ``--route NET=HOP``, ``--acl user=U,from=NET,ports=P``).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from kakehashi.core import options as opt
from kakehashi.core.fastpath import DEFAULT_MODE, MODES

if TYPE_CHECKING:
    from kakehashi.chain.forward import ForwardConfig

# The heavy modules (crypto, the proxy, the forwarder and their tables) are imported by
# the commands that use them: a command, or its --help, loads only what it needs, and
# every other system's command starts without them (see kakehashi.cli).

log = logging.getLogger("kakehashi.chain")


class TableOption(click.Option):
    """A repeatable ``NAME=VALUE`` flag that also takes a TOML table (or an array of
    tables) from the config file, so ``keys = { fw1 = "..." }`` and ``--key fw1=...``
    mean the same."""

    def type_cast_value(self, ctx: click.Context, value: Any) -> Any:
        if isinstance(value, dict):
            value = [f"{k}={v}" for k, v in value.items()]
        elif isinstance(value, list | tuple):
            value = [",".join(f"{k}={v}" for k, v in item.items()) if isinstance(item, dict)
                     else item for item in value]
        elif isinstance(value, str):
            value = [value]
        return super().type_cast_value(ctx, value)


def table_option(*decls: str, **kwargs: Any) -> Any:
    return click.option(*decls, cls=TableOption, multiple=True, **kwargs)


def _keys(items: tuple[str, ...], hint: str) -> dict[str, bytes]:
    """``NAME=BASE64`` or ``NAME=@FILE`` (a key file keeps the secret off the command line)."""
    from kakehashi.chain import tables

    try:
        table = tables.parse_assignments(items, "key")
        for name, value in table.items():
            if value.startswith("@"):
                table[name] = Path(value[1:]).read_text().strip()
        return tables.parse_keys(table)
    except (ValueError, OSError) as exc:
        raise click.BadParameter(str(exc), param_hint=hint) from None


def _parse(fn: Any, value: Any, hint: str) -> Any:
    try:
        return fn(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=hint) from None


def fast_path_option(f: Any) -> Any:
    """``--fast-path auto|on|off|kernel`` (config: fast_path): how the datagram forwarder
    is driven. Every way makes the same port-record decisions; auto (the default) is the
    kernel path where the process can use it and the user-space fast path elsewhere; off
    is for comparison and fallback."""
    return click.option(
        "--fast-path", type=click.Choice(list(MODES)), default=DEFAULT_MODE,
        show_default=True,
        help="auto: the kernel path where this process can (root or CAP_NET_ADMIN, and "
             "libnftables), else "
             "on, with a line at start saying which and why; kernel: once a session's port "
             "record has locked, nftables rewrites its datagrams in the kernel (sessions "
             "that encrypt or decrypt here, or whose peers are on other hosts, stay in user "
             "space); an error at start when unavailable; on: relay datagrams in user space "
             "straight from socket readiness callbacks (a batch per wakeup in a burst); "
             "off: asyncio datagram transports. All follow the same port records. The "
             "kernel path's nftables table goes at exit; one left by a killed process "
             "goes when the next kernel-path process starts, or at once with "
             "'kakehashi chain clean-kernel'.")(f)


def _check_fast_path(mode: str) -> None:
    """``--fast-path kernel`` where the kernel path is unavailable: a clear error before
    anything starts (``auto`` falls back instead); prepares this process's table."""
    from kakehashi.core import kernelpath

    try:
        kernelpath.for_mode(mode)
    except kernelpath.KernelPathError as exc:
        raise click.ClickException(str(exc)) from None


@click.group()
def chain() -> None:
    """UDP through several firewalls: proxies with hop-by-hop port exchange (spec 004)."""


@chain.command()
def keygen() -> None:
    """Print a new random shared key (base64) for a pair of neighbours: give it to both."""
    from kakehashi.core import crypto

    click.echo("# a new shared key; put it in both sides' keys table", err=True)
    click.echo(crypto.new_shared_key())


@chain.command()
@click.option("--name", required=True, help="This proxy's ID (its neighbours' keys name it).")
@opt.listen_option("0.0.0.0:1091", "HOST:PORT of the control port (relay requests).")
@click.option("--udp-ports", default="40000-40999", show_default=True, metavar="LOW-HIGH",
              help="Range the per-session UDP data ports come from (what the firewall opens).")
@click.option("--udp-host", default=None, metavar="HOST",
              help="Address the data ports bind to (default: the --listen host).")
@table_option("--key", "keys", metavar="ID=BASE64|@FILE",
              help="Shared key with a neighbour (client or proxy); repeatable. Config: keys.")
@table_option("--route", "routes", metavar="NET=HOP",
              help="Relay route: destination network -> NAME@HOST:PORT of the next proxy, or "
                   "'direct'; repeatable. Config: routes.")
@table_option("--acl", "acl", metavar="user=ID,from=NET,ports=any|LOW-HIGH",
              help="Access control entry; repeatable. Config: acl (array of tables).")
@table_option("--forwarder", "forwarders", metavar="ID",
              help="A proxy that may forward requests for users (one before this proxy); "
                   "repeatable. Without any, every key holder that is no ACL user may, "
                   "unless the ACL has a wildcard user. Config: forwarders (array).")
@opt.audit_log_option
@opt.timeout_option("auth", 10.0, "Seconds a requester has to authenticate and ask.")
@opt.timeout_option("connect", 5.0, "Seconds to reach the next proxy.")
@opt.timeout_option("idle", 300.0, "Seconds without datagrams after which a session ends.")
@click.option("--max-sessions", type=click.IntRange(min=0), default=0, show_default=True,
              help="Sessions at once (0: bounded by the port range only).")
@click.option("--max-per-user", type=click.IntRange(min=0), default=16, show_default=True,
              help="Sessions one user may hold at once (0: no limit).")
@click.option("--max-per-client", type=click.IntRange(min=0), default=64, show_default=True,
              help="Sessions one client address may hold at once (for a forwarded "
                   "request: the origin the forwarding proxy vouches for), and setups in "
                   "progress from one connection address (a forwarding proxy's only until "
                   "its request is admitted) (0: no limit).")
@click.option("--max-connections", type=click.IntRange(min=0), default=4096, show_default=True,
              help="Control connections served at once, setups included (0: no limit); "
                   "beyond it new ones wait in the listen backlog.")
@opt.metrics_listen_option
@fast_path_option
def proxy(name: str, listen: str, udp_ports: str, udp_host: str | None, keys: tuple[str, ...],
          routes: tuple[str, ...], acl: tuple[str, ...], forwarders: tuple[str, ...],
          audit_log: str | None,
          auth_timeout: float, connect_timeout: float, idle_timeout: float,
          max_sessions: int, max_per_user: int, max_per_client: int,
          max_connections: int, metrics_listen: str | None, fast_path: str) -> None:
    """One firewall's proxy: authenticates, checks access, exchanges ports, relays UDP."""
    import asyncio

    from kakehashi.chain import tables
    from kakehashi.chain.proxy import ChainProxy, ProxyConfig
    from kakehashi.core import runner
    from kakehashi.core.audit import AuditLog

    host, port = opt.hostport(listen, "--listen")
    cfg = ProxyConfig(
        name=_parse(tables.parse_name, name, "--name"), host=host, port=port,
        udp_ports=_parse(tables.parse_ports, udp_ports, "--udp-ports"),
        udp_host=udp_host, keys=_keys(keys, "--key"),
        routes=_parse(tables.parse_routes, tables.parse_assignments(routes, "route"),
                      "--route"),
        acl=_parse(tables.parse_acl, [tables.parse_acl_flag(a) for a in acl], "--acl"),
        forwarders=frozenset(_parse(tables.parse_name, f, "--forwarder") for f in forwarders),
        auth_timeout=auth_timeout, connect_timeout=connect_timeout, idle_timeout=idle_timeout,
        max_sessions=max_sessions, max_per_user=max_per_user, max_per_client=max_per_client,
        max_connections=max_connections, fast_path=fast_path,
        audit=AuditLog(audit_log, system="chain"))
    if cfg.udp_ports == tables.ANY_PORT:
        raise click.BadParameter("give a range, e.g. 40000-40999", param_hint="--udp-ports")
    _check_fast_path(fast_path)

    async def main() -> None:
        server = ChainProxy(cfg)
        await server.start()
        h, p = server.address
        log.info("chain proxy %s listening on %s:%d (data ports %s, %d routes, %d ACL rules)",
                 cfg.name, h, p, cfg.udp_ports, len(cfg.routes.rows), len(cfg.acl.rules))
        from kakehashi.core import metrics  # servers only: clients start without it

        try:
            async with metrics.exporter(metrics_listen):
                await asyncio.Event().wait()
        finally:
            await server.close()

    sys.exit(runner.run(main()))


def client_options(f: Any) -> Any:
    """What every client end of a chain says: who, with which keys, through which hop, to
    which server, in which mode."""
    f = opt.timeout_option("setup", 10.0, "Seconds the whole chain setup may take.")(f)
    f = click.option("--encrypt/--no-encrypt", default=False, show_default=True,
                     help="Encrypt datagrams between this client and the last proxy.")(f)
    f = click.option("--mode", type=click.Choice(["recursive", "iterative"]),
                     default="recursive", show_default=True,
                     help="recursive: each proxy asks the next (Fig. 9); iterative: the "
                          "client extends the chain itself (Fig. 13).")(f)
    f = click.option("--first-hop", required=True, metavar="NAME@HOST:PORT",
                     help="The first proxy (its ID and control port).")(f)
    f = table_option("--key", "keys", metavar="ID=BASE64|@FILE",
                     help="Shared key with a proxy it authenticates with; repeatable. "
                          "Config: keys.")(f)
    return click.option("--id", "user", required=True, help="This client's user ID.")(f)


def _client_config(user: str, keys: tuple[str, ...], first_hop: str, to: str,
                   udp_listen: str, mode: str, encrypt: bool,
                   setup_timeout: float) -> ForwardConfig:
    from kakehashi.chain import tables
    from kakehashi.chain.forward import ForwardConfig

    return ForwardConfig(
        user=_parse(tables.parse_name, user, "--id"), keys=_keys(keys, "--key"),
        first_hop=_parse(tables.parse_hop, first_hop, "--first-hop"),
        to=opt.hostport(to, "--to"), udp_listen=opt.hostport(udp_listen, "--udp-listen"),
        mode=mode,  # type: ignore[arg-type]
        encrypt=encrypt, setup_timeout=setup_timeout)


@chain.command()
@client_options
@click.option("--to", required=True, metavar="HOST:PORT", help="The server's UDP endpoint (P6).")
@click.option("--udp-listen", default="127.0.0.1:5353", show_default=True, metavar="HOST:PORT",
              help="Local UDP port applications send to.")
@fast_path_option
def forward(user: str, keys: tuple[str, ...], first_hop: str, to: str, udp_listen: str,
            mode: str, encrypt: bool, setup_timeout: float, fast_path: str) -> None:
    """Carry a local UDP port through the chain to the server."""
    from kakehashi.chain.forward import run_forward
    from kakehashi.core import runner

    cfg = _client_config(user, keys, first_hop, to, udp_listen, mode, encrypt, setup_timeout)
    cfg.fast_path = fast_path
    _check_fast_path(fast_path)
    sys.exit(runner.run(run_forward(cfg)))


@chain.command("clean-kernel")
@opt.json_option
def clean_kernel(as_json: bool) -> None:
    """Remove the nftables tables that kernel-path processes left behind when they died
    without exiting (SIGKILL, a crash). A running process's table is left alone.

    A process removes its own table when it exits, and the next kernel-path process
    removes the tables of dead ones when it starts; until then a dead process's rewrites
    stay in the kernel. Run this from a service manager after the proxy stops (systemd:
    ExecStopPost=kakehashi chain clean-kernel) to close that window."""
    from kakehashi.core import kernelpath

    why = kernelpath.KernelPath.unavailable()
    if why is not None:
        raise click.ClickException(f"cannot change nftables here: {why}")
    gone = kernelpath.clean_stale()
    if as_json:
        click.echo(json.dumps({"removed": gone}))
    elif gone:
        for name in gone:
            click.echo(f"removed {name}")
    else:
        click.echo("nothing to remove: no table of a dead kakehashi process")


@chain.command()
@client_options
@click.option("--to", required=True, metavar="HOST:PORT", help="The server's UDP endpoint (P6).")
@opt.json_option
def trace(user: str, keys: tuple[str, ...], first_hop: str, to: str, mode: str, encrypt: bool,
          setup_timeout: float, as_json: bool) -> None:
    """Build a chain towards --to and show each hop, when it answered and its ports, or
    which hop refused and why (exit status 1). Iterative mode shows every hop's answer."""
    from kakehashi.core import runner

    cfg = _client_config(user, keys, first_hop, to, "127.0.0.1:0", mode, encrypt,
                         setup_timeout)
    sys.exit(runner.run(_trace(cfg, as_json)))


@chain.command()
@client_options
@opt.listen_option("127.0.0.1:1080", "HOST:PORT of the SOCKS5 server.")
@click.option("--max-destinations", type=click.IntRange(min=1), default=16, show_default=True,
              help="Destinations (chains) one UDP association may hold at once.")
@opt.connection_limit_options(
    1024, "Each control connection holds at most one UDP association.", max_per_client=64,
    refusal="answered with SOCKS5 reply 2 (connection not allowed by ruleset) and closed")
@opt.timeout_option("handshake", 10.0, "Seconds a client has to finish its SOCKS5 request.")
def socks(user: str, keys: tuple[str, ...], first_hop: str, mode: str, encrypt: bool,
          setup_timeout: float, listen: str, max_destinations: int, max_connections: int,
          max_per_client: int, handshake_timeout: float) -> None:
    """A SOCKS5 server whose UDP ASSOCIATE rides the chain (CONNECT is refused)."""
    from kakehashi.chain.socks import SocksConfig, run_socks
    from kakehashi.core import runner

    host, port = opt.hostport(listen, "--listen")
    base = _client_config(user, keys, first_hop, "0.0.0.0:0", "127.0.0.1:0", mode, encrypt,
                          setup_timeout)
    sys.exit(runner.run(run_socks(SocksConfig(
        host, port, base, max_destinations, handshake_timeout=handshake_timeout,
        max_connections=max_connections, max_per_client=max_per_client))))


async def _trace(cfg: ForwardConfig, as_json: bool) -> int:
    from kakehashi.chain.forward import build_chain
    from kakehashi.chain.setup import SetupFailed

    progress: list[Any] = []
    refused: SetupFailed | None = None
    chain_ = None
    try:
        chain_ = await build_chain(cfg, progress)
    except SetupFailed as exc:
        refused = exc
    finally:
        if chain_ is not None:
            chain_.close()
            chain_.data_sock.close()  # type: ignore[attr-defined]
    hops = [{"hop": r.hop, "path": r.path, "ms": round(sec * 1000, 2), "near": str(r.near),
             "far": str(r.far), "complete": r.complete} for r, sec in progress]
    result: dict[str, Any] = {"to": f"{cfg.to[0]}:{cfg.to[1]}", "mode": cfg.mode, "hops": hops}
    if refused is not None:
        result["refused"] = {"hop": refused.hop, "reason": refused.reason,
                             "text": refused.text, "reported_by": refused.reported_by}
    if as_json:
        click.echo(json.dumps(result))
    else:
        for h in hops:
            via = " -> ".join(h["path"]) if len(h["path"]) > 1 else h["hop"]
            click.echo(f"{via:<24} answered after {h['ms']:>8.2f} ms   "
                       f"requester side {h['near']:<22} server side {h['far']}")
        if refused is not None:
            note = "" if refused.verified else (f" (reported by {refused.reported_by}, not "
                                                f"authenticated by {refused.hop})")
            click.echo(f"{refused.hop:<24} refused: {refused.reason}: {refused.text}{note}")
        else:
            click.echo(f"{result['to']:<24} reached; the server sees the chain at "
                       f"{hops[-1]['far']}")
    return 1 if refused is not None else 0
