"""Property tests of the Redis URL parser (``core.store.redis.parse_url``): any text is
parsed or refused with ValueError, and a well-formed sentinel URL keeps its parts."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kakehashi.core.store.redis import MAX_SENTINELS, parse_url, redacted

FAST = settings(max_examples=300, deadline=None)

pieces = st.sampled_from(["redis+sentinel://", "rediss+sentinel://", "redis://",
                          "redis+cluster://", "unix://", "h", ":", "26379", ",", "/",
                          "@", "[", "]", "::1", "?", "&", "=", "db", "prefix",
                          "sentinel_password", "ssl_cert_reqs", "#", "%", "%zz", " "])


@FAST
@given(st.lists(pieces, max_size=14).map("".join) | st.text(max_size=60))
def test_any_text_is_parsed_or_refused_with_value_error(url):
    try:
        t = parse_url(url)
    except ValueError:
        return
    assert len(t.sentinels) <= MAX_SENTINELS
    for host, port in t.sentinels:
        assert host and 0 < port < 65536
    if t.sentinels:
        assert t.service


hosts = st.from_regex(r"[a-z][a-z0-9.-]{0,12}", fullmatch=True)
ports = st.integers(1, 65535)


@FAST
@given(st.lists(st.tuples(hosts, ports), min_size=1, max_size=5),
       st.from_regex(r"[A-Za-z0-9_-]{1,16}", fullmatch=True),
       st.none() | st.integers(0, 15),
       st.none() | st.from_regex(r"[A-Za-z0-9]{1,12}", fullmatch=True))
def test_sentinel_url_round_trip(sentinels, service, db, password):
    auth = f":{password}@" if password else ""
    url = (f"redis+sentinel://{auth}" + ",".join(f"{h}:{p}" for h, p in sentinels)
           + f"/{service}" + (f"/{db}" if db is not None else ""))
    t = parse_url(url)
    assert t.sentinels == tuple(sentinels) and t.service == service
    assert t.master_kwargs.get("db", 0) == (db or 0)
    assert t.master_kwargs.get("password") == password
    if password:
        assert password not in redacted(url).replace(service, "").split("@", 1)[0] \
            .split("://", 1)[1].replace("***", "")
