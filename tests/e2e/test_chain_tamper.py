"""A man in the middle between two proxies alters a control message after their
authentication: the hop that receives it refuses, the control connection is cut and the
client is told which hop refused and why (messages after authentication are sealed)."""

from __future__ import annotations

import asyncio

import pytest

from kakehashi.chain import tables
from kakehashi.chain.forward import ForwardConfig, build_chain
from kakehashi.chain.proxy import ChainProxy, ProxyConfig
from kakehashi.chain.setup import SetupFailed
from kakehashi.core import crypto, wire

SERVER = ("127.0.0.3", 9)  # never contacted: the test is about the setup


class Mitm:
    """A TCP relay that flips the last byte of the ``nth`` frame in one direction."""

    def __init__(self, target: tuple[str, int], direction: str | None, nth: int) -> None:
        self.target, self.direction, self.nth = target, direction, nth
        self.flipped = 0
        self.server: asyncio.base_events.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _conn(self, r1: asyncio.StreamReader, w1: asyncio.StreamWriter) -> None:
        r2, w2 = await asyncio.open_connection(*self.target)
        await asyncio.gather(self._pipe(r1, w2, "down", len(wire.PREAMBLE)),
                             self._pipe(r2, w1, "up", 0), return_exceptions=True)

    async def _pipe(self, r: asyncio.StreamReader, w: asyncio.StreamWriter, name: str,
                    skip: int) -> None:
        try:
            if skip:
                w.write(await r.readexactly(skip))
            n = 0
            while True:
                head = await r.readexactly(wire.HEADER_SIZE)
                _, length = wire.decode_header(head)
                body = bytearray(await r.readexactly(length))
                n += 1
                if name == self.direction and n == self.nth and body:
                    body[-1] ^= 0x01
                    self.flipped += 1
                w.write(head + bytes(body))
                await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            w.close()


async def scenario(direction: str | None, nth: int,
                   mode: str = "recursive") -> tuple[str, Mitm]:
    k = {p: crypto.new_shared_key() for p in ("alice-fw1", "fw1-fw2", "alice-fw2")}
    raw = {p: crypto.parse_shared_key(v) for p, v in k.items()}
    acl = tables.parse_acl([{"user": "alice", "from": "127.0.0.0/8", "ports": "any"}])

    def cfg(name: str, keys: dict[str, bytes], route: str) -> ProxyConfig:
        return ProxyConfig(name=name, host="127.0.0.1", port=0,
                           udp_ports=tables.PortRange(1024, 65535), keys=keys,
                           routes=tables.parse_routes({f"{SERVER[0]}/32": route}), acl=acl)

    fw2 = ChainProxy(cfg("fw2", {"fw1": raw["fw1-fw2"], "alice": raw["alice-fw2"]},
                         "direct"))
    await fw2.start()
    mitm = Mitm(fw2.address, direction, nth)
    mport = await mitm.start()
    fw1 = ChainProxy(cfg("fw1", {"alice": raw["alice-fw1"], "fw2": raw["fw1-fw2"]},
                         f"fw2@127.0.0.1:{mport}"))
    await fw1.start()
    try:
        chain = await build_chain(ForwardConfig(
            user="alice", keys={"fw1": raw["alice-fw1"], "fw2": raw["alice-fw2"]},
            first_hop=tables.Hop("fw1", "127.0.0.1", fw1.address[1]), to=SERVER,
            udp_listen=("127.0.0.1", 0), mode=mode))  # type: ignore[arg-type]
        chain.ctrl.close()
        chain.data_sock.close()  # type: ignore[attr-defined]
        return "built " + ",".join(chain.setup.path), mitm
    except SetupFailed as exc:
        return f"{exc.hop}|{exc.reason}|{exc.text}", mitm
    finally:
        await fw1.close()
        await fw2.close()
        assert mitm.server is not None
        mitm.server.close()


@pytest.mark.parametrize("mode", ["recursive", "iterative"])
def test_untouched_relay_is_transparent(mode):
    out, _ = asyncio.run(scenario(None, 0, mode))
    assert out == "built fw1,fw2"


@pytest.mark.parametrize(("direction", "nth", "hop", "names"), [
    ("down", 2, "fw2", "fw1"),  # fw1's sealed Request, altered on its way to fw2
    ("up", 3, "fw1", "fw2"),  # fw2's sealed Reply, altered on its way to fw1
])
def test_an_altered_control_message_after_authentication_is_refused(direction, nth, hop,
                                                                    names):
    out, mitm = asyncio.run(scenario(direction, nth))
    assert mitm.flipped == 1
    refused_by, reason, text = out.split("|", 2)
    assert (refused_by, reason) == (hop, "integrity"), out
    assert names in text and "integrity check" in text, out


#: iterative mode, frames on the fw1 -> fw2 connection (after fw1's own authentication,
#: every one is sealed there; the client's part is sealed end to end inside as well)
ITERATIVE = [
    ("down", 2, "fw2", "fw1"),  # fw1's own part of the request (its P3, via, origin)
    ("down", 3, "fw2", "fw1"),  # the client's relayed answer to fw2's challenge
    ("down", 4, "fw2", "fw1"),  # the client's request, sealed end to end inside
    ("up", 3, "fw1", "fw2"),  # fw2's challenge for the client
    ("up", 4, "fw1", "fw2"),  # fw2's proof for the client
    ("up", 5, "fw1", "fw2"),  # fw2's Reply to fw1 (its P4 for fw1's area 3142)
    ("up", 6, "fw1", "fw2"),  # fw2's Reply to the client, sealed end to end inside
]


