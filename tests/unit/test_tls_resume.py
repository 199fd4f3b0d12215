"""TLS session resumption (core/tls.py :class:`SessionCache`, :class:`TicketKeys`, and
``start_tls(sessions=...)``): a client's second connection to a server takes the
session ticket of its first back (no certificate, no chain verification), and only
there. Whatever else it is offered to - another server with keys of its own (another
relay, a restarted or rotated one), a server with a certificate the client does not
trust, a ticket tampered with on the way - it never resumes: a full handshake with every
certificate check, or no connection at all. No early data is ever offered.

Handshakes run between real TLS objects: over memory BIOs for the TLS properties, over
loopback TCP through ``start_tls`` (both drivers: on the socket and through memory BIOs)
for the cache's bookkeeping.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
from pathlib import Path

import pytest

from kakehashi.core import stream
from kakehashi.core.stream import Conn, ConnClosed, TLSConn, start_tls
from kakehashi.core.tls import SessionCache, TicketKeys, client_context, server_context
from kakehashi.core.tls import _dev_ca as tls_dev_ca

#: TLS extension numbers (RFC 8446 section 4.2)
EXT_PRE_SHARED_KEY = 41
EXT_EARLY_DATA = 42


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KAKEHASHI_HOME", str(tmp_path / "home"))
    server_context(names=["localhost"], cache=False)  # the development CA and a certificate
    return tmp_path / "home"


def _keys(**kw) -> TicketKeys:
    return TicketKeys(lambda: server_context(names=["localhost"], cache=False), **kw)


def _client(home: Path) -> ssl.SSLContext:
    return client_context(ca=home / "ca" / "ca.pem", cache=False)


# -- handshakes over memory BIOs -------------------------------------------------------
class Handshake:
    """One client/server handshake over memory BIOs; ``tamper`` may rewrite the bytes
    the client sends (its ClientHello) on their way."""

    def __init__(self, client: ssl.SSLContext, server: ssl.SSLContext, *,
                 session: ssl.SSLSession | None = None, name: str = "localhost",
                 tamper=None) -> None:
        self.cin, self.cout, self.sin, self.sout = (ssl.MemoryBIO() for _ in range(4))
        self.c = client.wrap_bio(self.cin, self.cout, server_hostname=name,
                                 session=session)
        self.s = server.wrap_bio(self.sin, self.sout, server_side=True)
        self.tamper = tamper or (lambda data: data)
        self.client_hello = b""

    def run(self) -> Handshake:
        done_c = done_s = False
        for _ in range(10):
            if not done_c:
                try:
                    self.c.do_handshake()
                    done_c = True
                except ssl.SSLWantReadError:
                    pass
            out = self.cout.read()
            if out and not self.client_hello:
                self.client_hello = out
                out = self.tamper(out)
            self.sin.write(out)
            if not done_s:
                try:
                    self.s.do_handshake()
                    done_s = True
                except ssl.SSLWantReadError:
                    pass
            self.cin.write(self.sout.read())
            if done_c and done_s:
                break
        assert done_c and done_s, "handshake did not finish"
        # the server's first bytes carry its tickets (TLS 1.3 sends them after the
        # handshake): the client has a resumable session once it has read them
        self.s.write(b"hello")
        self.cin.write(self.sout.read())
        assert self.c.read(5) == b"hello"
        return self


def _extensions(client_hello: bytes) -> dict[int, bytes]:
    """The extensions of a ClientHello in its first TLS record."""
    body = client_hello[5:]  # record header
    assert body[0] == 1, "not a ClientHello"
    p = 4 + 2 + 32  # handshake header, legacy version, random
    p += 1 + body[p]  # legacy session id
    p += 2 + struct.unpack_from("!H", body, p)[0]  # cipher suites
    p += 1 + body[p]  # compression methods
    end = p + 2 + struct.unpack_from("!H", body, p)[0]
    p += 2
    found = {}
    while p < end:
        kind, length = struct.unpack_from("!HH", body, p)
        found[kind] = body[p + 4:p + 4 + length]
        p += 4 + length
    return found


def _flip_ticket_byte(client_hello: bytes) -> bytes:
    """The ClientHello with one byte of the offered ticket changed (the pre_shared_key
    extension, the last one: identities length, identity length, identity...)."""
    ext = _extensions(client_hello)[EXT_PRE_SHARED_KEY]
    at = client_hello.rindex(ext) + 2 + 2 + 8  # into the ticket, past its first bytes
    return client_hello[:at] + bytes([client_hello[at] ^ 0x55]) + client_hello[at + 1:]


def test_the_second_handshake_resumes_and_offers_no_early_data(home):
    keys, client = _keys(), _client(home)
    first = Handshake(client, keys.context()).run()
    assert not first.c.session_reused
    assert EXT_PRE_SHARED_KEY not in _extensions(first.client_hello)
    session = first.c.session
    assert session is not None and session.has_ticket

    second = Handshake(client, keys.context(), session=session).run()
    assert second.c.session_reused and second.s.session_reused
    offered = _extensions(second.client_hello)
    assert EXT_PRE_SHARED_KEY in offered
    assert EXT_EARLY_DATA not in offered  # no 0-RTT: nothing is sent before the handshake
    # the resumed connection still knows whom it talks to (the first handshake's check)
    assert second.c.getpeercert()["subjectAltName"]


def test_a_ticket_of_another_server_is_refused_with_a_full_handshake(home):
    """Another relay (another process or node: keys of its own), same certificate and
    name: the client's offer is not taken, the handshake runs in full."""
    client = _client(home)
    session = Handshake(client, _keys().context()).run().c.session
    other = Handshake(client, _keys().context(), session=session).run()
    assert EXT_PRE_SHARED_KEY in _extensions(other.client_hello)
    assert not other.c.session_reused and not other.s.session_reused


