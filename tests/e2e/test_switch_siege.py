"""The socket switch under siege: bursts in parallel, a real server that does not
answer, churn of gateway links, readers that never read. Real processes on loopback;
every wait is on something observable."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed

from tests.e2e.framework import Env, roundtrip, wait_until
from tests.e2e.switch_fixtures import Switch, password, port_of, raw_link

#: the server's --client-timeout here: how long a silent client may hold a connection
CLIENT_TIMEOUT = 3.0


@pytest.fixture(scope="module")
def sw(tmp_path_factory, echo_mod):
    env = Env(tmp_path_factory.mktemp("switch-siege"))
    try:
        s = Switch(env).start("--client-timeout", str(CLIENT_TIMEOUT))
        s.gateway("asp1", "gw-srv")
        s.gateway("alice", "gw-alice")
        s.register("echo", echo_mod.addr, allow=("alice",))
        yield s
    finally:
        env.close()


@contextlib.contextmanager
def silent_server() -> Iterator[str]:
    """A real server that never completes a TCP handshake: its accept queue is full
    (backlog 0, one connection parked in it), so the kernel drops further SYNs and a
    connect to it hangs until the connector gives up."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(0)
    addr = lsock.getsockname()
    parked = []
    try:
        for _ in range(2):  # fill the queue (its length is backlog + 1 on Linux)
            s = socket.socket()
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect(addr)
            parked.append(s)
        yield f"{addr[0]}:{addr[1]}"
    finally:
        for s in parked:
            s.close()
        lsock.close()


def test_a_silent_real_server_does_not_stall_the_gateway_link(sw: Switch) -> None:
    """S3b checks that the real server can be reached; a server that never answers
    must hold up only its own setup, not the server-side gateway's link that every
    other tunnel of that gateway rides on (old code: the gateway awaited the probe in
    its link reader, so the echo below waited until the probe gave up)."""
    t = sw.open("echo")
    with silent_server() as target:
        sw.register("silent", target, allow=("alice",))
        pending: dict[str, Any] = {}

        def open_silent() -> None:
            with contextlib.suppress(Exception):
                pending["result"] = sw.open("silent")

        th = threading.Thread(target=open_silent, daemon=True)
        th.start()
        setting = wait_until(lambda: next(
            (r for r in sw.api("alice").request("GET", "/v1/tunnels")
             if r["service"] == "silent"), None), 15, what="the silent tunnel is setting")
        assert setting["state"] == "setting"
        # the echo tunnel rides the same server-side gateway link: it answers while
        # the silent server's setup is still pending
        assert roundtrip(port_of(t), b"ping" * 1000) == b"ping" * 1000
        now = sw.api("alice").request("GET", f"/v1/tunnels/{setting['tunnel']}")
        assert now["state"] == "setting", now
        th.join(60)
    assert "result" not in pending  # the silent service never became established
    sw.close(t["tunnel"])


def server_fds(sw: Switch) -> int:
    return len(os.listdir(f"/proc/{sw.procs['server'].popen.pid}/fd"))


def cut(sock: socket.socket) -> bool:
    """Whether the server has closed or reset ``sock`` (reading what it sent)."""
    sock.setblocking(False)
    try:
        while data := sock.recv(1 << 20):
            del data
        return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_silent_and_non_reading_clients_are_cut(sw: Switch) -> None:
    """Clients that connect and say nothing, trickle a request head, or pipeline
    requests and never read the replies: each is cut once --client-timeout passes, the
    server's descriptors come back to where they were, and others are served
    meanwhile. Old code: uvicorn kept all of them open for ever (a few thousand such
    sockets and the server cannot accept its gateways)."""
    before = server_fds(sw)
    socks = []
    try:
        for i in range(60):
            s = socket.create_connection(("127.0.0.1", sw.port), 10)
            if i % 3 == 1:  # a head that never ends
                s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            elif i % 3 == 2:  # replies it never reads
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                s.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n" * 2000)
            socks.append(s)
        # (the first may be cut already on a loaded machine: some are held)
        wait_until(lambda: server_fds(sw) > before, 15, what="the server holds them")
        assert sw.api("alice").request("GET", "/v1/health")["ok"]
        # (a non-reader hears of it only once it reads what the kernel still sends)
        wait_until(lambda: all(cut(s) for i, s in enumerate(socks) if i % 3 != 2),
                   10 * CLIENT_TIMEOUT + 20, what="every silent client is cut")
        wait_until(lambda: server_fds(sw) <= before + 2, 10 * CLIENT_TIMEOUT + 20,
                   what="the server's descriptors come back")
    finally:
        for s in socks:
            s.close()
    assert sw.api("alice").request("GET", "/v1/health")["ok"]


