"""The gateway on the shared identity module and CLI vocabulary (items 13, 16, 17):
throttled proxy logins with full deny audits, clients that speak --server/--user/--tls,
TLS by default, no passwords over plaintext unless asked, old spellings with a note."""

from __future__ import annotations

import base64
import threading

from tests.e2e.gateway_fixtures import curl, origin, plain, raw_exchange, status_of


def _connect_with(port: int, target: str, user: str, password: str) -> bytes:
    cred = base64.b64encode(f"{user}:{password}".encode()).decode()
    return raw_exchange(port, f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
                              f"Proxy-Authorization: Basic {cred}\r\n\r\n".encode())


def test_parallel_proxy_login_guesses_are_throttled_and_audited(env, echo):
    env.add_proxy_user("alice", "alice-pw")
    env.add_proxy_user("bob", "bob-pw")
    _, port = env.gateway("127.0.0.1", extra=["--auth"])
    replies: list[bytes] = [b""] * 60
    go = threading.Barrier(len(replies))

    def guess(i: int) -> None:
        go.wait()
        replies[i] = _connect_with(port, echo.addr, "alice", f"guess-{i}")

    threads = [threading.Thread(target=guess, args=(i,)) for i in range(len(replies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = [status_of(r) for r in replies]
    assert set(statuses) == {407, 429} and statuses.count(407) <= 20, statuses
    denies = [a for a in env.audit() if a["event"] == "proxy-auth"]
    assert len(denies) == 60
    assert all(a["decision"] == "deny" and a["addr"] == "127.0.0.1" and a["user"] == "alice"
               for a in denies)
    assert sum(a["why"] != "lockout" for a in denies) <= 20
    # alice's guesser is locked out, even with her password; bob, from the same address, is not
    assert status_of(_connect_with(port, echo.addr, "alice", "alice-pw")) == 429
    assert status_of(_connect_with(port, echo.addr, "bob", "bob-pw")) == 200


def test_auth_on_a_plaintext_listener_needs_insecure_auth(env):
    res = env.run("gateway", "serve", "--listen", "127.0.0.1:0", "--db", env.db,
                  "--tls", "off", "--auth", check=False)
    assert res.returncode != 0 and b"--insecure-auth" in res.stderr
    proc, _ = env.gateway("127.0.0.1", extra=["--tls", "off", "--auth", "--insecure-auth"])
    assert proc.alive


def test_clients_speak_tls_by_default_with_the_development_ca(env):
    _, port = env.gateway("127.0.0.1", extra=["--tls", "on"])  # TLS only
    server = ["--server", f"127.0.0.1:{port}"]
    out = env.run("gateway", "events", "publish", "news", *server, "--data", "over tls")
    assert b"published news #1" in out.stdout
    got = env.run("gateway", "events", "watch", "news", *server, "--count", "1").stdout
    assert b"over tls" in got or base64.b64encode(b"over tls") in got
    # plaintext must be asked for, and then a TLS-only gateway refuses it
    res = env.run("gateway", "events", "publish", "news", *plain(port), "--data", "x",
                  check=False, timeout=60)
    assert res.returncode != 0


def test_client_vocabulary_user_and_password_sources(env, echo, tmp_path):
    env.add_proxy_user("bob", "bob-pw")
    _, port = env.gateway("127.0.0.1", extra=["--auth"])
    pwfile = tmp_path / "pw"
    pwfile.write_text("bob-pw\n")
    for how, extra, kw in [
        ("file", ["--password-file", str(pwfile)], {}),
        ("stdin", ["--password-stdin"], {"input": b"bob-pw\n"}),
        ("env", [], {"env": {"KAKEHASHI_PASSWORD": "bob-pw"}}),
    ]:
        res = env.run("gateway", "events", "publish", "t", *plain(port), "--user", "bob",
                      "--data", how, *extra, **kw)
        assert b"published t" in res.stdout, how
        assert b"deprecated" not in res.stderr


def test_user_passwd_changes_the_proxy_password(env, echo):
    env.add_proxy_user("bob", "bob-pw")
    _, port = env.gateway("127.0.0.1", extra=["--auth"])
    assert status_of(_connect_with(port, echo.addr, "bob", "bob-pw")) == 200
    env.run("gateway", "user", "passwd", "bob", "--db", env.db, "--password-stdin",
            input=b"new-pw\n")
    assert status_of(_connect_with(port, echo.addr, "bob", "bob-pw")) == 407
    assert status_of(_connect_with(port, echo.addr, "bob", "new-pw")) == 200
    missing = env.run("gateway", "user", "passwd", "nobody", "--db", env.db,
                      "--password-stdin", input=b"x\n", check=False)
    assert missing.returncode != 0 and b"no proxy user nobody" in missing.stderr


def test_old_spellings_still_work_and_say_so(env, echo):
    env.add_proxy_user("bob", "bob-pw")
    with origin() as o:
        proc, port = env.gateway("127.0.0.1", extra=["--auth"])
        old = env.run("gateway", "serve", "--allow", "127.0.0.1", "--help")
        assert old.returncode == 0
        res = env.run("gateway", "events", "publish", "t", "--via", f"127.0.0.1:{port}",
                      "--proxy-user", "bob", "--data", "old words",
                      env={"KAKEHASHI_PROXY_PASSWORD": "bob-pw"})
        assert b"published t" in res.stdout
        err = res.stderr.decode()
        for note in ("--via is deprecated; use --server",
                     "--proxy-user is deprecated; use --user",
                     "KAKEHASHI_PROXY_PASSWORD is deprecated; use KAKEHASHI_PASSWORD"):
            assert note in err, err
        tls = env.run("gateway", "events", "publish", "t", "--via", f"127.0.0.1:{port}",
                      "--via-tls", "on", "--proxy-user", "bob", "--data", "tls",
                      env={"KAKEHASHI_PASSWORD": "bob-pw"})
        assert b"--via-tls is deprecated; use --tls" in tls.stderr
        # gateway serve --allow (now --allow-target)
        gw2, port2 = env.gateway(name="old-allow", extra=["--allow", "127.0.0.1"])
        gw2.wait_for("--allow is deprecated; use --allow-target")
        r = curl("-x", f"http://127.0.0.1:{port2}", f"{o.url}/hello")
        assert r.status == 200
    assert proc.alive


def test_config_file_keys_for_the_client_vocabulary(env, tmp_path):
    _, port = env.gateway("127.0.0.1")
    conf = tmp_path / "kh.toml"
    conf.write_text(f'[gateway.events.publish]\nserver = "127.0.0.1:{port}"\ntls = "off"\n')
    res = env.run("--config", str(conf), "gateway", "events", "publish", "t", "--data", "x")
    assert b"published t #1" in res.stdout
