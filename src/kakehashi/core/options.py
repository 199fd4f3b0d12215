"""The shared command-line vocabulary: one decorator per meaning, used by every system.

Clients say where they connect with ``--server HOST:PORT`` (or a URL), who they are
with ``--user``, give the secret by ``--password-stdin``, ``--password-file`` or
``KAKEHASHI_PASSWORD`` (never on the command line), and choose transport security
with ``--tls on|off`` (on by default) and ``--ca``. Servers say ``--listen``, ``--db``,
``--tls``, ``--cert/--key``, ``--audit-log``, ``--max-connections``,
``--max-per-client`` and ``--*-timeout``; scripts ask for ``--json``. The table lives
in docs/cli.md. Every flag is also a key of the command's table in a ``--config``
file (see :mod:`kakehashi.config`).

Old spellings stay accepted through :func:`deprecated_alias`: hidden, with a note on
stderr naming the new flag.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import click
from click.core import ParameterSource

from kakehashi.core import identity

F = TypeVar("F", bound=Callable[..., Any])
ALIASES_KEY = "kakehashi.deprecated_aliases"


# -- values ---------------------------------------------------------------------------
def hostport(text: str, hint: str, default: int | None = None) -> tuple[str, int]:
    """Parse a HOST:PORT option; a bad value is a usage error naming the option."""
    from kakehashi.core.stream import parse_hostport

    try:
        return parse_hostport(text, default)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=hint) from None


@dataclass(frozen=True)
class ServerAddress:
    host: str
    port: int
    #: TLS asked for by a URL scheme (https://, tls://), None when the text had none
    tls: bool | None = None


_TLS_SCHEMES = {"https": True, "tls": True, "kakehashis": True,
                "http": False, "tcp": False, "kakehashi": False}


def parse_server(text: str, hint: str = "--server",
                 default_port: int | None = None) -> ServerAddress:
    """``HOST:PORT``, ``[V6]:PORT``, ``HOST`` (with a default port) or a URL such as
    ``https://gw.example:8443``; the URL's scheme says whether to use TLS."""
    scheme, sep, rest = text.partition("://")
    tls: bool | None = None
    if sep:
        if scheme.lower() not in _TLS_SCHEMES:
            raise click.BadParameter(
                f"{text!r}: unknown scheme {scheme!r} (use https:// or http://, or HOST:PORT)",
                param_hint=hint)
        tls = _TLS_SCHEMES[scheme.lower()]
        text = rest.split("/", 1)[0]
        # a web URL without a port means the web's port, as in a browser
        default_port = {"https": 443, "http": 80}.get(scheme.lower(), default_port)
    host, port = hostport(text, hint, default_port)
    return ServerAddress(host, port, tls)


def parse_servers(texts: str | tuple[str, ...] | list[str], hint: str = "--server",
                  default_port: int | None = None) -> list[ServerAddress]:
    """A repeatable ``--server``: each value as :func:`parse_server`, in the order
    given (the first is tried first; the others are where a client fails over to)."""
    if isinstance(texts, str):
        texts = (texts,)
    return [parse_server(text, hint, default_port) for text in texts]


def check_name(name: str, hint: str = "NAME", what: str = "user IDs") -> str:
    """:func:`kakehashi.core.identity.check_name` as a usage error naming the option."""
    try:
        return identity.check_name(name, what)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=hint) from None


def password(password_stdin: bool = False, password_file: str | None = None, *,
             confirm: bool = False, prompt: str = "Password") -> str:
    """The password from the sources of the vocabulary (:func:`identity.read_password`)."""
    try:
        return identity.read_password(stdin=password_stdin, file=password_file,
                                      confirm=confirm, prompt=prompt)
    except identity.PasswordError as exc:
        raise click.UsageError(str(exc)) from None


def explicit(name: str) -> bool:
    """Whether parameter ``name`` of the running command was given (command line,
    environment or config file) rather than left at its default."""
    src = click.get_current_context().get_parameter_source(name)
    return src is not None and src is not ParameterSource.DEFAULT


def alias_used(dest: str) -> bool:
    """Whether a deprecated spelling supplied ``dest`` in this invocation."""
    return dest in click.get_current_context().meta.get(ALIASES_KEY, {})


