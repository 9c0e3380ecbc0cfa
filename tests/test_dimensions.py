"""The breakdown dimensions: what real User-Agents, URLs and referrers turn into, and that
the per-distinct, cached Arrow path says exactly what describing each row alone says."""

from __future__ import annotations

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowray.ingest import dimensions as dim
from flowray.ingest.schema import PATH_CHARS_MAX

CHROME_WIN = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/124.0.0.0 Safari/537.36"
)
IPHONE = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4_1 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.4.1 Mobile/15E148 Safari/604.1"
)
GOOGLEBOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"

# (User-Agent, browser, os, device, is_bot): real strings, as browsers and bots send them.
USER_AGENTS = [
    (CHROME_WIN, "Chrome", "Windows", "desktop", False),
    (
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:125.0) Gecko/20100101 Firefox/125.0",
        "Firefox",
        "Windows",
        "desktop",
        False,
    ),
    (
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/124.0.0.0 Safari/537.36 Edg/124.0.2478.51",
        "Edge",
        "Windows",
        "desktop",
        False,
    ),
    (
        "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 "
        "(KHTML, like Gecko) Version/17.4.1 Safari/605.1.15",
        "Safari",
        "Mac OS X",
        "desktop",
        False,
    ),
    (
        "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 "
        "(KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36",
        "Chrome",
        "Mac OS X",
        "desktop",
        False,
    ),
    (
        "Mozilla/5.0 (Macintosh; Intel Mac OS X 10.15; rv:125.0) Gecko/20100101 Firefox/125.0",
        "Firefox",
        "Mac OS X",
        "desktop",
        False,
    ),
    (
        "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 "
        "(KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36 Edg/124.0.2478.51",
        "Edge",
        "Mac OS X",
        "desktop",
        False,
    ),
    (
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/124.0.0.0 Safari/537.36",
        "Chrome",
        "Linux",
        "desktop",
        False,
    ),
    (
        "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0",
        "Firefox",
        "Ubuntu",
        "desktop",
        False,
    ),
    (
        "Mozilla/5.0 (X11; CrOS x86_64 14541.0.0) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/124.0.0.0 Safari/537.36",
        "Chrome",
        "Chrome OS",
        "desktop",
        False,
    ),
    (
        "Mozilla/5.0 (Linux; Android 10; K) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/124.0.0.0 Mobile Safari/537.36",
        "Chrome Mobile",
        "Android",
        "mobile",
        False,
    ),
    (
        "Mozilla/5.0 (Linux; Android 13; SM-S901B) AppleWebKit/537.36 (KHTML, like Gecko) "
        "SamsungBrowser/24.0 Chrome/117.0.0.0 Mobile Safari/537.36",
        "Samsung Internet",
        "Android",
        "mobile",
        False,
    ),
    (
        "Mozilla/5.0 (Android 14; Mobile; rv:125.0) Gecko/125.0 Firefox/125.0",
        "Firefox Mobile",
        "Android",
        "mobile",
        False,
    ),
    (
        "Mozilla/5.0 (Linux; Android 10; K) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/124.0.0.0 Mobile Safari/537.36 EdgA/124.0.2478.64",
        "Edge Mobile",
        "Android",
        "mobile",
        False,
    ),
    (  # an Android tablet: no "Mobile"
        "Mozilla/5.0 (Linux; Android 13; SM-X700) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/124.0.0.0 Safari/537.36",
        "Chrome",
        "Android",
        "tablet",
        False,
    ),
    (
        "Mozilla/5.0 (Linux; Android 13; SM-X700) AppleWebKit/537.36 (KHTML, like Gecko) "
        "SamsungBrowser/24.0 Chrome/117.0.0.0 Safari/537.36",
        "Samsung Internet",
        "Android",
        "tablet",
        False,
    ),
    (
        "Mozilla/5.0 (Android 14; Tablet; rv:125.0) Gecko/125.0 Firefox/125.0",
        "Firefox Mobile",
        "Android",
        "tablet",
        False,
    ),
    (IPHONE, "Mobile Safari", "iOS", "mobile", False),
    (
        "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 "
        "(KHTML, like Gecko) CriOS/124.0.6367.88 Mobile/15E148 Safari/604.1",
        "Chrome Mobile iOS",
        "iOS",
        "mobile",
        False,
    ),
    (
        "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 "
        "(KHTML, like Gecko) FxiOS/125.0 Mobile/15E148 Safari/605.1.15",
        "Firefox iOS",
        "iOS",
        "mobile",
        False,
    ),
    (
        "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 "
        "(KHTML, like Gecko) Version/17.0 EdgiOS/124.2478.50 Mobile/15E148 Safari/605.1.15",
        "Edge Mobile",
        "iOS",
        "mobile",
        False,
    ),
    (
        "Mozilla/5.0 (iPad; CPU OS 17_4_1 like Mac OS X) AppleWebKit/605.1.15 "
        "(KHTML, like Gecko) Version/17.4.1 Mobile/15E148 Safari/604.1",
        "Mobile Safari",
        "iOS",
        "tablet",
        False,
    ),
    (
        "Mozilla/5.0 (iPad; CPU OS 17_4 like Mac OS X) AppleWebKit/605.1.15 "
        "(KHTML, like Gecko) CriOS/124.0.6367.88 Mobile/15E148 Safari/604.1",
        "Chrome Mobile iOS",
        "iOS",
        "tablet",
        False,
    ),
    (
        "Mozilla/5.0 (SMART-TV; Linux; Tizen 6.0) AppleWebKit/538.1 (KHTML, like Gecko) "
        "Version/6.0 TV Safari/538.1",
        "Safari",
        "Tizen",
        "other",
        False,
    ),
    (
        "Mozilla/5.0 (Linux; Android 9; SHIELD Android TV) AppleWebKit/537.36 "
        "(KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36",
        "Chrome",
        "Android",
        "other",
        False,
    ),
    (GOOGLEBOT, "Googlebot", "Other", "bot", True),
    (
        "Mozilla/5.0 (Linux; Android 6.0.1; Nexus 5X Build/MMB29P) AppleWebKit/537.36 "
        "(KHTML, like Gecko) Chrome/124.0.6367.201 Mobile Safari/537.36 "
        "(compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
        "Googlebot",
        "Android",
        "bot",
        True,
    ),
    (
        "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)",
        "bingbot",
        "Other",
        "bot",
        True,
    ),
    (
        "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; bingbot/2.0; "
        "+http://www.bing.com/bingbot.htm) Chrome/116.0.1938.76 Safari/537.36",
        "bingbot",
        "Other",
        "bot",
        True,
    ),
    (
        "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_5) AppleWebKit/605.1.15 "
        "(KHTML, like Gecko) Version/13.1.1 Safari/605.1.15 "
        "(Applebot/0.1; +http://www.apple.com/go/applebot)",
        "Applebot",
        "Mac OS X",
        "bot",
        True,
    ),
    ("curl/8.5.0", "curl", "Other", "bot", True),
    ("python-requests/2.31.0", "Python Requests", "Other", "bot", True),
    (
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "HeadlessChrome/124.0.6367.60 Safari/537.36",
        "HeadlessChrome",
        "Linux",
        "bot",
        True,
    ),
    ("Mozilla/5.0", "Other", "Other", "other", False),
    ("something random", "Other", "Other", "other", False),
]