def test_a_flood_of_forged_messages_cuts_the_link(sw: Switch) -> None:
    """Every refused message writes an audit line and an answer; a link of nothing but
    forged tunnel IDs (one body of 5,000 here; old code: 780,000 audit lines for
    36 MB sent) is cut once its user's refusal budget is spent, and the audit log
    holds about that budget, not one line per forgery. Real gateways go on."""
    from kakehashi.switch import messages as m
    from kakehashi.switch.server import REFUSAL_BURST

    t = sw.open("echo")
    before = len(sw.audit())
    with raw_link(sw, "mallory", "gw-forger") as ws:
        ws.send(m.encode_many([m.Credit(tunnel="tforged", stream=i + 1, n=1)
                               for i in range(5000)]))
        answers = []
        with contextlib.suppress(ConnectionClosed):
            while not any(isinstance(a, m.Refused) for a in answers):
                answers += m.decode_to_gateway(ws.recv(timeout=30))
    refusal = next(a for a in answers if isinstance(a, m.Refused))
    assert refusal.code == "too-many-refusals", refusal
    refused = [e for e in sw.audit()[before:] if e["event"] == "refused"]
    assert REFUSAL_BURST <= len(refused) <= REFUSAL_BURST + 100, len(refused)
    assert roundtrip(port_of(t), b"still here") == b"still here"
    sw.close(t["tunnel"])


