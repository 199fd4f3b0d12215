"""The switch's web catalog in a real browser: headless Chromium from Debian, driven by
Playwright. Log in (session + CSRF), see only the allowed services, open a tunnel,
watch its state become established with its local address (live, no reload), use it,
close it. Screenshots are kept under the test's tmp directory."""

from __future__ import annotations

import os
import re
import shutil
import socket

import pytest

from tests.e2e.framework import EchoServer, Env, stream_through
from tests.e2e.switch_fixtures import Switch, password

CHROMIUM = os.environ.get("KH_CHROMIUM", "/usr/bin/chromium")

playwright_api = pytest.importorskip("playwright.sync_api",
                                     reason="playwright is not installed (pip install -e .[test])")
if not shutil.which(CHROMIUM):
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def echo_mod():
    srv = EchoServer()
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def sw(tmp_path_factory, echo_mod):
    env = Env(tmp_path_factory.mktemp("switch-browser"))
    echo = echo_mod
    try:
        s = Switch(env).start()
        s.gateway("asp1", "gw-srv")
        s.gateway("alice", "gw-alice")
        s.register("echo", echo.addr, allow=("alice",))
        s.register("private", echo.addr, allow=())
        yield s
    finally:
        env.close()


def login(page, sw: Switch, user: str, pw: str | None = None) -> None:
    page.goto(f"{sw.url}/")
    assert page.url.endswith("/login")
    page.fill("#user", user)
    page.fill("#password", pw or password(user))
    page.click("#login")


def test_catalog_open_use_close(browser, sw: Switch, tmp_path) -> None:
    shots = tmp_path / "screenshots"
    shots.mkdir()
    page = browser.new_page()
    page.set_default_timeout(20_000)

    login(page, sw, "alice", "wrong-password")
    page.wait_for_selector("#error")
    assert "wrong user or password" in page.inner_text("#error")
    page.screenshot(path=str(shots / "1-wrong-password.png"))

    login(page, sw, "alice")
    page.wait_for_selector("#services")
    names = page.locator("#services tbody tr[data-service]").evaluate_all(
        "rows => rows.map(r => r.dataset.service)")
    assert names == ["echo"]  # not "private": only the services valid for alice
    page.screenshot(path=str(shots / "2-catalog.png"))

    row = page.locator('#services tr[data-service="echo"]')
    row.locator('select[name="gateway"]').select_option("gw-alice")
    row.locator("button.open").click()
    # live: the state cell turns established and the local address appears, no reload
    page.wait_for_selector("#tunnels td.state-established")
    listen = page.inner_text("#tunnels tr[data-tunnel] td.listen")
    assert re.fullmatch(r"127\.0\.0\.1:\d+", listen), listen
    page.screenshot(path=str(shots / "3-established.png"))

    port = int(listen.rpartition(":")[2])
    sent, got, n = stream_through(port, 1 << 20)
    assert sent == got and n == 1 << 20

    page.locator("#tunnels button.close").first.click()
    page.wait_for_selector("#tunnels td.state-deleted")
    page.screenshot(path=str(shots / "4-deleted.png"))
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), 2).close()
    # a tunnel opened elsewhere (the CLI, the API) shows up live: no reload happens
    page.evaluate("window.__same_page = true")
    other = sw.open("echo")
    page.wait_for_selector(f'#tunnels tr[data-tunnel="{other["tunnel"]}"] '
                           "td.state-established")
    assert page.evaluate("window.__same_page === true")
    assert page.inner_text(f'#tunnels tr[data-tunnel="{other["tunnel"]}"] td.listen') == \
        other["listen"]
    page.screenshot(path=str(shots / "5-live.png"))
    assert sorted(p.name for p in shots.iterdir()) == [
        "1-wrong-password.png", "2-catalog.png", "3-established.png", "4-deleted.png",
        "5-live.png"]


def test_asp_sees_live_connection_counts(browser, sw: Switch) -> None:
    t = sw.open("echo")
    page = browser.new_page()
    page.set_default_timeout(20_000)
    login(page, sw, "asp1")
    cell = page.locator('#services tr[data-service="echo"] td.connections')
    assert cell.inner_text().startswith("0")
    with socket.create_connection(("127.0.0.1", int(t["listen"].rpartition(":")[2])), 10) as c:
        c.sendall(b"x")
        assert c.recv(1) == b"x"
        page.wait_for_function(
            """() => document.querySelector('#services tr[data-service="echo"] td.connections')
                     .textContent.startsWith("1")""")
    assert "via gw-srv" in page.inner_text('#services tr[data-service="echo"]')


def test_forms_without_the_csrf_token_are_refused(sw: Switch) -> None:
    """A POST from another site carries the cookie but not the token: refused."""
    import http.cookiejar
    import urllib.error
    import urllib.parse
    import urllib.request

    def tunnel_ids() -> set[str]:
        return {t["tunnel"] for t in sw.api("alice").request("GET", "/v1/tunnels",
                                                              params={"all": 1})}

    before = tunnel_ids()
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    page = opener.open(f"{sw.url}/login").read().decode()
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    body = urllib.parse.urlencode({"csrf": csrf, "user": "alice",
                                   "password": password("alice")}).encode()
    assert "Your tunnels" in opener.open(f"{sw.url}/login", body).read().decode()
    forged = urllib.parse.urlencode({"service": "echo", "gateway": "gw-alice",
                                     "csrf": "not-the-token"}).encode()
    with pytest.raises(urllib.error.HTTPError) as exc:
        opener.open(f"{sw.url}/ui/tunnels", forged)
    assert exc.value.code == 403
    assert tunnel_ids() == before  # (their live counts may move meanwhile)
    # a login form posted without its pre-session token does not log in
    fresh = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(
        http.cookiejar.CookieJar()))
    answer = fresh.open(f"{sw.url}/login", body)
    assert answer.url.endswith("/login?error=session+expired%2C+try+again")