# For each name of the bot lists, a User-Agent that only that entry marks as a bot.
BOT_BROWSER_SAMPLES = {
    "curl": "curl/8.5.0",
    "Wget": "Wget/1.21.4",
    "Python Requests": "python-requests/2.31.0",
    "Python aiohttp": "Python/3.11 aiohttp/3.9.5",
    "Go-http-client": "Go-http-client/1.1",
    "axios": "axios/1.6.8",
    "okhttp": "okhttp/4.12.0",
    "Apache-HttpClient": "Apache-HttpClient/4.5.14 (Java/17.0.8)",
    "PostmanRuntime": "PostmanRuntime/7.37.0",
    "libwww-perl": "libwww-perl/6.72",
    "HeadlessChrome": (
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "HeadlessChrome/124.0.0.0 Safari/537.36"
    ),
    "PhantomJS": (
        "Mozilla/5.0 (Unknown; Linux x86_64) AppleWebKit/538.1 (KHTML, like Gecko) "
        "PhantomJS/2.1.1 Safari/538.1"
    ),
    "Mediapartners-Google": "Mediapartners-Google",
}
BOT_PRODUCT_SAMPLES = {
    "python-httpx": "python-httpx/0.27.0",
    "aiohttp": "aiohttp/3.9.5",
    "node-fetch": "node-fetch/1.0 (+https://github.com/bitinn/node-fetch)",
    "undici": "undici",
    "chrome-lighthouse": (
        "Mozilla/5.0 (Linux; Android 11; moto g power (2022)) AppleWebKit/537.36 "
        "(KHTML, like Gecko) Chrome/109.0.0.0 Mobile Safari/537.36 Chrome-Lighthouse"
    ),
    "feedfetcher-google": "FeedFetcher-Google; (+http://www.google.com/feedfetcher.html)",
    "google-read-aloud": (
        "Mozilla/5.0 (compatible; Google-Read-Aloud; "
        "+https://support.google.com/webmasters/answer/1061943)"
    ),
}