# -- deprecated spellings -------------------------------------------------------------
def _with_aliases(f: F) -> F:
    """Let values given by deprecated spellings fill their new parameter, unless the
    new flag was given on the command line too (then the new one wins)."""
    if getattr(f, "_kh_aliases", False):
        return f

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        for dest, value in ctx.meta.get(ALIASES_KEY, {}).items():
            if ctx.get_parameter_source(dest) is not ParameterSource.COMMANDLINE:
                kwargs[dest] = value
        return f(*args, **kwargs)

    wrapper._kh_aliases = True  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]


def deprecated_alias(old: str, dest: str, new: str, **kwargs: Any) -> Callable[[F], F]:
    """A hidden option ``old`` that sets parameter ``dest`` (spelled ``new`` now) and
    prints a deprecation note to stderr when used."""
    ident = "deprecated_" + old.lstrip("-").replace("-", "_")

    def note(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is None or value == () or value is False:
            return value
        click.echo(f"kakehashi: {old} is deprecated; use {new}", err=True)
        ctx.meta.setdefault(ALIASES_KEY, {})[dest] = value
        return value

    def decorate(f: F) -> F:
        f = _with_aliases(f)
        return click.option(old, ident, hidden=True, expose_value=False, callback=note,
                            **kwargs)(f)

    return decorate


# -- clients --------------------------------------------------------------------------
def server_option(what: str, default_port: int, *, required: bool = True,
                  multiple: bool = False) -> Callable[[F], F]:
    """``--server``; with ``multiple`` it is repeatable: servers of one service (the
    nodes of a cluster) tried in order, the next one when the current one fails."""
    return click.option("--server", required=required, metavar="HOST:PORT|URL",
                        multiple=multiple,
                        help=f"{what} to connect to: HOST:PORT (port {default_port} if "
                             "omitted) or a URL (https://... means --tls on)."
                             + (" Repeat it to fail over to the next server when one "
                                "cannot be reached." if multiple else ""))


def user_option(help: str, *, required: bool = True) -> Callable[[F], F]:
    return click.option("--user", required=required, help=help)


def password_options(f: F) -> F:
    f = click.option("--password-file", type=click.Path(exists=True, dir_okay=False),
                     help="Read the password from the first line of this file.")(f)
    return click.option("--password-stdin", is_flag=True,
                        help=f"Read the password from stdin (else {identity.PASSWORD_ENV}, "
                             "else a prompt).")(f)


def client_tls_options(f: F) -> F:
    f = click.option("--ca", type=click.Path(exists=True, dir_okay=False),
                     help="CA certificate to trust (default: system store + the "
                          "development CA of the state directory).")(f)
    return click.option("--tls", "tls_mode", type=click.Choice(["on", "off"]), default="on",
                        show_default=True,
                        help="TLS to the server; 'off' is an explicit opt-in to plaintext.")(f)


def tls_resume_option(f: F) -> F:
    """``--tls-resume on|off`` (config key ``tls-resume``, env ``KAKEHASHI_TLS_RESUME``):
    TLS session resumption, for a client that opens many connections to one server
    (offer the session of the last one) and for that server (issue session tickets,
    keys in memory only). On by default; a refused or failed resumption is a full
    handshake with every certificate check."""
    return click.option("--tls-resume", type=click.Choice(["on", "off"]), default="on",
                        show_default=True, envvar="KAKEHASHI_TLS_RESUME",
                        help="TLS session resumption (tickets) for connections after the "
                             "first; 'off': a full handshake every time. "
                             "Env: KAKEHASHI_TLS_RESUME.")(f)


def client_options(what: str, default_port: int, *, user_help: str,
                   user_required: bool = True,
                   server_required: bool = True,
                   multiple_servers: bool = False) -> Callable[[F], F]:
    """``--server`` (repeatable with ``multiple_servers``), ``--user``, the password
    sources, ``--tls`` and ``--ca``."""

    def decorate(f: F) -> F:
        f = client_tls_options(f)
        f = password_options(f)
        f = user_option(user_help, required=user_required)(f)
        return server_option(what, default_port, required=server_required,
                             multiple=multiple_servers)(f)

    return decorate


# -- servers --------------------------------------------------------------------------
def listen_option(default: str, help: str = "HOST:PORT to listen on.") -> Callable[[F], F]:
    return click.option("--listen", default=default, show_default=True, metavar="HOST:PORT",
                        help=help)


def db_option(default: Callable[[], str], name: str, help: str) -> Callable[[F], F]:
    return click.option("--db", default=default, show_default=f"state dir {name}", help=help)


def server_tls_options(*, auto: bool, default: str, help: str,
                       names: bool = False) -> Callable[[F], F]:
    """``--tls``, ``--cert``/``--key`` (default: issued by the development CA), and with
    ``names`` the ``--name`` list for that certificate."""

    def decorate(f: F) -> F:
        if names:
            f = click.option("--name", "names", multiple=True,
                             help="Host names/IPs for the development certificate.")(f)
        f = click.option("--key", type=click.Path(exists=True, dir_okay=False),
                         help="Private key of --cert.")(f)
        f = click.option("--cert", type=click.Path(exists=True, dir_okay=False),
                         help="Server certificate (default: issued by the development CA "
                              "for this host's names).")(f)
        choices = ["auto", "on", "off"] if auto else ["on", "off"]
        return click.option("--tls", "tls_mode", type=click.Choice(choices), default=default,
                            show_default=True, help=help)(f)

    return decorate


def check_cert_key(cert: str | None, key: str | None) -> None:
    if bool(cert) != bool(key):
        raise click.UsageError("--cert and --key go together")


def audit_log_option(f: F) -> F:
    return click.option("--audit-log", type=click.Path(dir_okay=False),
                        help="Append allow/deny decisions as JSON lines to this file "
                             "(default: to the log, logger kakehashi.audit).")(f)


def connection_limit_options(max_connections: int, hint: str = "", *,
                             max_per_client: int = 0,
                             refusal: str | None = None) -> Callable[[F], F]:
    """``--max-connections`` and ``--max-per-client`` for a serving command (the core
    Listener's limits), with this command's defaults. ``refusal`` says what a connection
    beyond either limit gets, for a command that answers it in its protocol instead of
    holding it in the backlog (total) or closing it unanswered (per client)."""

    def decorate(f: F) -> F:
        f = click.option(
            "--max-per-client", type=click.IntRange(min=0), default=max_per_client,
            show_default=True,
            help="Connections one client address may hold (0: no limit); more are "
                 + (refusal or "closed at once") + ". Mind clients behind one NAT address.")(f)
        return click.option(
            "--max-connections", type=click.IntRange(min=0), default=max_connections,
            show_default=True,
            help="Connections served at once (0: no limit); beyond it new ones "
                 + (f"are {refusal}" if refusal else "wait in the listen backlog") + "."
                 + (f" {hint}" if hint else ""))(f)

    return decorate


def metrics_listen_option(f: F) -> F:
    """``--metrics-listen HOST:PORT`` (config key ``metrics_listen``): serve Prometheus
    ``/metrics`` and ``/healthz`` there, for servers with no HTTP API of their own
    (:func:`kakehashi.core.metrics.exporter`)."""
    return click.option("--metrics-listen", metavar="HOST:PORT", callback=_check_hostport,
                        help="Serve Prometheus /metrics and /healthz on this HOST:PORT "
                             "(plain HTTP: keep it on an internal address).")(f)


def _check_hostport(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    if value:
        hostport(value, "--" + (param.name or "").replace("_", "-"))
    return value


def timeout_option(name: str, default: float, help: str) -> Callable[[F], F]:
    """``--NAME-timeout`` in seconds."""
    return click.option(f"--{name}-timeout", type=click.FloatRange(min=0, min_open=True),
                        default=default, show_default=True, help=help)


def token_file_option(f: F) -> F:
    """``--token-file``: an API token (bearer), from a file so it is never on the
    command line."""
    return click.option("--token-file", type=click.Path(dir_okay=False), required=True,
                        help="File whose first line is the API token.")(f)


def json_option(f: F) -> F:
    return click.option("--json", "as_json", is_flag=True,
                        help="Machine-readable output (JSON) instead of a table.")(f)


def env_password(name: str) -> str | None:
    """A password from a deprecated environment variable, with a note."""
    value = os.environ.get(name)
    if value:
        click.echo(f"kakehashi: {name} is deprecated; use {identity.PASSWORD_ENV}", err=True)
    return value or None
