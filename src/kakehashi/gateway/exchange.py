"""The state one client connection carries between requests, shared by the
coroutine path (``gateway.server``) and the callback path (``gateway.fastlane``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from kakehashi.core.stream import Conn
from kakehashi.gateway import http


@dataclass
class Upstream:
    """A kept-alive connection to one target address, owned by one client connection."""

    key: tuple[str, int]
    conn: Conn
    #: allow-list decisions already made (and audited) on this client connection:
    #: (host, port, user) -> the checked address
    decided: dict = field(default_factory=dict)
    #: the origin may have tied this connection to the client (connection-based
    #: authentication such as NTLM): never handed to another client connection
    private: bool = False


@dataclass
class Exchange:
    """One request being relayed: what came in, what went out, for whom, since when."""

    head: http.RequestHead
    out_head: http.RequestHead
    target: http.Target
    user: str
    start: float

    @property
    def where(self) -> str:
        return f"{self.target.host}:{self.target.port}"


@dataclass
class Handoff:
    """Why the fast lane stopped, and where the coroutine path takes over.

    * ``eof`` / ``close``: the connection is finished (client gone, idle, or not
      kept alive);
    * ``abort``: cut the connection (a body broke after its head was sent);
    * ``error``: reply ``error`` (a 4xx/5xx) and close;
    * ``head``: a request the fast lane does not serve; the coroutine runs it whole;
    * ``response``: the upstream's response head is in, the coroutine continues
      from there (interim responses, chunked or large bodies, gzip decoding).
    """

    kind: str
    head: http.RequestHead | None = None
    error: http.HTTPError | None = None
    exchange: Exchange | None = None
    response: http.ResponseHead | None = None
    reason: str = ""