def _rows(table: pa.Table) -> list[tuple]:
    return list(zip(*(table.column(i).to_pylist() for i in range(table.num_columns)), strict=True))


# ------------------------------------------------------------------------ User-Agents


@pytest.mark.parametrize(("ua", "browser", "os", "device", "is_bot"), USER_AGENTS)
def test_real_user_agents(ua: str, browser: str, os: str, device: str, is_bot: bool) -> None:
    assert dim.describe_user_agent(ua) == (browser, os, device, is_bot)
    assert _rows(dim.parse_user_agents(pa.array([ua]))) == [(browser, os, device, is_bot)]


def test_every_device_type_is_one_of_the_set() -> None:
    table = dim.parse_user_agents([ua for ua, *_ in USER_AGENTS])
    assert set(table.column("device").to_pylist()) == set(dim.DEVICE_TYPES)
    bots = table.filter(table.column("is_bot"))
    assert set(bots.column("device").to_pylist()) == {"bot"}


@pytest.mark.parametrize("family", sorted(dim.BOT_BROWSERS))
def test_each_bot_browser_is_named_so_by_the_parser(family: str) -> None:
    """A rules update that renames one of these families would quietly count it."""
    ua = BOT_BROWSER_SAMPLES[family]
    assert dim.describe_user_agent(ua).browser == family
    assert dim.describe_user_agent(ua).is_bot


@pytest.mark.parametrize("product", sorted(dim.BOT_PRODUCTS))
def test_each_bot_product_is_needed_and_seen(product: str) -> None:
    ua = BOT_PRODUCT_SAMPLES[product]
    assert dim.describe_user_agent(ua).is_bot
    assert dim.describe_user_agent(ua).device == "bot"
    assert product in ua.lower()
    assert dim.describe_user_agent(ua).browser not in dim.BOT_BROWSERS


def test_a_product_is_matched_whole_not_as_a_substring() -> None:
    assert not dim.describe_user_agent(CHROME_WIN + " Notundici/1.0").is_bot


def test_missing_user_agents_are_unknown_not_bots() -> None:
    table = dim.parse_user_agents(pa.array([None, "", "   ", CHROME_WIN], pa.string()))
    assert _rows(table) == [dim.NO_USER_AGENT] * 3 + [("Chrome", "Windows", "desktop", False)]
    assert table.schema == dim.USER_AGENT_SCHEMA
    assert all(table.column(i).null_count == 0 for i in range(table.num_columns))


@pytest.mark.parametrize(
    "values",
    [
        pa.array([CHROME_WIN, None, IPHONE, CHROME_WIN], pa.string()),
        pa.array([CHROME_WIN, None, IPHONE, CHROME_WIN], pa.large_string()),
        pa.array([CHROME_WIN, None, IPHONE, CHROME_WIN]).dictionary_encode(),
        pa.chunked_array([[CHROME_WIN, None], [IPHONE, CHROME_WIN]]),
        [CHROME_WIN, None, IPHONE, CHROME_WIN],
    ],
    ids=["string", "large_string", "dictionary", "chunked", "list"],
)
def test_any_string_column_gives_the_same_table(values: object) -> None:
    table = dim.parse_user_agents(values)  # type: ignore[arg-type]
    assert table.schema == dim.USER_AGENT_SCHEMA
    assert [row[2] for row in _rows(table)] == ["desktop", "other", "mobile", "desktop"]