def test_a_ticket_offered_to_an_untrusted_server_does_not_skip_verification(home, tmp_path,
                                                                           monkeypatch):
    """A server whose certificate the client does not trust (another CA) gets the
    offer too: the handshake is a full one and fails on the certificate."""
    client = _client(home)
    session = Handshake(client, _keys().context()).run().c.session
    monkeypatch.setenv("KAKEHASHI_HOME", str(tmp_path / "impostor"))
    impostor = server_context(names=["localhost"], cache=False)
    with pytest.raises(ssl.SSLCertVerificationError):
        Handshake(client, impostor, session=session).run()


def test_a_tampered_ticket_never_resumes(home):
    """A ticket changed on its way does not decrypt: the server runs a full handshake
    over a ClientHello the client did not send, and the client refuses it - no
    resumption, no connection."""
    keys, client = _keys(), _client(home)
    session = Handshake(client, keys.context()).run().c.session
    hs = Handshake(client, keys.context(), session=session, tamper=_flip_ticket_byte)
    with pytest.raises(ssl.SSLError):
        hs.run()
    assert not hs.s.session_reused


def test_rotated_keys_refuse_older_tickets(home):
    now = [0.0]
    keys = _keys(lifetime=60.0, clock=lambda: now[0])
    client = _client(home)
    first_ctx = keys.context()
    session = Handshake(client, first_ctx).run().c.session
    now[0] = 59.0
    assert keys.context() is first_ctx and keys.rotations == 0
    now[0] = 60.0
    rotated = keys.context()
    assert rotated is not first_ctx and keys.rotations == 1
    again = Handshake(client, rotated, session=session).run()
    assert not again.c.session_reused
    # and the fresh keys' own tickets resume
    assert Handshake(client, rotated, session=again.c.session).run().c.session_reused


