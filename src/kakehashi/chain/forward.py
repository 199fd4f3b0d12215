"""``chain forward``: the client end of a chain as a local UDP port (spec 004 Figs. 7, 10).

Unmodified UDP applications send to ``udp_listen``; each datagram leaves from the
client's data port (P1) to the first proxy's client-facing port (area 2141) and, through
the chain, reaches the server; answers come back the same way to the application that
sent last. The setup is :class:`~kakehashi.chain.setup.ClientSetup`; this module only
moves its messages and then runs the core datagram forwarder. The process exits (status
1, with the refusing hop and its reason on stderr) when the chain cannot be built or
when it closes; a supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from kakehashi.chain import messages as m
from kakehashi.chain.proxy import Ctrl
from kakehashi.chain.setup import ClientSetup, SetupFailed
from kakehashi.chain.tables import Hop
from kakehashi.core import fastpath, kernelpath, wire
from kakehashi.core.crypto import DATAGRAM_OVERHEAD, DatagramChannel
from kakehashi.core.datagram import DatagramForwarder, PortRecord, bind_udp
from kakehashi.core.stream import ConnClosed, FramedConn, open_tcp

if TYPE_CHECKING:
    from kakehashi.core.kernelpath import KernelPath

log = logging.getLogger("kakehashi.chain")

#: payload that fits a 1500-byte MTU without fragmentation (IPv4 + UDP headers)
MTU_PAYLOAD = 1472


@dataclass
class ForwardConfig:
    user: str
    keys: dict[str, bytes]
    first_hop: Hop
    to: tuple[str, int]
    udp_listen: tuple[str, int]
    mode: Literal["recursive", "iterative"] = "recursive"
    encrypt: bool = False
    setup_timeout: float = 10.0
    #: how the local port and P1 are driven (``--fast-path``, as for the proxy): ``auto``
    #: and ``kernel`` offload the local port's hop to nftables in plaintext mode
    fast_path: str = fastpath.DEFAULT_MODE


@dataclass
class Chain:
    """An established chain: the control connection, the data port and what setup learned."""

    ctrl: Ctrl
    data_sock: object
    setup: ClientSetup
    seconds: float

    def close(self) -> None:
        self.ctrl.close()

    async def wait_closed(self) -> str:
        """Until the chain's control connection ends (the session with it); returns why.

        The first proxy closes it when the session ends anywhere (idle timeout, a
        teardown, a proxy restarting), so whoever holds a chain watches it here."""
        try:
            while True:
                msg = await self.ctrl.read(None)
                if msg is None:
                    return f"chain closed by {self.setup.path[0]}"
                if isinstance(msg, m.Refused):
                    return f"chain ended: {msg.describe()}"
        except (ConnClosed, OSError, wire.WireError) as exc:
            return f"chain control connection failed: {exc}"


async def build_chain(cfg: ForwardConfig,
                      progress: list[tuple[m.Reply, float]] | None = None) -> Chain:
    """Connect to the first proxy and run the setup; SetupFailed names the hop.

    ``progress`` collects each Reply with the seconds since the start (``chain trace``)."""
    t0 = time.perf_counter()
    hop = cfg.first_hop
    try:
        conn = await open_tcp(hop.host, hop.port, timeout=cfg.setup_timeout)
    except (OSError, TimeoutError) as exc:
        raise SetupFailed(hop.name, "next-hop", f"cannot reach {hop}: {exc}") from None
    ctrl = Ctrl(FramedConn(conn, m.LIMITS))
    data_sock = None
    try:
        # 502/802: the client's data port P1, on the address its control connection uses
        local_ip = conn.sock.getsockname()[0]
        data_sock = bind_udp(local_ip, 0)
        setup = ClientSetup(cfg.user, cfg.keys, m.Endpoint(*cfg.to),
                            m.Endpoint(local_ip, data_sock.getsockname()[1]),
                            mode=cfg.mode, encrypt=cfg.encrypt, expect_first=hop.name)
        try:
            await _run_setup(ctrl, setup, cfg, progress, t0)
        except (ConnClosed, OSError) as exc:
            # a reset, or a frame cut short, is the first hop's connection failing: a
            # refusal like any other for the callers (trace, socks, forward), where a
            # bare ConnectionResetError escaped as a traceback (or a dead SOCKS route)
            raise SetupFailed(hop.name, "protocol", f"the control connection failed "
                                                     f"during setup: {exc or type(exc).__name__}"
                              ) from None
        if setup.first is not None and setup.first.host in ("0.0.0.0", "::"):
            setup.first = m.Endpoint(hop.host, setup.first.port)
        return Chain(ctrl, data_sock, setup, time.perf_counter() - t0)
    except BaseException:
        ctrl.close()
        if data_sock is not None:
            data_sock.close()
        raise


async def _run_setup(ctrl: Ctrl, setup: ClientSetup, cfg: ForwardConfig,
                     progress: list[tuple[m.Reply, float]] | None, t0: float) -> None:
    """Move the setup's messages until it is done, within ``cfg.setup_timeout``.

    Sends are within it too: a first hop that stops reading (hung, its buffers full)
    fails the setup naming it (timeout), where the send waited for good."""
    deadline = asyncio.get_running_loop().time() + cfg.setup_timeout

    async def send(data: m.Message | bytes) -> None:
        left = max(deadline - asyncio.get_running_loop().time(), 0.001)
        try:
            if isinstance(data, bytes):
                await ctrl.write(data, left)
            else:
                await ctrl.send(data, left)
        except TimeoutError:
            raise SetupFailed(cfg.first_hop.name, "timeout", f"did not read what the client "
                                                             f"sent within "
                                                             f"{cfg.setup_timeout:g}s") from None

    await send(wire.PREAMBLE)
    while not setup.done:
        left = deadline - asyncio.get_running_loop().time()
        try:
            msg = await ctrl.read(max(left, 0.001))
        except TimeoutError:
            raise SetupFailed(setup.hop, "timeout", f"no answer within "
                                                    f"{cfg.setup_timeout:g}s") from None
        except wire.WireError as exc:
            raise SetupFailed(setup.hop, "integrity" if exc.code == "integrity"
                              else "protocol", exc.message) from None
        if msg is None:
            raise SetupFailed(setup.hop, "protocol", "closed the control connection "
                                                     "during setup")
        seen = len(setup.replies)
        setup.wait_ms = min(int(max(deadline - asyncio.get_running_loop().time(), 0) * 1000),
                            3_600_000)
        outs = setup.receive(msg)
        if setup.seal_with is not None and ctrl.channel is None:
            ctrl.seal(setup.seal_with, cfg.first_hop.name)
        if progress is not None:
            progress += [(r, time.perf_counter() - t0) for r in setup.replies[seen:]]
        for out in outs:
            await send(out)


class ChainForward:
    """A local UDP port carried through an established chain (usable in-process too)."""

    def __init__(self, cfg: ForwardConfig) -> None:
        self.cfg = cfg
        self.chain: Chain | None = None
        self.forwarder: DatagramForwarder | None = None
        #: the kernel path for cfg.fast_path, or (None, why not): decided at start
        self._kernel: tuple[KernelPath | None, str | None] = (None, None)
        self.listen_sock = bind_udp(*cfg.udp_listen)  # early: applications may start now

    @property
    def address(self) -> tuple[str, int]:
        return self.listen_sock.getsockname()[:2]

    async def start(self) -> Chain:
        """Build the chain (SetupFailed names the refusing hop) and start forwarding."""
        try:
            # before the setup: --fast-path kernel without a kernel path is an error
            self._kernel = kernelpath.for_mode(self.cfg.fast_path)
            self.chain = chain = await build_chain(self.cfg)
        except BaseException:
            self.listen_sock.close()
            raise
        setup = chain.setup
        assert setup.first is not None
        record = PortRecord(lock="latest", far=setup.first.addr)
        near_to_far = far_to_near = None
        if setup.session_keys is not None:
            channel = DatagramChannel(*setup.session_keys)
            near_to_far, far_to_near = channel.seal, channel.open
        mode = self.cfg.fast_path
        kernel, why = self._kernel
        if kernel is not None and near_to_far is not None:
            kernel, why = None, "datagrams are sealed and opened here (--encrypt)"
        log.info("%s", fastpath.start_line("", mode, kernel.table if kernel else None, why))
        self.forwarder = DatagramForwarder(self.listen_sock, chain.data_sock,  # type: ignore[arg-type]
                                           record, near_to_far=near_to_far,
                                           far_to_near=far_to_near,
                                           fast_path=fastpath.callbacks(mode), kernel=kernel,
                                           position=0)
        await self.forwarder.start()
        return chain

    async def wait_closed(self) -> str:
        """Until the chain's control connection ends; returns why."""
        assert self.chain is not None
        return await self.chain.wait_closed()

    def close(self) -> None:
        if self.forwarder is not None:
            self.forwarder.close()
        else:
            self.listen_sock.close()
        if self.chain is not None:
            self.chain.close()
            if self.forwarder is None:
                self.chain.data_sock.close()  # type: ignore[attr-defined]