def test_empty_columns() -> None:
    assert dim.parse_user_agents(pa.array([], pa.string())).schema == dim.USER_AGENT_SCHEMA
    assert dim.parse_user_agents(pa.chunked_array([], pa.string())).num_rows == 0
    empty = dim.sources(pa.array([], pa.string()), pa.array([], pa.string()), "a.com")
    assert empty.schema == dim.SOURCE_SCHEMA and empty.num_rows == 0


def test_the_user_agent_cache_is_bounded_and_evicts_correctly() -> None:
    dim.clear_caches()
    limit = dim.USER_AGENTS_CACHED_MAX
    many = [f"{CHROME_WIN} Extra/{i}" for i in range(limit + 100)]
    table = dim.parse_user_agents(many + [IPHONE])
    info = dim.cache_info()["user_agents"]
    assert info.maxsize == limit and info.currsize == limit
    assert set(table.column("browser").to_pylist()[:-1]) == {"Chrome"}
    # The earliest were evicted; asked again they are parsed again, to the same answer.
    assert _rows(dim.parse_user_agents(many[:3])) == [("Chrome", "Windows", "desktop", False)] * 3
    assert dim.cache_info()["user_agents"].currsize == limit


def test_the_url_caches_are_bounded() -> None:
    dim.clear_caches()
    limit = dim.URLS_CACHED_MAX
    urls = [f"/p/{i}?utm_source=s{i}" for i in range(limit + 10)]
    referrers = [f"https://r{i}.example/" for i in range(limit + 10)]
    table = dim.sources(referrers, urls, "a.com")
    assert table.column("source").to_pylist()[-1] == f"s{limit + 9}"
    for name in ("urls", "referrers"):
        assert dim.cache_info()[name].currsize == dim.cache_info()[name].maxsize == limit


# ------------------------------------------------------------------ sources and paths


def _one(referrer: str | None, url: str | None, site: str = "shop.example.com") -> dim.Source:
    row = _rows(dim.sources(pa.array([referrer], pa.string()), pa.array([url], pa.string()), site))
    assert row == [dim.describe_source(referrer, url, site)]
    return dim.Source(*row[0])


@pytest.mark.parametrize(
    ("url", "source", "medium", "campaign"),
    [
        ("/?utm_source=news&utm_medium=email&utm_campaign=spring", "news", "email", "spring"),
        ("/?UTM_SOURCE=news&Utm_Medium=email&uTm_CaMpAiGn=spring", "news", "email", "spring"),
        ("/?utm_source=first&utm_source=second", "first", "", ""),
        ("/?utm_source=&utm_source=second", "second", "", ""),
        ("/?utm_source&utm_medium=email", "", "email", ""),
        ("/?utm_source=%20%20&utm_campaign=a", "", "", "a"),
        ("/?utm_source=caf%C3%A9&utm_campaign=spring+sale", "café", "", "spring sale"),
        ("/?utm_campaign=50%25%20off%26more", "", "", "50% off&more"),
        ("/?utm_source=bad%ZZ", "bad%ZZ", "", ""),
        ("/?utm_source=%FF", "\ufffd", "", ""),
        ("/?utm_source=News", "News", "", ""),
        ("/?utm_source=a;utm_medium=b", "a;utm_medium=b", "", ""),
        ("/#utm_source=fragment", "", "", ""),
        ("/?x=1#?utm_source=fragment", "", "", ""),
        ("https://shop.example.com/a?utm_source=x#top", "x", "", ""),
        ("/?utmsource=x&utm_sources=y", "", "", ""),
        ("/plain", "", "", ""),
    ],
)
def test_utm_values(url: str, source: str, medium: str, campaign: str) -> None:
    got = _one("https://www.google.com/", url)
    assert (got.utm_medium, got.utm_campaign) == (medium, campaign)
    assert got.source == (source or "google.com")


