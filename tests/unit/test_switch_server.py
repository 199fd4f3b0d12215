"""The server's asyncio layer without HTTP: links replaced, streams told, refusals."""

from __future__ import annotations

import pytest

from kakehashi.core.store import open_store
from kakehashi.core.web import ApiError
from kakehashi.switch import messages as m
from kakehashi.switch.server import ServiceIn, SwitchServer, Who

ASP, ALICE = Who(user="asp1", role="asp"), Who(user="alice", role="user")


async def established(srv: SwitchServer):
    srv_link, _ = await srv.attach(m.Hello(name="gw-srv"), ASP, "websocket")
    alice_link, _ = await srv.attach(m.Hello(name="gw-alice"), ALICE, "websocket")
    srv.register(ASP, ServiceIn(name="echo", gateway="gw-srv", target="127.0.0.1:7",
                                allow=["alice"]))
    t = await srv.begin_tunnel(ALICE, "echo", "gw-alice", "127.0.0.1:0")
    for link in (alice_link, srv_link):
        for msg in m.decode_to_gateway(link.take()):
            if isinstance(msg, m.Setup):
                await srv.receive(link, m.encode(m.Done(req=msg.req, tunnel=t.id, ok=True,
                                                        address="127.0.0.1:9")))
    assert t.state.value == "established"
    return t, srv_link, alice_link


async def test_a_new_link_of_a_gateway_tells_the_other_side_its_streams_died(tmp_path):
    srv = SwitchServer(open_store(tmp_path / "s.db"))
    t, srv_link, alice_link = await established(srv)
    await srv.receive(alice_link, m.encode(m.Open(tunnel=t.id, stream=1)))
    assert srv.switch.live["echo"] == 1
    srv_link.take()
    # gw-alice reconnects before its old link was noticed dead
    new_link, welcome = await srv.attach(m.Hello(name="gw-alice", tunnels=[t.id]), ALICE,
                                         "poll")
    assert welcome.tunnels == [t.id] and alice_link.dead.is_set()
    assert srv.switch.live["echo"] == 0 and not t.offline
    assert m.Reset in [type(x) for x in m.decode_to_gateway(srv_link.take())]
    assert srv.links["gw-alice"] is new_link


async def test_another_users_hello_does_not_replace_a_link(tmp_path):
    srv = SwitchServer(open_store(tmp_path / "s.db"))
    _, _, alice_link = await established(srv)
    from kakehashi.switch.tunnels import Refusal

    with pytest.raises(Refusal):
        await srv.attach(m.Hello(name="gw-alice"), Who(user="mallory", role="user"), "poll")
    assert srv.links["gw-alice"] is alice_link and not alice_link.dead.is_set()


async def test_api_refusals_are_api_errors(tmp_path):
    srv = SwitchServer(open_store(tmp_path / "s.db"))
    await established(srv)
    with pytest.raises(ApiError) as exc:
        await srv.begin_tunnel(Who(user="mallory", role="user"), "echo", "gw-alice",
                               "127.0.0.1:0")
    assert exc.value.status == 404
    with pytest.raises(ApiError) as exc:
        await srv.close_tunnel(Who(user="mallory", role="user"), "tnope")
    assert exc.value.status == 404