def test_a_certificate_unreadable_at_rotation_keeps_the_relay_serving(home, tmp_path):
    """The keys rotate by building a fresh context from the certificate files, an hour
    after the relay started. Files that cannot be read then (being renewed, moved
    away) used to fail every handshake from that moment on (the relay logged it at
    debug level), where it had served for an hour: the context in use goes on, issuing
    no more tickets under its aging keys, and the rotation is tried again later - not
    on every connection."""
    now, builds = [0.0], []
    cert, key = tls_files = _dev_files(home, tmp_path)

    def build() -> ssl.SSLContext:
        builds.append(now[0])
        return server_context(cert, key, cache=False)

    keys = TicketKeys(build, lifetime=60.0, clock=lambda: now[0])
    client = _client(home)
    first_ctx = keys.context()
    for f in tls_files:
        f.rename(f.with_name(f.name + ".renewing"))
    now[0] = 60.0
    for _ in range(3):  # several connections at the moment the files are missing
        assert keys.context() is first_ctx
    assert len(builds) == 2 and keys.rotations == 0
    hs = Handshake(client, keys.context()).run()  # still served, in full
    assert not hs.c.session.has_ticket  # no new ticket under the old keys
    for f in tls_files:
        f.with_name(f.name + ".renewing").rename(f)
    now[0] = 60.0 + TicketKeys.RETRY
    rotated = keys.context()
    assert rotated is not first_ctx and keys.rotations == 1 and rotated.num_tickets == 1
    assert Handshake(client, rotated).run().c.session.has_ticket