@pytest.mark.parametrize(
    ("referrer", "source"),
    [
        ("https://www.google.com/search?q=shoes", "google.com"),
        ("https://WWW.Google.COM/", "google.com"),
        ("http://news.ycombinator.com:8080/item?id=1", "news.ycombinator.com"),
        ("https://user:pw@www.example.org:443/x", "example.org"),
        ("https://www2.example.org/", "www2.example.org"),
        ("https://www/", "www"),
        ("https://google.com./", "google.com"),
        ("https://bücher.de/katalog", "xn--bcher-kva.de"),
        ("https://www.xn--bcher-kva.de/", "xn--bcher-kva.de"),
        ("https://ＥＸＡＭＰＬＥ.org/", "example.org"),
        ("http://192.168.0.1:8000/", "192.168.0.1"),
        ("android-app://com.google.android.gm/", "com.google.android.gm"),
        ("", ""),
        (None, ""),
        ("-", ""),
        ("google.com", ""),
        ("not a url", ""),
        ("http://[::1", ""),
        ("http:///path-only", ""),
        ("ftp://files.example.org/", ""),
        ("javascript:alert(1)", ""),
        ("http://exa mple.com/", ""),
        ("http://under_score.example/", ""),
        ("http://a..b/", ""),
    ],
)
def test_referrer_hosts(referrer: str | None, source: str) -> None:
    assert _one(referrer, "/").source == source


@pytest.mark.parametrize(
    ("referrer", "site", "internal"),
    [
        ("https://shop.example.com/cart", "shop.example.com", True),
        ("https://www.shop.example.com/", "shop.example.com", True),
        ("https://shop.example.com/", "www.shop.example.com", True),
        ("https://shop.example.com:8443/", "shop.example.com", True),
        ("https://blog.shop.example.com/", "shop.example.com", True),
        ("https://SHOP.example.com/", "shop.example.com", True),
        ("https://bücher.de/", "BÜCHER.de", True),
        ("https://example.com/", "shop.example.com", False),
        ("https://othershop.example.com/", "shop.example.com", False),
        ("https://shop.example.com.evil.org/", "shop.example.com", False),
        ("https://shop.example.com/", "not a site!", False),
    ],
)
def test_internal_referrers_are_not_sources(referrer: str, site: str, internal: bool) -> None:
    host = dim.describe_source(referrer, None, "unrelated.org").source
    assert _one(referrer, "/x", site).source == ("" if internal else host)
    per_row = dim.sources([referrer], ["/x"], pa.array([site]))
    assert per_row.column("source").to_pylist() == ["" if internal else host]


def test_utm_source_wins_over_any_referrer() -> None:
    assert _one("https://shop.example.com/", "/?utm_source=mail").source == "mail"
    assert _one("https://www.google.com/", "/?utm_source=mail").source == "mail"


def test_a_site_per_row() -> None:
    referrers = ["https://a.com/", "https://a.com/", "https://b.com/", None]
    table = dim.sources(referrers, ["/"] * 4, pa.array(["a.com", "b.com", "a.com", "a.com"]))
    assert table.column("source").to_pylist() == ["", "a.com", "b.com", ""]


def test_lengths_must_agree() -> None:
    with pytest.raises(ValueError, match="same length"):
        dim.sources(["https://a.com/"], ["/", "/"], "a.com")
    with pytest.raises(ValueError, match="same length"):
        dim.sources(["https://a.com/"], ["/"], pa.array(["a.com", "b.com"]))


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("/pricing", "/pricing"),
        ("/pricing?plan=pro", "/pricing"),
        ("/pricing#faq", "/pricing"),
        ("/a/b/?x=1#y", "/a/b/"),
        ("/caf%C3%A9", "/caf%C3%A9"),
        ("https://shop.example.com/a/b?x=1#y", "/a/b"),
        ("https://shop.example.com", "/"),
        ("https://shop.example.com?utm_source=x", "/"),
        ("HTTPS://Shop.Example.com:8080/A", "/A"),
        ("//cdn.example.com/x", "//cdn.example.com/x"),
        ("http://[::1/x", "http://[::1/x"),
        ("pricing", "pricing"),
        ("  /spaced  ", "/spaced"),
        ("", ""),
        (None, ""),
        ("?utm_source=x", ""),
        ("/" + "a" * (PATH_CHARS_MAX + 50), "/" + "a" * (PATH_CHARS_MAX - 1)),
    ],
)
def test_paths(url: str | None, path: str) -> None:
    assert _one(None, url).path == path