@pytest.mark.parametrize(("direction", "nth", "hop", "names"), ITERATIVE)
def test_iterative_an_altered_message_between_the_proxies_is_refused(direction, nth, hop,
                                                                     names):
    """The issue's gap: in iterative mode the proxy-to-proxy leg was not sealed, so a
    man in the middle between fw1 and fw2 could alter what fw1 adds to the client's
    request or the Reply that carries fw2's ports, undetected."""
    out, mitm = asyncio.run(scenario(direction, nth, "iterative"))
    assert mitm.flipped == 1
    refused_by, reason, text = out.split("|", 2)
    assert (refused_by, reason) == (hop, "integrity"), out
    assert names in text and "integrity check" in text, out


class DeadHop:
    """A next hop that accepts the control connection, then closes it at once
    (``close``) or says nothing (``silent``)."""

    def __init__(self, how: str) -> None:
        self.how = how
        self.server: asyncio.base_events.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _conn(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        if self.how == "close":
            w.close()
        else:
            self.writers.append(w)

    def close(self) -> None:
        for w in self.writers:
            w.close()
        assert self.server is not None
        self.server.close()


@pytest.mark.parametrize(("how", "says"), [("close", "fw2 closed the connection"),
                                           ("silent", "fw2 did not authenticate within")])
@pytest.mark.parametrize("mode", ["recursive", "iterative"])
def test_a_next_hop_that_dies_or_stays_silent_is_named(how, says, mode):
    """Iterative mode used to cut the client off without a word (it saw "closed the
    control connection", or its own timeout); both modes now say which hop and why."""
    async def go() -> str:
        k = crypto.new_shared_key()
        acl = tables.parse_acl([{"user": "alice", "from": "127.0.0.0/8", "ports": "any"}])
        dead = DeadHop(how)
        port = await dead.start()
        fw1 = ChainProxy(ProxyConfig(
            name="fw1", host="127.0.0.1", port=0, udp_ports=tables.PortRange(1024, 65535),
            keys={"alice": crypto.parse_shared_key(k), "fw2": crypto.parse_shared_key(k)},
            routes=tables.parse_routes({f"{SERVER[0]}/32": f"fw2@127.0.0.1:{port}"}),
            acl=acl, auth_timeout=0.5))
        await fw1.start()
        try:
            chain = await build_chain(ForwardConfig(
                user="alice", keys={"fw1": crypto.parse_shared_key(k)},
                first_hop=tables.Hop("fw1", "127.0.0.1", fw1.address[1]), to=SERVER,
                udp_listen=("127.0.0.1", 0), mode=mode, setup_timeout=20))  # type: ignore[arg-type]
            chain.close()
            chain.data_sock.close()  # type: ignore[attr-defined]
            return "built"
        except SetupFailed as exc:
            return f"{exc.hop}|{exc.reason}|{exc.text}"
        finally:
            await fw1.close()
            dead.close()

    refused_by, reason, text = asyncio.run(go()).split("|", 2)
    assert (refused_by, reason) == ("fw1", "next-hop"), text
    if mode == "iterative":
        assert says in text, text
    else:
        assert "fw2" in text, text


@pytest.mark.parametrize(("mode", "reported_by"), [("iterative", "fw2"), ("recursive", "fw1")])
def test_a_later_hops_refusal_says_whose_word_it_is(mode, reported_by):
    """fw2's access control refuses alice, whom fw1 admitted. Iterative mode: the client
    authenticated with fw2 through fw1, and fw2 seals its refusal end to end, so fw1
    passes it on unread and the client has it on fw2's own word. Recursive mode: fw2
    refuses fw1's request and fw1 passes the refusal up on its sealed connection; the
    client shares no key with fw2 there, so it has the refusal on fw1's word, and says
    so."""
    async def go() -> SetupFailed:
        k = {p: crypto.parse_shared_key(crypto.new_shared_key())
             for p in ("alice-fw1", "fw1-fw2", "alice-fw2")}
        fw2 = ChainProxy(ProxyConfig(
            name="fw2", host="127.0.0.1", port=0, udp_ports=tables.PortRange(1024, 65535),
            keys={"fw1": k["fw1-fw2"], "alice": k["alice-fw2"]},
            routes=tables.parse_routes({f"{SERVER[0]}/32": "direct"}),
            acl=tables.parse_acl([{"user": "alice", "from": "10.9.0.0/16",
                                   "ports": "any"}])))
        await fw2.start()
        fw1 = ChainProxy(ProxyConfig(
            name="fw1", host="127.0.0.1", port=0, udp_ports=tables.PortRange(1024, 65535),
            keys={"alice": k["alice-fw1"], "fw2": k["fw1-fw2"]},
            routes=tables.parse_routes({f"{SERVER[0]}/32": f"fw2@127.0.0.1:{fw2.address[1]}"}),
            acl=tables.parse_acl([{"user": "alice", "from": "127.0.0.0/8", "ports": "any"}])))
        await fw1.start()
        try:
            with pytest.raises(SetupFailed) as err:
                await build_chain(ForwardConfig(
                    user="alice", keys={"fw1": k["alice-fw1"], "fw2": k["alice-fw2"]},
                    first_hop=tables.Hop("fw1", "127.0.0.1", fw1.address[1]), to=SERVER,
                    udp_listen=("127.0.0.1", 0), mode=mode))  # type: ignore[arg-type]
            return err.value
        finally:
            await fw1.close()
            await fw2.close()

    e = asyncio.run(go())
    assert (e.hop, e.reason, e.reported_by) == ("fw2", "access", reported_by), str(e)
    assert "access control does not admit user 'alice'" in e.text
    assert e.verified == (reported_by == "fw2")
    assert ("not authenticated by fw2" in str(e)) != e.verified