def _dev_files(home: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the development certificate and key, as a relay's --cert and --key."""
    cert, key = tls_dev_ca().issue(["localhost"])
    copies = tmp_path / "relay.pem", tmp_path / "relay.key"
    for src, dst in zip((cert, key), copies, strict=True):
        dst.write_bytes(src.read_bytes())
    return copies


def test_one_ticket_per_handshake_and_none_when_off(home):
    assert _keys().context().num_tickets == 1
    off = _keys(resume=False)
    assert off.context().num_tickets == 0
    hs = Handshake(_client(home), off.context()).run()
    assert not hs.c.session.has_ticket


# -- the cache -------------------------------------------------------------------------
def test_a_session_is_offered_only_for_its_server_and_context(home):
    cache, client = SessionCache(), _client(home)
    hs = Handshake(client, _keys().context()).run()
    key = cache.key("localhost", ("127.0.0.1", 7000))
    assert cache.offer(client, key) is None
    cache.keep(client, key, hs.c)
    assert cache.offer(client, key) is not None
    assert cache.offer(client, cache.key("relay.example", ("127.0.0.1", 7000))) is None
    assert cache.offer(client, cache.key("localhost", ("127.0.0.1", 7001))) is None
    assert cache.offer(_client(home), key) is None  # another context (other trust)
    assert cache.key(None, ("127.0.0.1", 7000)) is None  # no name: never resumed
    assert cache.key("localhost", None) is None


def test_a_session_without_ticket_is_not_kept(home):
    cache, client = SessionCache(), _client(home)
    hs = Handshake(client, _keys(resume=False).context()).run()
    key = cache.key("localhost", ("127.0.0.1", 7000))
    cache.keep(client, key, hs.c)
    assert cache.offer(client, key) is None


def test_a_refused_offer_is_dropped_and_counted_as_full(home):
    cache, client = SessionCache(), _client(home)
    key = cache.key("localhost", ("127.0.0.1", 7000))
    first = Handshake(client, _keys().context()).run()
    assert cache.handshake_done(first.c, key, None) is False
    cache.keep(client, key, first.c)
    offered = cache.offer(client, key)
    other = Handshake(client, _keys().context(), session=offered).run()
    assert cache.handshake_done(other.c, key, offered) is False
    assert cache.offer(client, key) is None
    assert (cache.resumed, cache.full) == (0, 2)


def test_a_resumed_connection_refreshes_the_session_only_when_it_is_old(home):
    """Taking the session out of a connection is a DER copy (peer certificate
    included): after a resumption the kept one stays until it is ``refresh`` old;
    after a full handshake the new one replaces it at once."""
    now = [0.0]
    cache, client, keys = SessionCache(refresh=600.0, clock=lambda: now[0]), \
        _client(home), _keys()
    key = cache.key("localhost", ("127.0.0.1", 7000))
    cache.keep(client, key, Handshake(client, keys.context()).run().c)
    kept = cache.offer(client, key)
    resumed = Handshake(client, keys.context(), session=kept).run()
    assert resumed.c.session_reused
    now[0] = 599.0
    cache.keep(client, key, resumed.c)
    assert cache.offer(client, key) is kept
    now[0] = 600.0
    cache.keep(client, key, resumed.c)
    refreshed = cache.offer(client, key)
    assert refreshed is not kept and refreshed is not None
    # the refreshed ticket resumes too; a full handshake's session replaces it at once
    assert Handshake(client, keys.context(), session=refreshed).run().c.session_reused
    cache.keep(client, key, Handshake(client, keys.context()).run().c)
    assert cache.offer(client, key) is not refreshed


def test_forget_leaves_a_newer_session(home):
    cache, client = SessionCache(), _client(home)
    keys = _keys()
    key = cache.key("localhost", ("127.0.0.1", 7000))
    old = Handshake(client, keys.context()).run().c.session
    cache.keep(client, key, Handshake(client, keys.context()).run().c)
    newer = cache.offer(client, key)
    cache.forget(key, old)
    assert cache.offer(client, key) is newer
    cache.forget(key)
    assert cache.offer(client, key) is None


# -- start_tls over loopback TCP, both drivers ----------------------------------------
@pytest.fixture(params=["on", "off"])
def fast_path(request, monkeypatch):
    monkeypatch.setattr(stream, "FAST_PATH", request.param == "on")
    return request.param


async def _accepted_pair(lsock: socket.socket) -> tuple[socket.socket, socket.socket]:
    loop = asyncio.get_running_loop()
    csock = socket.socket()
    csock.setblocking(False)
    await loop.sock_connect(csock, lsock.getsockname())
    ssock, _ = await loop.sock_accept(lsock)
    ssock.setblocking(False)
    return ssock, csock


@pytest.fixture
def listener():
    with socket.create_server(("127.0.0.1", 0)) as lsock:
        lsock.setblocking(False)
        yield lsock


async def _link(lsock: socket.socket, server_ctx: ssl.SSLContext,
                client_ctx: ssl.SSLContext, cache: SessionCache) -> tuple[TLSConn, TLSConn]:
    ssock, csock = await _accepted_pair(lsock)
    server, client = await asyncio.gather(
        start_tls(Conn(ssock), server_ctx, server_side=True, timeout=10, framed=True),
        start_tls(Conn(csock), client_ctx, server_side=False, server_hostname="localhost",
                  timeout=10, framed=True, sessions=cache))
    await server.send_all(b"hi")
    assert await client.recv(2) == b"hi"  # the tickets came before these bytes
    client.keep_session()
    return server, client


async def test_start_tls_resumes_through_the_cache(home, fast_path, listener):
    keys, client_ctx, cache = _keys(), _client(home), SessionCache()
    conns = []
    for _ in range(3):
        conns += await _link(listener, keys.context(), client_ctx, cache)
    resumed = [(server.resumed, client.resumed) for server, client in zip(
        conns[::2], conns[1::2], strict=True)]
    assert resumed == [(False, False), (True, True), (True, True)]
    assert (cache.resumed, cache.full) == (2, 1)
    for conn in conns:
        conn.close()


async def test_start_tls_drops_an_offer_that_failed(home, tmp_path, monkeypatch, fast_path,
                                                    listener):
    """The client's session offered to a server it cannot verify (another CA, same
    address and name): the handshake fails on the certificate, and the session is
    dropped, so the next try offers none."""
    client_ctx, cache = _client(home), SessionCache()
    for conn in await _link(listener, _keys().context(), client_ctx, cache):
        conn.close()
    key = cache.key("localhost", listener.getsockname())
    assert cache.offer(client_ctx, key) is not None
    monkeypatch.setenv("KAKEHASHI_HOME", str(tmp_path / "impostor"))
    impostor = server_context(names=["localhost"], cache=False)
    ssock, csock = await _accepted_pair(listener)
    results = await asyncio.gather(
        start_tls(Conn(ssock), impostor, server_side=True, timeout=10, framed=True),
        start_tls(Conn(csock), client_ctx, server_side=False, server_hostname="localhost",
                  timeout=10, framed=True, sessions=cache),
        return_exceptions=True)
    assert isinstance(results[1], ssl.SSLCertVerificationError)
    assert isinstance(results[0], ssl.SSLError | ConnClosed | OSError)
    assert cache.offer(client_ctx, key) is None
    assert (cache.resumed, cache.full) == (0, 1)
