"""The chain under hostile conditions the other chain tests do not cover: hops that
break the control connection in the middle of a frame or reset it, bursts of setups,
and ports a session freed while its datagrams are still in flight.

Proxies run in the test's own process (as in ``test_chain_tamper``) where the test must
steer what the proxy does (which UDP port it picks); the commands run as processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import threading

import pytest

from kakehashi.chain import tables
from kakehashi.chain.forward import ForwardConfig, build_chain
from kakehashi.chain.setup import SetupFailed
from kakehashi.core import crypto, wire
from tests.e2e.framework import Env

SERVER = ("127.0.0.3", 9)


class BrokenHop:
    """A first hop that accepts the control connection, takes the preamble, and then
    resets the connection (``reset``) or sends half a frame and closes (``truncate``).

    A thread, so the hop also serves a command run as a process by a blocking test."""

    def __init__(self, how: str) -> None:
        self.how = how
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.served = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            with c:
                c.settimeout(10)
                with contextlib.suppress(OSError):
                    got = b""
                    while len(got) < len(wire.PREAMBLE):
                        chunk = c.recv(len(wire.PREAMBLE) - len(got))
                        if not chunk:
                            break
                        got += chunk
                    if self.how == "reset":
                        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                     struct.pack("ii", 1, 0))
                    else:  # a frame header that promises 40 bytes, and 3 of them
                        c.sendall(wire.encode_header(wire.FrameType.CTRL, 40) + b"abc")
                self.served += 1

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(10)


def _config(port: int, mode: str = "recursive") -> ForwardConfig:
    return ForwardConfig(user="alice", keys={"fw1": crypto.parse_shared_key(
        crypto.new_shared_key())}, first_hop=tables.Hop("fw1", "127.0.0.1", port), to=SERVER,
        udp_listen=("127.0.0.1", 0), mode=mode, setup_timeout=20)  # type: ignore[arg-type]


@pytest.mark.parametrize("how", ["reset", "truncate"])
@pytest.mark.parametrize("mode", ["recursive", "iterative"])
async def test_a_hop_that_breaks_the_connection_during_setup_is_named(how, mode):
    """A reset, or a frame cut short, during the setup is a refusal by that hop like
    any other (SetupFailed naming it), not an exception of another kind: ``chain trace``
    printed a traceback, ``chain socks`` kept the destination's half-built route for
    the association's life (its datagrams queued, then dropped), ``chain forward``
    exited with a traceback instead of naming the hop."""
    hop = BrokenHop(how)
    try:
        with pytest.raises(SetupFailed) as err:
            await build_chain(_config(hop.port, mode))
        assert err.value.hop == "fw1" and err.value.reason == "protocol", err.value
    finally:
        hop.close()


async def test_a_first_hop_that_says_nothing_is_named():
    """A first hop that accepts and never answers: the timeout names it (it was '?')."""
    held = []

    async def silent(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        held.append(w)

    srv = await asyncio.start_server(silent, "127.0.0.1", 0)
    cfg = _config(srv.sockets[0].getsockname()[1])
    cfg.setup_timeout = 0.5
    try:
        with pytest.raises(SetupFailed) as err:
            await build_chain(cfg)
        assert (err.value.hop, err.value.reason) == ("fw1", "timeout"), err.value
    finally:
        for w in held:
            w.close()
        srv.close()


@pytest.mark.parametrize("how", ["reset", "truncate"])
def test_trace_names_a_hop_that_breaks_the_connection(tmp_path, how):
    env = Env(tmp_path)
    hop = BrokenHop(how)
    try:
        path = tmp_path / "trace.toml"
        path.write_text("\n".join([
            "[chain.trace]", 'id = "alice"', f'keys = {{ fw1 = "{crypto.new_shared_key()}" }}',
            f'first_hop = "fw1@127.0.0.1:{hop.port}"', f'to = "{SERVER[0]}:{SERVER[1]}"']) + "\n")
        res = env.run("--config", str(path), "chain", "trace", "--json", check=False)
        assert res.returncode == 1, res.stderr.decode(errors="replace")
        out = json.loads(res.stdout)
        assert out["refused"]["hop"] == "fw1" and out["refused"]["reason"] == "protocol", out
        assert b"Traceback" not in res.stderr
    finally:
        hop.close()
        env.close()


def _free_udp_range(n: int) -> int:
    """The first of ``n`` consecutive UDP ports free on 127.0.0.1 (probed)."""
    for base in range(23000, 33000, 97):
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise AssertionError(f"no {n} consecutive free UDP ports")


@pytest.mark.parametrize("fast_path", ["on", "off"])
async def test_a_freshly_freed_port_is_not_handed_to_the_next_session(fast_path):
    """Session A ends; session B to the same server starts while A's datagrams are still
    in flight. The proxy's range has room for both, so B must not get A's ports: a
    late answer from the server to A's server-facing port (P3) would match B's record
    (the same server endpoint) and reach B's client, and a late datagram from A's
    client to A's P2 (the same host) would lock B's record to A's client. The old
    allocator started at a random port each time and took A's ports again about as
    often as any (here: always, with the random start pinned to the range's start)."""
    from kakehashi.chain.proxy import ChainProxy, ProxyConfig
    from kakehashi.core import datagram
    from tests.support.wait import async_wait_until

    class Pinned:  # the old allocator's random start, pinned: A's ports are its first pick
        @staticmethod
        def randrange(n: int) -> int:
            return 0

        def __getattr__(self, name: str):
            import random
            return getattr(random, name)

    loop = asyncio.get_running_loop()
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind((SERVER[0], 0))
    server.setblocking(False)
    target = server.getsockname()
    key = crypto.parse_shared_key(crypto.new_shared_key())
    low = _free_udp_range(4)
    saved = datagram.random
    datagram.random = Pinned()  # type: ignore[assignment]
    fw1 = ChainProxy(ProxyConfig(
        name="fw1", host="127.0.0.1", port=0, udp_ports=tables.PortRange(low, low + 3),
        keys={"alice": key}, routes=tables.parse_routes({f"{SERVER[0]}/32": "direct"}),
        acl=tables.parse_acl([{"user": "alice", "from": "127.0.0.0/8", "ports": "any"}]),
        fast_path=fast_path))
    await fw1.start()
    cfg = ForwardConfig(user="alice", keys={"fw1": key},
                        first_hop=tables.Hop("fw1", "127.0.0.1", fw1.address[1]), to=target,
                        udp_listen=("127.0.0.1", 0), fast_path=fast_path)

    async def through(chain, payload: bytes) -> tuple[str, int]:
        """Send ``payload`` through ``chain``; where the server saw it come from (P3)."""
        chain.data_sock.sendto(payload, chain.setup.first.addr)
        data, src = await asyncio.wait_for(loop.sock_recvfrom(server, 100), 10)
        assert data == payload
        return src

    try:
        a = await build_chain(cfg)
        a_p3 = await through(a, b"from A")
        a.close()
        a.data_sock.close()
        await async_wait_until(lambda: not fw1.sessions, what="fw1 ending session A")
        b = await build_chain(cfg)
        try:
            b_p3 = await through(b, b"from B")
            server.sendto(b"late answer for A", a_p3)  # in flight when A ended
            server.sendto(b"answer for B", b_p3)
            got = await asyncio.wait_for(loop.sock_recv(b.data_sock, 100), 10)
            assert got == b"answer for B", (got, a_p3, b_p3)
            assert b.setup.first.port not in (a.setup.first.port, a_p3[1])
        finally:
            b.close()
            b.data_sock.close()
    finally:
        datagram.random = saved  # type: ignore[assignment]
        await fw1.close()
        server.close()


class _Echo(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.count = 0

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:  # type: ignore[override]
        self.count += 1
        self.transport.sendto(data, addr)


async def _one_proxy(**extra):
    """fw1 (direct to 127.0.0.3) in this process, a UDP echo behind it, alice's config."""
    from kakehashi.chain.proxy import ChainProxy, ProxyConfig

    loop = asyncio.get_running_loop()
    transport, echo = await loop.create_datagram_endpoint(_Echo, local_addr=(SERVER[0], 0))
    key = crypto.parse_shared_key(crypto.new_shared_key())
    extra.setdefault("udp_ports", tables.PortRange(1024, 65535))
    fw1 = ChainProxy(ProxyConfig(
        name="fw1", host="127.0.0.1", port=0,
        keys={"alice": key}, routes=tables.parse_routes({f"{SERVER[0]}/32": "direct"}),
        acl=tables.parse_acl([{"user": "alice", "from": "127.0.0.0/8", "ports": "any"}]),
        **extra))
    await fw1.start()
    cfg = ForwardConfig(user="alice", keys={"fw1": key},
                        first_hop=tables.Hop("fw1", "127.0.0.1", fw1.address[1]),
                        to=transport.get_extra_info("sockname")[:2],
                        udp_listen=("127.0.0.1", 0))
    return fw1, cfg, transport, echo


async def _associate(server: tuple[str, int], dst: tuple[str, int] = ("0.0.0.0", 0)):
    """A SOCKS5 UDP ASSOCIATE naming ``dst``: (the control connection's writer, BND)."""
    r, w = await asyncio.open_connection(*server)
    w.write(b"\x05\x01\x00")
    assert await r.readexactly(2) == b"\x05\x00"
    w.write(b"\x05\x03\x00\x01" + socket.inet_aton(dst[0]) + dst[1].to_bytes(2, "big"))
    reply = await r.readexactly(10)
    assert reply[:2] == b"\x05\x00"
    return w, (socket.inet_ntoa(reply[4:8]), int.from_bytes(reply[8:10], "big"))


async def test_socks_association_locks_ends_with_its_connection_and_drops_bad_headers():
    """The association takes datagrams from its first source endpoint only; malformed
    headers (reserved bytes, truncated, fragments) are dropped; when the TCP connection
    closes, the association's UDP port and its chains (the proxy's session) end."""
    from kakehashi.chain.socks import SocksConfig, SocksServer
    from kakehashi.core import socks5
    from tests.support.wait import async_wait_until

    loop = asyncio.get_running_loop()
    fw1, cfg, transport, echo = await _one_proxy()
    server = SocksServer(SocksConfig("127.0.0.1", 0, cfg))
    await server.start()
    w = None
    socks_ = []
    try:
        w, bnd = await _associate(server.address)  # DST zeros: the client does not know
        dst = cfg.to
        u, other = (socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2))
        socks_ += [u, other]
        for s in socks_:
            s.bind(("127.0.0.1", 0))
            s.setblocking(False)
        u.sendto(socks5.encode_udp(*dst, b"first"), bnd)
        data = await asyncio.wait_for(loop.sock_recv(u, 200), 10)
        assert data == socks5.encode_udp(*dst, b"first")
        assert echo.count == 1
        (assoc,) = server.associations
        dropped = assoc.dropped
        header = socks5.encode_udp(*dst, b"")
        other.sendto(socks5.encode_udp(*dst, b"from another port"), bnd)
        for bad in (b"\x00\x01" + header[2:] + b"rsv", header[:6], b"\x00\x00\x01" + header[3:]
                    + b"fragment", b"\x00\x00\x00\x09" + b"x" * 10):
            u.sendto(bad, bnd)
        await async_wait_until(lambda: assoc.dropped == dropped + 5,
                               what="the association dropping five datagrams")
        u.sendto(socks5.encode_udp(*dst, b"again"), bnd)
        data = await asyncio.wait_for(loop.sock_recv(u, 200), 10)
        assert data == socks5.encode_udp(*dst, b"again") and echo.count == 2
        assert len(fw1.sessions) == 1
        w.close()  # the control connection ends: the association and its chain too
        await async_wait_until(lambda: not server.associations and not fw1.sessions,
                               what="the association and fw1's session ending")
        assert assoc.transport is not None and assoc.transport.is_closing()
    finally:
        for s in socks_:
            s.close()
        if w is not None:
            w.close()
        await server.close()
        await fw1.close()
        transport.close()


@pytest.mark.parametrize("mode", ["recursive", "iterative"])
async def test_a_burst_of_setups_gets_what_a_sequence_gets(mode):
    """100 setups at once from one user and address get exactly the sessions 100 in a
    row would (max_per_user), every other one a limit refusal; the ports are bound for
    the admitted ones only (the bound is taken before the ports)."""
    fw1, cfg, transport, _ = await _one_proxy(max_per_user=3, max_per_client=5)
    cfg.mode = mode  # type: ignore[assignment]
    from kakehashi.core import datagram

    binds = 0
    bind = datagram.bind_udp

    def counting(host: str, port: int = 0) -> socket.socket:
        nonlocal binds
        sock = bind(host, port)
        binds += 1
        return sock

    datagram.bind_udp = counting  # type: ignore[assignment]  # the proxy's data ports
    got = []
    try:
        async def one():
            try:
                return await build_chain(cfg)
            except SetupFailed as exc:
                return exc

        got = await asyncio.gather(*(one() for _ in range(100)))
        built = [c for c in got if not isinstance(c, SetupFailed)]
        refused = [c for c in got if isinstance(c, SetupFailed)]
        assert len(built) == 3, refused[:3]
        assert {(e.hop, e.reason) for e in refused} == {("fw1", "limit")}
        assert binds == 6
    finally:
        datagram.bind_udp = bind  # type: ignore[assignment]
        for c in got:
            if not isinstance(c, SetupFailed):
                c.close()
                c.data_sock.close()
        await fw1.close()
        transport.close()


async def test_the_api_socket_learns_that_its_chain_ended():
    """The proxy ends the session (idle timeout here; a teardown or a restart alike) and
    closes the control connection: a program blocked in ChainSocket.recv() is told
    (ConnectionError naming why) instead of waiting forever, and send() refuses."""
    from kakehashi.chain.api import open_chain
    from tests.support.wait import async_wait_until

    fw1, cfg, transport, _ = await _one_proxy(idle_timeout=2)
    try:
        sock = await open_chain("alice", cfg.keys, cfg.first_hop, cfg.to)
        try:
            sock.send(b"one")
            assert await asyncio.wait_for(sock.recv(), 10) == b"one"
            with pytest.raises(ConnectionError, match="chain closed by fw1"):
                await asyncio.wait_for(sock.recv(), 30)  # the session idles out meanwhile
            await async_wait_until(lambda: not fw1.sessions, what="fw1 ending the session")
            with pytest.raises(ConnectionError):
                sock.send(b"two")
        finally:
            sock.close()
    finally:
        await fw1.close()
        transport.close()


async def _three_proxies(**extra):
    """fw1 -> fw2 -> fw3 -> a UDP echo, in this process; alice's config for fw1."""
    from kakehashi.chain.proxy import ChainProxy, ProxyConfig

    loop = asyncio.get_running_loop()
    transport, echo = await loop.create_datagram_endpoint(_Echo, local_addr=(SERVER[0], 0))
    k = {p: crypto.parse_shared_key(crypto.new_shared_key())
         for p in ("alice-fw1", "alice-fw2", "alice-fw3", "fw1-fw2", "fw2-fw3")}
    acl = tables.parse_acl([{"user": "alice", "from": "127.0.0.0/8", "ports": "any"}])
    proxies = []
    nxt = "direct"
    for i in (3, 2, 1):
        keys = {"alice": k[f"alice-fw{i}"]}
        if i > 1:
            keys[f"fw{i - 1}"] = k[f"fw{i - 1}-fw{i}"]
        if i < 3:
            keys[f"fw{i + 1}"] = k[f"fw{i}-fw{i + 1}"]
        p = ChainProxy(ProxyConfig(
            name=f"fw{i}", host="127.0.0.1", port=0, udp_ports=tables.PortRange(1024, 65535),
            keys=keys, routes=tables.parse_routes({f"{SERVER[0]}/32": nxt}), acl=acl,
            **extra))
        await p.start()
        proxies.insert(0, p)
        nxt = f"fw{i}@127.0.0.1:{p.address[1]}"
    cfg = ForwardConfig(user="alice", keys={f"fw{i}": k[f"alice-fw{i}"] for i in (1, 2, 3)},
                        first_hop=tables.Hop("fw1", "127.0.0.1", proxies[0].address[1]),
                        to=transport.get_extra_info("sockname")[:2],
                        udp_listen=("127.0.0.1", 0))
    return proxies, cfg, transport, echo


async def _setup_cut_after(cfg: ForwardConfig, sent: int, how: str) -> int:
    """Run a client's setup and cut the control connection once ``sent`` of its
    messages went out (0: right after the preamble); ``how``: close, reset, or half a
    frame then close. Returns how many it sent (fewer when the setup ended first)."""
    from kakehashi.chain import messages as m
    from kakehashi.chain.proxy import Ctrl
    from kakehashi.chain.setup import ClientSetup
    from kakehashi.core.stream import FramedConn, open_tcp

    conn = await open_tcp(cfg.first_hop.host, cfg.first_hop.port)
    ctrl = Ctrl(FramedConn(conn, m.LIMITS))
    setup = ClientSetup(cfg.user, cfg.keys, m.Endpoint(*cfg.to), m.Endpoint("127.0.0.1", 9),
                        mode=cfg.mode, encrypt=cfg.encrypt)
    count = 0
    try:
        await ctrl.fc.send(wire.PREAMBLE)
        while count < sent and not setup.done:
            msg = await ctrl.read(20)
            if msg is None:
                break
            try:
                outs = setup.receive(msg)
            except SetupFailed:  # a limit, mostly: so many at once
                break
            if setup.seal_with is not None and ctrl.channel is None:
                ctrl.seal(setup.seal_with, "fw1")
            for out in outs:
                await ctrl.send(out)
                count += 1
        if how == "reset":
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif how == "truncate":
            await ctrl.fc.send(wire.encode_header(wire.FrameType.CTRL, 50) + b"cut")
    finally:
        ctrl.close()
    return count


def _fds() -> int:
    import os
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize(("mode", "encrypt"), [("recursive", True), ("iterative", True)])
async def test_setups_cut_at_every_step_leave_nothing_behind(mode, encrypt):
    """Control connections cut after every step of the setup (before the answer, in the
    middle of the authentication, after the request while the proxies behind are being
    asked, after each extension), by a close, a reset or half a frame, again and again:
    every proxy's sessions, setup slots, session slots, data ports and descriptors come
    back, and a whole chain is still built at the end.

    The authentication timeout is long: nothing may rest on it. Before, in iterative
    mode a cut right after the client's second Extend left fw2's session until it ran
    out: its relay task's read (asyncio.wait_for) swallowed the cancellation when the
    read had just completed (fw3's challenge arriving as fw1's close did; Python 3.11)."""
    from tests.support.wait import async_wait_until

    proxies, cfg, transport, _ = await _three_proxies(max_per_user=8, max_per_client=16,
                                                      auth_timeout=300)
    cfg.mode, cfg.encrypt = mode, encrypt  # type: ignore[assignment]
    base = _fds()

    def settled() -> bool:
        return all(not p.sessions and not p.limits.setups and not p.limits.users
                   and not p.limits.addresses and p.limits.count == 0 for p in proxies)

    try:
        for _round in range(3):
            sent = []
            for n in range(10):  # the three ways at once, each step after the other
                sent += await asyncio.gather(*(_setup_cut_after(cfg, n, how)
                                               for how in ("close", "reset", "truncate")))
                await async_wait_until(settled, 30, what=f"every proxy ending the setups "
                                                         f"cut after {n} messages")
            # every step was cut, to the end of the setup (8 messages in iterative mode)
            assert sorted(set(sent)) == list(range(max(sent) + 1)), sent
            assert max(sent) == (8 if mode == "iterative" else 3), sent
        await async_wait_until(lambda: _fds() == base, 30,
                               what=f"this process's descriptors back to {base}")
        chain = await build_chain(cfg)
        try:
            assert chain.setup.path == ["fw1", "fw2", "fw3"]
        finally:
            chain.close()
            chain.data_sock.close()
    finally:
        for p in proxies:
            await p.close()
        transport.close()


async def test_a_first_hop_must_be_the_one_configured():
    """The client holds keys for fw1 and fw2 (iterative mode); fw2 answers at the
    address configured for fw1. The client must refuse it (naming fw1, authentication)
    instead of taking fw2 as its first hop, which skipped fw1 and its firewall."""
    from kakehashi.chain.proxy import ChainProxy, ProxyConfig

    k1, k2 = (crypto.parse_shared_key(crypto.new_shared_key()) for _ in range(2))
    fw2 = ChainProxy(ProxyConfig(
        name="fw2", host="127.0.0.1", port=0, udp_ports=tables.PortRange(1024, 65535),
        keys={"alice": k2}, routes=tables.parse_routes({f"{SERVER[0]}/32": "direct"}),
        acl=tables.parse_acl([{"user": "alice", "from": "127.0.0.0/8", "ports": "any"}])))
    await fw2.start()
    cfg = ForwardConfig(user="alice", keys={"fw1": k1, "fw2": k2},
                        first_hop=tables.Hop("fw1", "127.0.0.1", fw2.address[1]), to=SERVER,
                        udp_listen=("127.0.0.1", 0), mode="iterative")
    chain = None
    try:
        with pytest.raises(SetupFailed) as err:
            chain = await build_chain(cfg)
        assert (err.value.hop, err.value.reason) == ("fw1", "authentication"), err.value
        assert "'fw2'" in err.value.text
    finally:
        if chain is not None:
            chain.close()
            chain.data_sock.close()
        await fw2.close()


@pytest.mark.parametrize("mode", ["recursive", "iterative"])
async def test_a_hanging_hop_far_down_the_chain_is_named(mode):
    """fw3 accepts fw2's connection and says nothing. With the defaults (the client
    waits as long as each proxy waits for the next: 10 s; 4 s here) the client gave up
    first and blamed the hop it talked to ('fw1: timeout' recursive, 'fw2: timeout'
    iterative), so neither it nor ``chain trace`` could say which hop hung. Each request
    (and extension) now says how long its sender waits, and a proxy gives up on the
    hops after it within that, naming them: fw2 refuses, next-hop, fw3."""
    from kakehashi.chain.proxy import ChainProxy, ProxyConfig

    held: list[asyncio.StreamWriter] = []

    async def silent(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        held.append(w)

    fw3 = await asyncio.start_server(silent, "127.0.0.1", 0)
    k = {p: crypto.parse_shared_key(crypto.new_shared_key())
         for p in ("alice-fw1", "alice-fw2", "alice-fw3", "fw1-fw2", "fw2-fw3")}
    acl = tables.parse_acl([{"user": "alice", "from": "127.0.0.0/8", "ports": "any"}])
    wait = 4.0
    fw2 = ChainProxy(ProxyConfig(
        name="fw2", host="127.0.0.1", port=0, udp_ports=tables.PortRange(1024, 65535),
        keys={"fw1": k["fw1-fw2"], "fw3": k["fw2-fw3"], "alice": k["alice-fw2"]},
        routes=tables.parse_routes({
            f"{SERVER[0]}/32": f"fw3@127.0.0.1:{fw3.sockets[0].getsockname()[1]}"}),
        acl=acl, auth_timeout=wait))
    await fw2.start()
    fw1 = ChainProxy(ProxyConfig(
        name="fw1", host="127.0.0.1", port=0, udp_ports=tables.PortRange(1024, 65535),
        keys={"fw2": k["fw1-fw2"], "alice": k["alice-fw1"]},
        routes=tables.parse_routes({f"{SERVER[0]}/32": f"fw2@127.0.0.1:{fw2.address[1]}"}),
        acl=acl, auth_timeout=wait))
    await fw1.start()
    cfg = ForwardConfig(user="alice", keys={f"fw{i}": k[f"alice-fw{i}"] for i in (1, 2, 3)},
                        first_hop=tables.Hop("fw1", "127.0.0.1", fw1.address[1]), to=SERVER,
                        udp_listen=("127.0.0.1", 0), mode=mode,  # type: ignore[arg-type]
                        setup_timeout=wait)
    try:
        with pytest.raises(SetupFailed) as err:
            await build_chain(cfg)
        assert (err.value.hop, err.value.reason) == ("fw2", "next-hop"), err.value
        assert "fw3" in err.value.text, err.value
    finally:
        await fw1.close()
        await fw2.close()
        for w in held:
            w.close()
        fw3.close()


async def test_a_next_hop_that_stops_reading_does_not_hold_the_session(tmp_path):
    """fw2 (a process) hangs once the chain is up (SIGSTOP): it reads nothing more. The
    client sends control messages until fw1 stops taking them (fw1 forwards them to fw2
    and its send waits for room), then leaves. fw1's session must end - its send to
    fw2 has a deadline - instead of waiting for fw2 until the idle timeout (300 s)."""
    import os
    import signal

    from kakehashi.chain import messages as m
    from kakehashi.chain.proxy import ChainProxy, ProxyConfig
    from kakehashi.core.stream import ConnClosed
    from tests.support.wait import async_wait_until

    env = Env(tmp_path)
    k = {p: crypto.new_shared_key() for p in ("alice-fw1", "alice-fw2", "fw1-fw2")}
    path = tmp_path / "fw2.toml"
    path.write_text("\n".join([
        "[chain.proxy]", 'name = "fw2"', 'listen = "127.0.0.1:0"', 'udp_ports = "1024-65535"',
        f'keys = {{ fw1 = "{k["fw1-fw2"]}", alice = "{k["alice-fw2"]}" }}',
        f'routes = {{ "{SERVER[0]}/32" = "direct" }}',
        'acl = [ { user = "alice", from = "127.0.0.0/8", ports = "any" } ]']) + "\n")
    fw2 = env.spawn("fw2", "--config", str(path), "chain", "proxy")
    raw = {p: crypto.parse_shared_key(v) for p, v in k.items()}
    fw1 = ChainProxy(ProxyConfig(
        name="fw1", host="127.0.0.1", port=0, udp_ports=tables.PortRange(1024, 65535),
        keys={"alice": raw["alice-fw1"], "fw2": raw["fw1-fw2"]},
        routes=tables.parse_routes({f"{SERVER[0]}/32": f"fw2@127.0.0.1:{fw2.bound_port()}"}),
        acl=tables.parse_acl([{"user": "alice", "from": "127.0.0.0/8", "ports": "any"}]),
        auth_timeout=3))
    await fw1.start()
    stopped = False
    try:
        cfg = ForwardConfig(user="alice", keys={"fw1": raw["alice-fw1"], "fw2": raw["alice-fw2"]},
                            first_hop=tables.Hop("fw1", "127.0.0.1", fw1.address[1]),
                            to=SERVER, udp_listen=("127.0.0.1", 0))
        chain = await build_chain(cfg)
        os.kill(fw2.popen.pid, signal.SIGSTOP)
        stopped = True
        relay = m.Relay(m.Answer("alice", bytes(32), bytes(32)))
        try:
            while True:  # until fw1 takes no more (its buffers and fw2's are full)
                await asyncio.wait_for(chain.ctrl.send(relay), 2)
        except (OSError, ConnClosed):  # a timeout; or fw1 already cut the session
            pass
        chain.close()
        chain.data_sock.close()
        await async_wait_until(lambda: not fw1.sessions, 30,
                               what="fw1 ending the session whose next hop stopped reading")
    finally:
        if stopped:
            os.kill(fw2.popen.pid, signal.SIGCONT)
        await fw1.close()
        env.close()


async def test_socks_association_named_in_the_request_takes_that_endpoint_only():
    """DST.ADDR/DST.PORT of the UDP ASSOCIATE name the client's own address and a port:
    only that endpoint is accepted, even when another port of the same host sends
    first."""
    from kakehashi.chain.socks import SocksConfig, SocksServer
    from kakehashi.core import socks5
    from tests.support.wait import async_wait_until

    loop = asyncio.get_running_loop()
    fw1, cfg, transport, echo = await _one_proxy()
    server = SocksServer(SocksConfig("127.0.0.1", 0, cfg))
    await server.start()
    u, other = (socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2))
    w = None
    try:
        for s in (u, other):
            s.bind(("127.0.0.1", 0))
            s.setblocking(False)
        w, bnd = await _associate(server.address, ("127.0.0.1", u.getsockname()[1]))
        (assoc,) = server.associations
        other.sendto(socks5.encode_udp(*cfg.to, b"first, from another port"), bnd)
        await async_wait_until(lambda: assoc.dropped == 1, what="the other port's datagram "
                                                                "dropped")
        u.sendto(socks5.encode_udp(*cfg.to, b"named"), bnd)
        data = await asyncio.wait_for(loop.sock_recv(u, 200), 10)
        assert data == socks5.encode_udp(*cfg.to, b"named") and echo.count == 1
    finally:
        u.close()
        other.close()
        if w is not None:
            w.close()
        await server.close()
        await fw1.close()
        transport.close()


@contextlib.asynccontextmanager
async def _socks_association():
    """fw1 with a UDP echo behind it, a SOCKS server riding it and one association
    from a UDP socket of the test: (fw1, alice's config, the association, the socket,
    BND, the echo)."""
    from kakehashi.chain.socks import SocksConfig, SocksServer

    fw1, cfg, transport, echo = await _one_proxy()
    server = SocksServer(SocksConfig("127.0.0.1", 0, cfg))
    await server.start()
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    w = None
    try:
        u.bind(("127.0.0.1", 0))
        u.setblocking(False)
        w, bnd = await _associate(server.address)
        (assoc,) = server.associations
        yield fw1, cfg, assoc, u, bnd, echo
    finally:
        u.close()
        if w is not None:
            w.close()
        await server.close()
        await fw1.close()
        transport.close()


async def test_socks_datagrams_to_a_refused_destination_do_not_each_build_a_chain():
    """A SOCKS client (an unmodified application) keeps sending to a destination the
    chain refuses (no route at fw1). Each datagram after a refusal started a whole new
    setup with fw1 - a TCP connection, a mutual authentication, a refusal - one setup
    per datagram, as fast as the application sends. After a refusal the association now
    drops that destination's datagrams for a while (doubling, like ``chain forward``'s
    retries), so a burst of them costs fw1 a setup or two."""
    from kakehashi.core import socks5
    from tests.support.wait import async_wait_until

    async with _socks_association() as (fw1, _cfg, assoc, u, bnd, _):
        nowhere = ("127.0.0.9", 53)  # fw1 has no route there
        for i in range(20):
            u.sendto(socks5.encode_udp(*nowhere, b"query %d" % i), bnd)
            await async_wait_until(lambda n=i: assoc.dropped + fw1.stats["refused"] > n
                                   and not assoc.routes,
                                   what="the datagram refused or dropped")
        assert fw1.stats["refused"] <= 5, fw1.stats


async def test_a_requester_silent_during_setup_is_told_the_proxy_gave_up():
    """A requester that authenticates with nothing after fw1's challenge: after
    auth_timeout fw1 refuses it (timeout, naming fw1) and counts the refusal. Its
    ``except TimeoutError`` stood after ``except OSError`` (TimeoutError's base class),
    so it never ran: the connection was just closed, the client told nothing, no
    refusal counted and nothing logged."""
    from kakehashi.chain import messages as m
    from kakehashi.chain.proxy import Ctrl
    from kakehashi.core.stream import FramedConn, open_tcp

    fw1, _cfg, transport, _ = await _one_proxy(auth_timeout=1)
    timeouts = fw1._refused.labels("fw1", "timeout")  # (one registry: counted before)
    before = timeouts.get()
    conn = await open_tcp(*fw1.address)
    ctrl = Ctrl(FramedConn(conn, m.LIMITS))
    try:
        await ctrl.fc.send(wire.PREAMBLE)
        assert isinstance(await ctrl.read(20), m.Challenge)
        refused = await ctrl.read(20)  # the client says nothing
        assert isinstance(refused, m.Refused), refused
        assert (refused.hop, refused.reason) == ("fw1", "timeout"), refused
        assert timeouts.get() == before + 1
    finally:
        ctrl.close()
        await fw1.close()
        transport.close()


async def _fw1_towards(fw2: asyncio.Server, mode: str = "recursive", **extra):
    """fw1 in this process, its route to SERVER through ``fw2`` (a server the test
    plays the next hop with), and alice's config for it: (fw1, config)."""
    from kakehashi.chain.proxy import ChainProxy, ProxyConfig

    k = {p: crypto.parse_shared_key(crypto.new_shared_key())
         for p in ("alice-fw1", "alice-fw2", "fw1-fw2")}
    fw1 = ChainProxy(ProxyConfig(
        name="fw1", host="127.0.0.1", port=0, udp_ports=tables.PortRange(1024, 65535),
        keys={"fw2": k["fw1-fw2"], "alice": k["alice-fw1"]},
        routes=tables.parse_routes({
            f"{SERVER[0]}/32": f"fw2@127.0.0.1:{fw2.sockets[0].getsockname()[1]}"}),
        acl=tables.parse_acl([{"user": "alice", "from": "127.0.0.0/8", "ports": "any"}]),
        **extra))
    await fw1.start()
    cfg = ForwardConfig(user="alice", keys={"fw1": k["alice-fw1"], "fw2": k["alice-fw2"]},
                        first_hop=tables.Hop("fw1", "127.0.0.1", fw1.address[1]), to=SERVER,
                        udp_listen=("127.0.0.1", 0), mode=mode,  # type: ignore[arg-type]
                        setup_timeout=20)
    return fw1, cfg


def _stall_writes(conn) -> None:
    """From now on every write to ``conn`` waits for room that never comes: its peer
    reads nothing more and the buffers between are full. (Filling real buffers is not
    stable: the receiving kernel may collapse its queue and open the window again.)"""
    async def never(data) -> None:
        await asyncio.Event().wait()

    conn.send_all = never


@pytest.mark.parametrize("mode", ["recursive", "iterative"])
async def test_a_next_hop_that_does_not_read_during_setup_is_named(mode):
    """fw2 takes fw1's connection and the preamble, then reads nothing more (hung, or
    overloaded: its buffers are full; fw1's writes to it wait) and sends its
    challenge. fw1's answer cannot go out; after auth_timeout fw1 must refuse naming
    fw2 (next-hop), as when fw2 does not answer. Before, the send's TimeoutError left
    the session as an OSError: the client's connection was closed with no refusal
    ('fw1: protocol: closed the control connection during setup'), and the log would
    have blamed the requester."""
    from kakehashi.chain import messages as m
    from kakehashi.chain.proxy import ChainProxy

    fw1: ChainProxy | None = None
    held: list[asyncio.StreamWriter] = []

    async def deaf(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        held.append(w)
        await r.readexactly(len(wire.PREAMBLE))
        assert fw1 is not None
        (session,) = [s for s in fw1.sessions if s.down is not None]
        _stall_writes(session.down.fc.conn)  # fw1's end: fw2 no longer reads
        w.write(m.codec.encode(m.Challenge("fw2", bytes(32))))

    fw2 = await asyncio.start_server(deaf, "127.0.0.1", 0)
    fw1, cfg = await _fw1_towards(fw2, mode, auth_timeout=3)
    try:
        with pytest.raises(SetupFailed) as err:
            await build_chain(cfg)
        assert (err.value.hop, err.value.reason) == ("fw1", "next-hop"), err.value
        assert "fw2 did not read within" in err.value.text, err.value
    finally:
        await fw1.close()
        for w in held:
            w.close()
        fw2.close()


def _no_udp_port(host: str, port: int = 0) -> socket.socket:
    import errno

    raise OSError(errno.EMFILE, "Too many open files")


async def test_socks_association_without_a_udp_port_is_refused_and_leaves_nothing(
        monkeypatch):
    """No UDP port for the association (descriptors exhausted, say): the client gets
    reply 1 (general failure) and nothing stays. Before, the OSError closed the TCP
    connection without a reply."""
    from kakehashi.chain import socks
    from kakehashi.chain.socks import SocksConfig, SocksServer
    from tests.support.wait import async_wait_until

    fw1, cfg, transport, _ = await _one_proxy()
    server = SocksServer(SocksConfig("127.0.0.1", 0, cfg))
    await server.start()
    base = _fds()
    monkeypatch.setattr(socks, "bind_udp", _no_udp_port)
    r, w = await asyncio.open_connection(*server.address)
    try:
        w.write(b"\x05\x01\x00")
        assert await r.readexactly(2) == b"\x05\x00"
        w.write(b"\x05\x03\x00\x01" + bytes(6))
        reply = await asyncio.wait_for(r.read(10), 10)
        assert reply[:2] == b"\x05\x01", reply
        w.close()
        await async_wait_until(lambda: not server.associations and not server.limits.count
                               and _fds() == base, what="nothing left of the association")
    finally:
        w.close()
        await server.close()
        await fw1.close()
        transport.close()


async def test_socks_chain_without_a_udp_port_leaves_no_route(monkeypatch):
    """The first datagram to a destination builds its chain; the chain's UDP port P1
    cannot be had. Before, the OSError escaped Association.build: the route stayed (one
    of max_destinations for good, every later datagram to it queued and dropped), with
    the task's exception never retrieved. Now it goes like a refusal - the route, the
    connection to fw1, the descriptors - and the destination is held off for a while."""
    from kakehashi.chain import forward
    from kakehashi.core import socks5
    from tests.support.wait import async_wait_until

    loop = asyncio.get_running_loop()
    async with _socks_association() as (fw1, cfg, assoc, u, bnd, echo):
        base = _fds()
        with monkeypatch.context() as patch:
            patch.setattr(forward, "bind_udp", _no_udp_port)
            u.sendto(socks5.encode_udp(*cfg.to, b"no port for this"), bnd)
            await async_wait_until(lambda: cfg.to in assoc.refused, what="the destination "
                                   "held off after its chain failed")
        assert not assoc.routes
        await async_wait_until(lambda: not fw1.sessions and _fds() == base,
                               what="fw1's session and the descriptors gone")
        assoc.refused.clear()  # (not to wait out the hold)
        u.sendto(socks5.encode_udp(*cfg.to, b"now"), bnd)
        data = await asyncio.wait_for(loop.sock_recv(u, 200), 10)
        assert data == socks5.encode_udp(*cfg.to, b"now") and echo.count == 1


async def test_a_proxy_without_data_ports_refuses_and_keeps_nothing():
    """fw1's udp_ports range has two ports and the test holds one: a session's second
    port cannot be bound. The client is refused (fw1, ports), and fw1's sessions, slots
    and descriptors are back where they were (a guard: this held before as well)."""
    from tests.support.wait import async_wait_until

    low = _free_udp_range(2)
    taken = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    taken.bind(("127.0.0.1", low + 1))
    fw1, cfg, transport, _ = await _one_proxy(udp_ports=tables.PortRange(low, low + 1))
    base = _fds()
    try:
        for _ in range(3):
            with pytest.raises(SetupFailed) as err:
                await build_chain(cfg)
            assert (err.value.hop, err.value.reason) == ("fw1", "ports"), err.value
        await async_wait_until(
            lambda: not fw1.sessions and not fw1.limits.setups and not fw1.limits.users
            and not fw1.limits.addresses and fw1.limits.count == 0 and _fds() == base,
            what="fw1's sessions, slots and descriptors back")
    finally:
        taken.close()
        await fw1.close()
        transport.close()


async def _forwarded(fw2: tuple[str, int], key: bytes, user: str, origin: str,
                     refused: bool = False):
    """Play fw1 forwarding ``user``'s request from ``origin`` to fw2: (the control
    connection, fw2's refusal or None once the request went out; with ``refused``,
    the answer to the request is read as well)."""
    from kakehashi.chain import messages as m
    from kakehashi.chain.hop import Admitted, NextHop, Refuse
    from kakehashi.chain.proxy import Ctrl
    from kakehashi.core.stream import FramedConn, open_tcp

    req = m.Request(rid=1, server=m.Endpoint(*SERVER), requester=m.Endpoint(origin, 4000),
                    user=user)
    hop = tables.Hop("fw2", *fw2)
    nh = NextHop("fw1", {"fw2": key}, hop,
                 Admitted(req, user, m.Endpoint(origin, 4000), None, hop),
                 m.Endpoint("127.0.0.1", 40000))
    ctrl = Ctrl(FramedConn(await open_tcp(*fw2), m.LIMITS))
    await ctrl.fc.send(wire.PREAMBLE)
    while nh.state != "reply":
        msg = await ctrl.read(20)
        assert msg is not None
        try:
            outs = nh.receive(msg)
        except Refuse as exc:
            return ctrl, exc.msg
        if nh.auth.done and ctrl.channel is None:
            ctrl.seal(nh.auth, "fw2")
        for out in outs:
            await ctrl.send(out)
    if refused:
        answer = await ctrl.read(20)
        assert isinstance(answer, m.Refused), answer
        return ctrl, answer
    return ctrl, None


async def test_setups_forwarded_by_a_proxy_are_bounded_per_user_and_origin():
    """At fw2 every setup fw1 forwards comes from fw1's address. Its setups in flight
    (here: waiting for fw3, which says nothing) were bounded per connection address,
    so max_per_client of them - from different users and clients behind fw1 - took
    fw1's whole share and the next user was refused ('address 127.0.0.1 already has 2
    setups in progress'). Now, once authenticated fw1's request is admitted, the setup
    counts on the user and the origin it vouches for: five users from five origins are
    all in flight, while one origin (or one user) is still bounded at 2."""
    from kakehashi.chain.proxy import ChainProxy, ProxyConfig
    from tests.support.wait import async_wait_until

    held: list[asyncio.StreamWriter] = []

    async def silent(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        held.append(w)

    fw3 = await asyncio.start_server(silent, "127.0.0.1", 0)
    key = crypto.parse_shared_key(crypto.new_shared_key())
    fw2 = ChainProxy(ProxyConfig(
        name="fw2", host="127.0.0.1", port=0, udp_ports=tables.PortRange(1024, 65535),
        keys={"fw1": key, "fw3": crypto.parse_shared_key(crypto.new_shared_key())},
        routes=tables.parse_routes({
            f"{SERVER[0]}/32": f"fw3@127.0.0.1:{fw3.sockets[0].getsockname()[1]}"}),
        acl=tables.parse_acl([{"user": "*", "from": "10.0.0.0/8", "ports": "any"}]),
        forwarders=frozenset({"fw1"}), max_per_client=2, max_per_user=2, auth_timeout=60))
    await fw2.start()
    conns = []
    try:
        # five users behind fw1, each from its own address; then one client (one
        # origin) with several users, and one user from several origins: bounded at 2
        cases = [*((f"user{i}", f"10.1.0.{i + 1}", None) for i in range(5)),
                 ("other0", "10.1.0.99", None), ("other1", "10.1.0.99", None),
                 ("other2", "10.1.0.99", "address 10.1.0.99"),
                 ("user0", "10.1.0.50", None), ("user0", "10.1.0.51", "user 'user0'")]
        admitted = 0
        for user, origin, bound in cases:
            ctrl, refused = await _forwarded(fw2.address, key, user, origin, bound is not None)
            conns.append(ctrl)
            if bound is None:
                assert refused is None, (user, origin, refused)
                admitted += 1
                await async_wait_until(lambda n=admitted: fw2.limits.count == n,
                                       what="the setup in flight at fw2")
            else:
                assert refused is not None and refused.reason == "limit", refused
                assert bound in refused.text, refused
    finally:
        for c in conns:
            c.close()
        await fw2.close()
        for w in held:
            w.close()
        fw3.close()


@pytest.mark.parametrize("mode", ["recursive", "iterative"])
async def test_a_first_hop_that_does_not_read_fails_the_setup_in_time(monkeypatch, mode):
    """The first hop takes the client's connection and preamble, then reads nothing
    more (the client's writes to it wait) and sends its challenge.
    The client's answer cannot go out: build_chain must fail within its setup timeout
    naming fw1 (timeout). Its sends had no deadline (only its reads had), so it waited
    for good - chain forward, chain trace and the SOCKS server with it."""
    from kakehashi.chain import forward
    from kakehashi.chain import messages as m

    conns: list = []
    real_open = forward.open_tcp

    async def open_tcp(*args, **kw):
        conn = await real_open(*args, **kw)
        conns.append(conn)
        return conn

    monkeypatch.setattr(forward, "open_tcp", open_tcp)
    held: list[asyncio.StreamWriter] = []

    async def deaf(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        held.append(w)
        await r.readexactly(len(wire.PREAMBLE))
        (conn,) = conns
        _stall_writes(conn)  # the client's end: fw1 no longer reads
        w.write(m.codec.encode(m.Challenge("fw1", bytes(32))))

    fw1 = await asyncio.start_server(deaf, "127.0.0.1", 0)
    cfg = _config(fw1.sockets[0].getsockname()[1], mode)
    cfg.setup_timeout = 5
    try:
        with pytest.raises(SetupFailed) as err:
            await asyncio.wait_for(build_chain(cfg), 30)
        assert (err.value.hop, err.value.reason) == ("fw1", "timeout"), err.value
        assert "did not read" in err.value.text, err.value
    finally:
        for w in held:
            w.close()
        fw1.close()


@pytest.mark.parametrize("how", ["close", "reset"])
async def test_a_requester_that_leaves_while_the_next_hops_are_asked_ends_the_setup(how):
    """Recursive mode: the client authenticates with fw1, sends its request (saying
    nothing of how long it waits) and leaves while fw1 asks fw2, which says nothing.
    fw1 read nothing from the client meanwhile, so the session - its ports, its slots,
    its connection to fw2 - stayed until fw2 answered or fw1's wait for it ran out
    (auth_timeout, 300 s here). Now it ends when the client leaves."""
    from tests.support.wait import async_wait_until

    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def silent(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        held.append((r, w))

    fw2 = await asyncio.start_server(silent, "127.0.0.1", 0)
    fw1, cfg = await _fw1_towards(fw2, auth_timeout=300)
    base = _fds()
    try:
        assert await _setup_cut_after(cfg, 2, how) == 2  # the answer and the request
        await async_wait_until(lambda: held, what="fw1 asking fw2")
        await async_wait_until(
            lambda: not fw1.sessions and not fw1.limits.setups and fw1.limits.count == 0,
            what="fw1's session and slots gone")
        r, w = held[0]
        assert await asyncio.wait_for(r.read(), 10) == wire.PREAMBLE  # then fw1 closed
        w.close()
        await async_wait_until(lambda: _fds() == base, what="the descriptors back")
    finally:
        await fw1.close()
        for _, w in held:
            w.close()
        fw2.close()