async def test_a_datagram_flood_is_dropped_not_queued(tmp_path):
    """UDP has no credit: a flood towards a slow gateway is cut at a bound, and the
    gateway's link (and its TCP streams) survive it."""
    srv = SwitchServer(open_store(tmp_path / "s.db"))
    srv_link, _ = await srv.attach(m.Hello(name="gw-srv"), ASP, "websocket")
    alice_link, _ = await srv.attach(m.Hello(name="gw-alice"), ALICE, "websocket")
    srv.register(ASP, ServiceIn(name="dns", gateway="gw-srv", target="127.0.0.1:53",
                                proto="udp", allow=["alice"]))
    t = await srv.begin_tunnel(ALICE, "dns", "gw-alice", "127.0.0.1:0")
    for link in (alice_link, srv_link):
        for msg in m.decode_to_gateway(link.take()):
            if isinstance(msg, m.Setup):
                await srv.receive(link, m.encode(m.Done(req=msg.req, tunnel=t.id, ok=True)))
    await srv.receive(alice_link, m.encode(m.Open(tunnel=t.id, stream=1)))
    datagram = m.encode(m.Data(tunnel=t.id, stream=1, data=b"x" * 60_000))
    for _ in range(200):  # 12 MB that gw-srv never takes
        await srv.receive(alice_link, datagram)
    assert srv.dropped > 0 and not srv_link.dead.is_set()
    assert srv_link.outbox.bytes < 5 * 1024 * 1024


async def test_tunnel_records_follow_the_state_and_survive_a_restart(tmp_path):
    from kakehashi.switch.server import TUNNEL

    store = open_store(tmp_path / "s.db")
    srv = SwitchServer(store)
    t, _, _ = await established(srv)
    assert store.get(TUNNEL, t.id)["state"] == "established"
    gone = await srv.begin_tunnel(ALICE, "echo", "gw-alice", "127.0.0.1:0")
    assert store.get(TUNNEL, gone.id)["state"] == "setting"
    # a new process on the same store (the old one was killed: nothing was cleaned up)
    srv2 = SwitchServer(open_store(tmp_path / "s.db"))
    r = srv2.switch.tunnels[t.id]
    assert r.state.value == "established" and set(r.offline) == {"gw-srv", "gw-alice"}
    assert srv2.switch.tunnels[gone.id].state.value == "deleted"
    assert store.get(TUNNEL, gone.id) is None  # the half-way tunnel's record is removed
    _, w1 = await srv2.attach(m.Hello(name="gw-srv", tunnels=[t.id]), ASP, "websocket")
    _, w2 = await srv2.attach(m.Hello(name="gw-alice", tunnels=[t.id]), ALICE, "websocket")
    assert w1.tunnels == w2.tunnels == [t.id] and not r.offline
    assert [x["tunnel"] for x in srv2.tunnels_of(ALICE)] == [t.id]
    await srv2.close_tunnel(ALICE, t.id, wait=False)
    assert store.get(TUNNEL, t.id)["state"] == "deleting"
    await srv2.close()
    await srv.close()


async def test_a_websocket_link_is_paced_by_the_gateways_acks(tmp_path):
    """With acks asked for: data beyond the link window waits in the outbox (where a
    small frame can still go first), control does not, an ack frees room, every body
    taken off the link is acknowledged, and an ack of bytes never sent cuts the link."""
    from kakehashi.switch.mux import LINK_BODY

    srv = SwitchServer(open_store(tmp_path / "s.db"))
    link, _ = await srv.attach(m.Hello(name="gw-srv", acks=True), ASP, "websocket")
    assert link.pacer is not None
    window = link.pacer.window
    for i in range(40):
        link.put(m.Data(tunnel="t1", stream=1 + i % 4, data=b"x" * m.MAX_CHUNK))
    sent = 0
    while body := link.take_link():
        assert len(body) <= LINK_BODY + 1024
        sent += len(body)
    assert window <= sent < window + LINK_BODY + 1024 and link.outbox
    assert not link.ready.is_set()  # the writer sleeps until an ack (or control) comes
    link.put(m.Credit(tunnel="t1", stream=9, n=5))
    assert link.ready.is_set()
    assert m.decode_to_gateway(link.take_link()) == [m.Credit(tunnel="t1", stream=9, n=5)]
    body = m.encode(m.Ack(n=sent))
    await srv.receive(link, body)
    assert link.ready.is_set()
    got = m.decode_to_gateway(link.take_link())
    # what the gateway sent is acknowledged (body by body, in bytes), and data flows
    assert link.received == len(body) and got[0] == m.Ack(n=len(body))
    assert isinstance(got[1], m.Data)
    with pytest.raises(m.ProtocolError):
        await srv.receive(link, m.encode(m.Ack(n=link.pacer.sent_total + 1)))
    await srv.close()