def test_source_columns_are_strings_and_never_null() -> None:
    table = dim.sources(
        pa.array([None, "https://www.google.com/"], pa.large_string()),
        pa.chunked_array([[None], ["/a?utm_medium=cpc"]], pa.string()),
        "a.com",
    )
    assert table.schema == dim.SOURCE_SCHEMA
    assert all(table.column(i).null_count == 0 for i in range(table.num_columns))
    assert _rows(table) == [("", "", "", ""), ("google.com", "cpc", "", "/a")]


# ---------------------------------------- per distinct value and cached == row by row

UA_POOL = [ua for ua, *_ in USER_AGENTS] + [*BOT_BROWSER_SAMPLES.values(), None, "", " "]
URL_POOL = [
    None,
    "",
    "/",
    "/a?utm_source=x",
    "/a?UTM_Source=y&utm_medium=m",
    "/b#utm_source=z",
    "https://shop.example.com/c?utm_campaign=%E2%9C%93",
    "https://shop.example.com",
    "http://[::1/x",
    "/" + "p" * (PATH_CHARS_MAX + 1),
]
REFERRER_POOL = [
    None,
    "",
    "-",
    "https://www.google.com/search?q=1",
    "https://shop.example.com/x",
    "https://www.shop.example.com/",
    "https://blog.shop.example.com/",
    "https://bücher.de/",
    "http://[::1",
    "android-app://com.google.android.gm/",
    "https://other.org:8080/",
    "https://www.www.shop.example.com/",
    "https://example.com/",
]
SITE_POOL = [
    "shop.example.com",
    "www.shop.example.com",
    "blog.shop.example.com",
    "example.com",
    "com",
    "Shop.Example.com.",
    "www.",
    "-x.org",
    "other.org",
    "xn--bcher-kva.de",
    "BÜCHER.DE",
    "bad site",
]


def _sample(pool: list, extra: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(st.sampled_from(pool), extra)


@settings(max_examples=150, deadline=None)
@given(
    uas=st.lists(_sample(UA_POOL, st.text(max_size=40)), max_size=60),
    clear=st.booleans(),
)
def test_user_agents_per_distinct_equal_row_by_row(uas: list[str | None], clear: bool) -> None:
    if clear:
        dim.clear_caches()
    uncached = dim._describe_user_agent.__wrapped__  # the parser itself, nothing remembered
    expected = [dim.NO_USER_AGENT if ua is None or not ua.strip() else uncached(ua) for ua in uas]
    assert _rows(dim.parse_user_agents(pa.array(uas, pa.string()))) == expected
    assert [dim.describe_user_agent(ua) for ua in uas] == expected


@settings(max_examples=150, deadline=None)
@given(
    rows=st.lists(
        st.tuples(
            _sample(REFERRER_POOL, st.text(max_size=20)),
            _sample(URL_POOL, st.text(max_size=20)),
            st.sampled_from(SITE_POOL),
        ),
        max_size=60,
    ),
    one_site=st.sampled_from(SITE_POOL),
    clear=st.booleans(),
)
def test_sources_per_distinct_equal_row_by_row(
    rows: list[tuple[str | None, str | None, str]], one_site: str, clear: bool
) -> None:
    if clear:
        dim.clear_caches()
    referrers = pa.array([r for r, _, _ in rows], pa.string())
    urls = pa.array([u for _, u, _ in rows], pa.string())
    sites = [s for _, _, s in rows]
    per_row = [dim.describe_source(r, u, s) for r, u, s in rows]
    assert _rows(dim.sources(referrers, urls, pa.array(sites, pa.string()))) == per_row
    one = [dim.describe_source(r, u, one_site) for r, u, _ in rows]
    assert _rows(dim.sources(referrers, urls, one_site)) == one
