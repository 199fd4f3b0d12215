"""TLS session resumption on relay links, end to end through the CLI (``--tls-resume``,
default on): under the session cipher every session uses up a link on each terminal,
and the replacement link takes the relay's session ticket back instead of a full
handshake (the relay counts both kinds: ``kakehashi_relay_tls_handshakes_total``; the
terminals log ``session reused`` per link at debug level). Off, every link is a full
handshake. A restarted relay (keys of its own) refuses the old tickets: full handshakes,
sessions go on. An impostor on the relay's address with another CA gets the offer too,
and the agent still refuses its certificate.
"""

from __future__ import annotations

import signal

import pytest

from tests.e2e.framework import roundtrip, wait_until
from tests.support.scrape import METRICS_LINE, sample, scrape

SESSIONS = 3
HANDSHAKES = "kakehashi_relay_tls_handshakes_total"


def _relay(env, *extra: str, home: str | None = None, port: int | None = None):
    """``relay serve`` with its metrics; its port and its metrics port."""
    if home is None:
        proc, port = env.relay("--metrics-listen", "127.0.0.1:0", *extra, port=port)
    else:  # another state directory: another development CA, another certificate
        proc = env.spawn("impostor", "relay", "serve", "--listen", f"127.0.0.1:{port}",
                         "--db", env.db, "--metrics-listen", "127.0.0.1:0", *extra,
                         env={"KAKEHASHI_HOME": home})
        proc.bound_port()
    match = METRICS_LINE.search(proc.wait_for(METRICS_LINE))
    assert match is not None
    return proc, port, int(match.group(1))


def _handshakes(metrics_port: int) -> tuple[float, float]:
    text = scrape(metrics_port)
    return sample(text, HANDSHAKES, kind="resumed"), sample(text, HANDSHAKES, kind="full")


@pytest.mark.parametrize("resume", ["on", "off"])
def test_replacement_links_resume(env, echo, resume):
    env.add_user("pi")
    env.add_user("laptop")
    # on: the default, nothing said; off: the flag, and the environment for the agent
    flag = ("--tls-resume", "off") if resume == "off" else ()
    _, port, metrics = _relay(env, *flag)
    terminal_env = {"KAKEHASHI_LOG": "debug"}
    if resume == "off":
        terminal_env["KAKEHASHI_TLS_RESUME"] = "off"
    agent = env.agent("pi", port, f"echo={echo.addr}", env=terminal_env)
    _, local = env.forward("laptop", port, "pi/echo", *flag)
    # both terminals' spares are up (2 each): the handshakes before any session
    wait_until(lambda: sum(_handshakes(metrics)) >= 4, what="the terminals' first links")
    resumed_before, full_before = _handshakes(metrics)
    for i in range(SESSIONS):
        assert roundtrip(local, b"ping %d" % i) == b"ping %d" % i
    # each session used up one link of each terminal: a replacement each
    wait_until(lambda: sum(_handshakes(metrics)) >= resumed_before + full_before
               + 2 * SESSIONS, what="the replacement links")
    resumed, full = _handshakes(metrics)
    if resume == "on":
        assert resumed >= 2 * SESSIONS
        assert "session reused: True" in agent.output()
    else:
        assert resumed == 0
        assert full >= full_before + 2 * SESSIONS
        assert "session reused: True" not in agent.output()
        assert "session reused: False" in agent.output()


def test_a_restarted_relay_and_an_impostor_get_no_resumption(env, echo, tmp_path):
    env.add_user("pi")
    env.add_user("laptop")
    relay, port, _ = _relay(env)
    agent = env.agent("pi", port, f"echo={echo.addr}", env={"KAKEHASHI_LOG": "debug"})
    _, local = env.forward("laptop", port, "pi/echo")
    assert roundtrip(local, b"before") == b"before"
    agent.wait_for("session reused: True")  # a replacement link resumed

    # the same relay restarted: same certificate, new ticket keys (a new process)
    relay.stop(signal.SIGTERM)
    agent.wait_for("cannot reach relay")
    relay, port, metrics = _relay(env, port=port)
    agent.wait_for("did not take the session offered")  # offered, refused: full handshake

    def works() -> bool:
        try:
            return roundtrip(local, b"after", timeout=5) == b"after"
        except OSError:
            return False

    wait_until(works, 30, interval=0.2, what="a session after the restart")
    wait_until(lambda: _handshakes(metrics)[0] >= 1, what="a resumed link on the new relay")

    # an impostor on the relay's address, with a certificate of another CA: the agent
    # offers the session it holds, and still refuses the certificate
    offers = agent.output().count("did not take the session offered")
    relay.stop(signal.SIGTERM)
    impostor, _, impostor_metrics = _relay(env, home=str(tmp_path / "impostor-home"),
                                           port=port)
    wait_until(lambda: "cannot verify the relay's certificate" in agent.output(), 30,
               what="the agent refusing the impostor's certificate")
    assert _handshakes(impostor_metrics) == (0, 0)  # no handshake completed there
    # the session was offered to the impostor's address before its certificate was seen
    # (the handshake failed, so it was dropped): at most one more refusal logged
    assert agent.output().count("did not take the session offered") <= offers + 1
    assert agent.alive and impostor.alive