async def test_a_link_without_acks_is_not_paced(tmp_path):
    """An old gateway (no acks in its hello) and the long-poll transport: no window."""
    srv = SwitchServer(open_store(tmp_path / "s.db"))
    link, _ = await srv.attach(m.Hello(name="gw-srv"), ASP, "websocket")
    poll, _ = await srv.attach(m.Hello(name="gw-alice", acks=True), ALICE, "poll")
    assert link.pacer is None and poll.pacer is None
    await srv.receive(link, m.encode(m.Credit(tunnel="tx", stream=1, n=1)))
    assert not any(isinstance(x, m.Ack) for x in m.decode_to_gateway(link.take(1 << 30)))
    await srv.close()


async def test_an_idle_node_acknowledges_every_few_bodies_a_busy_one_every_body(tmp_path):
    from kakehashi.switch.mux import ACK_EVERY, LINK_WINDOW_FLOOR

    assert ACK_EVERY < LINK_WINDOW_FLOOR  # a sender with a full window always hears
    srv = SwitchServer(open_store(tmp_path / "s.db"))
    link, _ = await srv.attach(m.Hello(name="gw-srv", acks=True), ASP, "websocket")
    link.take(m.MAX_BODY)  # the welcome
    body = m.encode_many([m.Ack(n=0)] * 1000)  # bodies that ask for no answer
    acks = []
    for _ in range(ACK_EVERY // len(body) + 1):
        await srv.receive(link, body)
        acks += [x for x in m.decode_to_gateway(link.take(m.MAX_BODY))
                 if isinstance(x, m.Ack)]
    # nothing else to send: one ack once ACK_EVERY bytes came
    assert acks == [m.Ack(n=(ACK_EVERY // len(body) + 1) * len(body))]
    link.put(m.Credit(tunnel="t", stream=1, n=1))  # something to send: the ack rides along
    await srv.receive(link, body)
    assert m.Ack(n=link.received) in m.decode_to_gateway(link.take(m.MAX_BODY))
    await srv.close()


async def test_data_is_passed_on_as_it_came_and_a_small_share_is_copied(tmp_path):
    """A Data message goes to the other gateway in the very frame it came in (a view of
    the body: no encoding again); Data that is a small share of its body is copied, so
    a body is not kept alive by a few bytes counted in an outbox."""
    srv = SwitchServer(open_store(tmp_path / "s.db"))
    t, srv_link, alice_link = await established(srv)
    await srv.receive(alice_link, m.encode(m.Open(tunnel=t.id, stream=1)))
    srv_link.outbox = type(srv_link.outbox)()
    chunk = m.encode(m.Data(tunnel=t.id, stream=1, data=b"x" * 60_000))
    body = chunk + m.encode(m.Credit(tunnel=t.id, stream=1, n=100))
    await srv.receive(alice_link, body)
    frame = srv_link.outbox._data[(t.id, 1)][0]
    assert isinstance(frame, memoryview) and frame.obj is body and bytes(frame) == chunk
    small = m.encode(m.Data(tunnel=t.id, stream=1, data=b"y"))
    await srv.receive(alice_link, small + m.encode(m.Credit(tunnel=t.id, stream=1,
                                                            n=1)) * 40)
    assert srv_link.outbox._data[(t.id, 1)][1] == small
    assert not isinstance(srv_link.outbox._data[(t.id, 1)][1], memoryview)
    sent = m.decode_to_gateway(srv_link.take())
    assert [x for x in sent if isinstance(x, m.Data)] == [
        m.Data(tunnel=t.id, stream=1, data=b"x" * 60_000),
        m.Data(tunnel=t.id, stream=1, data=b"y")]