def server_rss_kib(sw: Switch) -> int:
    status = Path(f"/proc/{sw.procs['server'].popen.pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0])


@pytest.mark.parametrize("head", [
    b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-h: v\r\n" * 8192,  # ever more headers
    b"GET /" + b"a" * 65536,  # a request line that never ends
])
def test_an_endless_request_head_is_refused_early(sw: Switch, head: bytes) -> None:
    """Before any login: a request head that goes on and on. Old code: uvicorn kept
    every header (300 MiB of small headers took the server to 4.6 GB of memory in a
    few seconds); now the head is refused (431) once it passes 64 KiB, the memory
    stays where it was and the server goes on serving."""
    before = server_rss_kib(sw)
    sent = 0
    answer = b""
    with socket.create_connection(("127.0.0.1", sw.port), 10) as s:
        with contextlib.suppress(OSError):  # (a reset once refused)
            s.sendall(head)
            chunk = head[head.index(b"\r\n") + 2:] if b"\r\n" in head else b"a" * 65536
            while sent < 64 << 20:
                s.sendall(chunk)
                sent += len(chunk)
        with contextlib.suppress(OSError):
            answer = s.recv(200)
    assert sent < 64 << 20, "the server took 64 MiB of request head"
    assert answer == b"" or answer.startswith(b"HTTP/1.1 431"), answer
    assert server_rss_kib(sw) < before + 32 * 1024
    assert sw.api("alice").request("GET", "/v1/health")["ok"]


def test_link_churn_leaves_nothing_behind(sw: Switch) -> None:
    """Ten rounds of gateway links that come and go: WebSocket links that say hello
    and leave, that leave before their hello, upgrades cut half-way through their
    request or right after the server's answer. The server's descriptors come back to
    where they were, none of the churned gateways stays online, the memory stays
    bounded (a loose bound: the collector of cycles runs seldom, see core/runner),
    and real gateways go on."""
    import asyncio
    import base64

    import websockets

    from kakehashi.switch import messages as m

    t = sw.open("echo")
    auth = "Basic " + base64.b64encode(f"mallory:{password('mallory')}".encode()).decode()
    url = f"ws://127.0.0.1:{sw.port}/v1/gateway/link"
    upgrade = ("GET /v1/gateway/link HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
               "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
               f"Sec-WebSocket-Version: 13\r\nAuthorization: {auth}\r\n\r\n").encode()

    async def hello_and_leave(i: int) -> None:
        async with websockets.connect(url, additional_headers={"Authorization": auth}) as ws:
            await ws.send(m.encode(m.Hello(name=f"gw-churn-{i % 7}")))
            await ws.recv()

    async def leave_before_hello(i: int) -> None:
        async with websockets.connect(url, additional_headers={"Authorization": auth}):
            pass

    async def cut_upgrade(i: int) -> None:
        _, writer = await asyncio.open_connection("127.0.0.1", sw.port)
        writer.write(upgrade[:(i * 13) % len(upgrade)])
        await writer.drain()
        writer.transport.abort()

    async def cut_after_upgrade(i: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", sw.port)
        writer.write(upgrade)
        await reader.readuntil(b"\r\n\r\n")
        writer.transport.abort()

    async def one_round() -> None:
        kinds = (hello_and_leave, leave_before_hello, cut_upgrade, cut_after_upgrade)
        done = await asyncio.gather(*(kind(i) for i in range(40) for kind in kinds),
                                    return_exceptions=True)  # (a replaced link is closed)
        assert sum(x is None for x in done) >= 100, [x for x in done if x is not None][:3]

    def churned_online() -> list[str]:
        return [g["name"] for g in sw.api("root").request("GET", "/v1/gateways")
                if g["name"].startswith("gw-churn") and g["online"]]

    asyncio.run(one_round())  # warm: first-use allocations are not growth
    wait_until(lambda: not churned_online(), 30, what="the warm-up's links are gone")
    fds, rss = server_fds(sw), server_rss_kib(sw)
    for _ in range(10):
        asyncio.run(one_round())
    wait_until(lambda: not churned_online(), 30, what="no churned gateway stays online")
    wait_until(lambda: server_fds(sw) <= fds + 2, 30, what="the server's descriptors come back")
    assert server_rss_kib(sw) < rss + 150 * 1024
    assert roundtrip(port_of(t), b"after the churn") == b"after the churn"
    sw.close(t["tunnel"])


def test_parallel_wrong_passwords_get_what_a_sequence_gets(tmp_path) -> None:
    """100 wrong passwords at once, to each door: the JSON API, the catalog's login
    form and the gateway link. Each user gets exactly the throttle's lockout (20) of
    password checks, like 100 one after another; every other attempt is refused
    without a check; nobody gets in; a right password is still taken afterwards.
    (A server of its own: the burst locks this address out for the others.)"""
    import asyncio
    import base64
    import re

    import httpx
    import websockets

    from kakehashi.core.identity import ThrottleSettings
    from kakehashi.switch import messages as m

    env = Env(tmp_path)
    try:
        sw = Switch(env).start()
        n, lockout = 100, ThrottleSettings().lockout

        async def api(c: httpx.AsyncClient, i: int) -> int:
            r = await c.get(f"{sw.url}/v1/whoami", auth=("alice", f"wrong-{i}"))
            return r.status_code

        async def form(i: int) -> str:
            async with httpx.AsyncClient(timeout=120) as c:
                page = await c.get(f"{sw.url}/login")
                csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
                assert csrf is not None
                r = await c.post(f"{sw.url}/login", data={
                    "csrf": csrf.group(1), "user": "mallory", "password": f"wrong-{i}"})
                return r.headers.get("location", "")

        async def link(i: int) -> str:
            auth = base64.b64encode(f"asp1:wrong-{i}".encode()).decode()
            async with websockets.connect(f"ws://127.0.0.1:{sw.port}/v1/gateway/link",
                                          additional_headers={"Authorization": f"Basic {auth}"},
                                          open_timeout=120) as ws:
                answer = m.decode_to_gateway(await ws.recv())[0]
                assert isinstance(answer, m.Refused)
                return answer.code

        async def bursts() -> tuple[list[int], list[str], list[str]]:
            async with httpx.AsyncClient(timeout=120,
                                         limits=httpx.Limits(max_connections=n)) as c:
                a = await asyncio.gather(*(api(c, i) for i in range(n)))
            f = await asyncio.gather(*(form(i) for i in range(n)))
            w = await asyncio.gather(*(link(i) for i in range(n)))
            return a, f, w

        statuses, locations, codes = asyncio.run(bursts())
        assert sorted(set(statuses)) == [401, 429] and statuses.count(401) == lockout
        assert sum("wrong" in loc for loc in locations) == lockout
        assert all("wrong" in loc or "too+many" in loc or "too%20many" in loc
                   for loc in locations), set(locations)
        assert codes.count("unauthenticated") == lockout and \
            codes.count("locked-out") == n - lockout
        checked = {}
        for e in sw.audit():
            if e["event"] == "login" and e.get("reason") == "wrong user or password":
                checked[e["user"]] = checked.get(e["user"], 0) + 1
        assert checked == {"alice": lockout, "mallory": lockout, "asp1": lockout}
        assert not any(e["event"] == "web-login" for e in sw.audit())
        assert sw.api("root").request("GET", "/v1/whoami")["user"] == "root"
    finally:
        env.close()


def test_csrf_tokens_do_not_cross_sessions(sw: Switch) -> None:
    """A CSRF token is its session's alone: alice's token with mallory's session (or
    with none, or another login form's pre-session cookie) is refused, and nothing is
    opened or closed; a logged-out session's token is dead too."""
    import re

    import httpx

    def login(user: str) -> tuple[httpx.Client, str]:
        c = httpx.Client(base_url=sw.url, timeout=60)
        page = c.get("/login")
        pre = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
        r = c.post("/login", data={"csrf": pre, "user": user, "password": password(user)})
        assert r.headers["location"] == "/", r.headers
        csrf = re.search(r'name="csrf" value="([^"]+)"', c.get("/").text)
        assert csrf is not None
        return c, csrf.group(1)

    alice, alice_csrf = login("alice")
    mallory, mallory_csrf = login("mallory")
    try:
        before = sw.api("root").request("GET", "/v1/tunnels")
        r = mallory.post("/ui/tunnels", data={"csrf": alice_csrf, "service": "echo",
                                              "gateway": "gw-alice"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "csrf"
        r = httpx.post(f"{sw.url}/ui/tunnels", data={"csrf": alice_csrf, "service": "echo",
                                                     "gateway": "gw-alice"})
        assert r.status_code == 303 and r.headers["location"] == "/login"  # no session
        # a login form's token with another browser's pre-session cookie
        other = httpx.Client(base_url=sw.url, timeout=60)
        other.get("/login")
        theirs = re.search(r'name="csrf" value="([^"]+)"',
                           httpx.get(f"{sw.url}/login").text).group(1)  # type: ignore[union-attr]
        r = other.post("/login", data={"csrf": theirs, "user": "alice",
                                       "password": password("alice")})
        other.close()
        assert "session+expired" in r.headers["location"]
        # logged out: the old token and cookie open nothing
        cookie = alice.cookies.get("kh_session")
        alice.post("/logout", data={"csrf": alice_csrf})
        r = httpx.post(f"{sw.url}/ui/tunnels", cookies={"kh_session": cookie or ""},
                       data={"csrf": alice_csrf, "service": "echo", "gateway": "gw-alice"})
        assert r.status_code == 303 and r.headers["location"] == "/login"
        assert sw.api("root").request("GET", "/v1/tunnels") == before
        assert mallory_csrf != alice_csrf
    finally:
        alice.close()
        mallory.close()