async def _next_datagram(sock: object) -> tuple[bytes, tuple[str, int]]:
    """Wait for the next datagram on a non-blocking UDP socket and take it."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            return sock.recvfrom(65535)  # type: ignore[attr-defined]
        except (BlockingIOError, InterruptedError):
            pass
        ready: asyncio.Future[None] = loop.create_future()
        fd = sock.fileno()  # type: ignore[attr-defined]
        loop.add_reader(fd, _wake, ready)
        try:
            await ready
        finally:
            loop.remove_reader(fd)


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _log_up(cfg: ForwardConfig, fwd: ChainForward, chain: Chain) -> None:
    setup = chain.setup
    host, port = fwd.address
    path = " -> ".join([cfg.user, *setup.path, f"{cfg.to[0]}:{cfg.to[1]}"])
    enc = "encrypted to " + setup.path[-1] if setup.session_keys else "plaintext"
    log.info("chain up (%s, %s) in %.0f ms: %s", cfg.mode, enc, chain.seconds * 1000, path)
    mtu = MTU_PAYLOAD - (DATAGRAM_OVERHEAD if setup.session_keys else 0)
    log.info("usable payload: %d bytes per datagram (%d without fragmentation on a "
             "1500-byte MTU); the server sees the chain at %s (P5), datagrams go to %s (P2)",
             setup.max_payload, mtu, setup.last, setup.first)
    log.info("forwarding %s:%d -> %s", host, port, path)


async def run_forward(cfg: ForwardConfig) -> int:
    """Build the chain (exit 1 naming the refusing hop if that fails), forward, and when
    the chain closes (the proxies' idle timeout, a restarted proxy) build it again when
    the next datagram arrives, so a forward for occasional queries keeps working."""
    fwd = ChainForward(cfg)
    try:
        chain = await fwd.start()
    except SetupFailed as exc:
        log.error("chain setup failed: %s", exc)
        return 1
    except ConnClosed as exc:
        log.error("chain setup failed at %s: %s", cfg.first_hop.name, exc)
        return 1
    _log_up(cfg, fwd, chain)
    cfg = dataclasses.replace(cfg, udp_listen=fwd.address)  # the same port when rebuilt
    backoff = 0.5
    try:
        while True:
            why = await fwd.wait_closed()
            fwd.close()
            assert fwd.forwarder is not None
            f, rec = fwd.forwarder, fwd.forwarder.record
            log.warning("%s after %d bytes (%d datagrams in user space, %d packets in the "
                        "kernel; %d dropped); rebuilt when the next datagram arrives", why,
                        f.relayed_bytes, rec.packets, sum(f.kernel_packets), rec.dropped)
            for _ in range(100):  # a transport closes its socket on a later loop turn
                if fwd.listen_sock.fileno() < 0:
                    break
                await asyncio.sleep(0.001)
            while True:
                fwd = ChainForward(cfg)
                data, addr = await _next_datagram(fwd.listen_sock)
                try:
                    chain = await fwd.start()
                except (SetupFailed, ConnClosed) as exc:
                    fwd.close()
                    log.error("chain setup failed: %s; next try in %.1fs", exc, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 30.0)
                    continue
                backoff = 0.5
                assert fwd.forwarder is not None
                fwd.forwarder.near_received(data, addr)
                _log_up(cfg, fwd, chain)
                break
    finally:
        fwd.close()
