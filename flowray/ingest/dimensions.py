"""Breakdown dimensions derived from an event's raw fields: browser, OS, device type and
bots from the User-Agent; source, UTM medium and campaign, and page path from the
referrer and the URL.

Processing derives them for every event of an Arrow table, and live counts for every
committed batch, so each derivation runs once per *distinct* value: a column is
dictionary-encoded, its distinct values described, and the answers taken back out to
the rows. A batch of 100,000 events holds a few hundred distinct User-Agents and a few
thousand distinct URLs and referrers. Each per-value description is also remembered
across calls in a bounded LRU cache, since a worker sees the same values batch after
batch.

User-Agents are parsed by ua-parser (the uap-core rules, shipped monthly as
ua-parser-builtins) with its Rust resolver (ua-parser-rs), chosen explicitly rather
than whichever is installed: it is far faster than the pure-Python resolver, and
resolvers differ at the edges (the Rust one reads bounded repeats such as ".{0,100}"
loosely, so it also finds bots named late in a long User-Agent), so every worker must
use the same one to describe a string alike. No regular expression here names a
browser, an OS or a device; this module only maps what the parser names onto a few
device types and a bot flag.

Pure: no Ray, no I/O. Output columns are never null: an absent value is "".
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple, TypeAlias
from urllib.parse import parse_qsl, urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from ua_parser import Domain, load_lazy_builtins
from ua_parser.regex import Resolver as RegexResolver

from flowray.core.router import SITE_BYTES_MAX, SiteError, normalize_site
from flowray.ingest.schema import PATH_CHARS_MAX

# What the functions take as a column: any Arrow string-like array, or a list.
Strings: TypeAlias = pa.Array | pa.ChunkedArray | Sequence[str | None]

# ------------------------------------------------------------------------ User-Agents

# Device types. A small, stable set that every UA parser can tell apart reliably; finer
# kinds (TVs, consoles, watches, e-readers) are rare in web analytics and go to "other".
# "bot" repeats is_bot so that a device breakdown never counts crawlers as desktops.
DEVICE_TYPES = ("desktop", "mobile", "tablet", "bot", "other")

USER_AGENT_SCHEMA = pa.schema(
    [
        pa.field("browser", pa.string(), nullable=False),
        pa.field("os", pa.string(), nullable=False),
        pa.field("device", pa.string(), nullable=False),
        pa.field("is_bot", pa.bool_(), nullable=False),
    ]
)

# Distinct User-Agents remembered per process. A batch holds a few hundred, and they
# change slowly (browser releases), so this holds the working set of many batches;
# bounded because scanners send made-up User-Agents, and small enough that even at the
# longest User-Agent ingest accepts (PATH_CHARS_MAX) the keys stay near 10 MiB.
USER_AGENTS_CACHED_MAX = 4096

# Browsers (ua-parser's family names) that are programs, not people, which the rules
# do not mark as a "Spider" device: HTTP libraries, command-line tools and headless
# browsers. Checked against the rules in ua-parser-builtins; tests/test_dimensions.py
# pins each one, so a rules update that renames one is noticed.
BOT_BROWSERS = frozenset(
    {
        "curl",
        "Wget",
        "Python Requests",
        "Python aiohttp",
        "Go-http-client",
        "axios",
        "okhttp",
        "Apache-HttpClient",
        "PostmanRuntime",
        "libwww-perl",
        "HeadlessChrome",
        "PhantomJS",
        "Mediapartners-Google",  # AdSense's crawler, which the rules call a feature phone
    }
)
# Product names (the text before "/" in a product token, lower-cased) of common clients
# the rules do not name at all. Tokens are compared whole; no pattern is searched.
BOT_PRODUCTS = frozenset(
    {
        "python-httpx",
        "aiohttp",
        "node-fetch",
        "undici",
        "chrome-lighthouse",  # PageSpeed Insights and Lighthouse audits
        "feedfetcher-google",
        "google-read-aloud",
    }
)

# ua-parser names devices and operating systems, not form factors; these sets map its
# names (uap-core's families and brands) onto the device types.
_TABLET_FAMILIES = frozenset(
    {"iPad", "Generic Tablet", "Kindle", "BlackBerry Playbook", "HP TouchPad"}
)
_TABLET_BRANDS = frozenset({"Generic_Android_Tablet"})
_TABLET_OSES = frozenset({"BlackBerry Tablet OS"})
_MOBILE_FAMILIES = frozenset({"iPhone", "iPod", "Generic Smartphone", "Generic Feature Phone"})
_MOBILE_OSES = frozenset(
    {
        "iOS",
        "Android",
        "Windows Phone",
        "Windows Mobile",
        "BlackBerry OS",
        "KaiOS",
        "Firefox OS",
        "HarmonyOS",
        "Sailfish",
        "Bada",
        "Symbian OS",
        "Symbian^3",
        "Symbian^3 Anna",
        "Symbian^3 Belle",
        "Nokia Series 40",
        "Nokia Series 30 Plus",
    }
)
_DESKTOP_OSES = frozenset(
    {
        "Windows",
        "Mac OS X",
        "Mac OS",
        "Chrome OS",
        "Linux",
        "Ubuntu",
        "Kubuntu",
        "Lubuntu",
        "Debian",
        "Fedora",
        "Red Hat",
        "CentOS",
        "Arch Linux",
        "Gentoo",
        "openSUSE",
        "SUSE",
        "Slackware",
        "Mageia",
        "PCLinuxOS",
        "Linux Mint",
        "Mandriva",
        "FreeBSD",
        "OpenBSD",
        "NetBSD",
        "Solaris",
    }
)
_TV_OSES = frozenset({"tvOS", "ATV OS X", "FireHbbTV"})
_TV_BRANDS = frozenset({"Generic_Inettv"})


class UserAgent(NamedTuple):
    """What a User-Agent says: ua-parser's browser and OS families ("Other" when the
    rules know none), one of DEVICE_TYPES, and whether a program sent it."""

    browser: str
    os: str
    device: str
    is_bot: bool


# No User-Agent (seed lines and many server logs have none): unknown, and not a bot,
# since its absence says nothing about who sent the event.
NO_USER_AGENT = UserAgent("", "", "other", False)


@functools.cache
def _resolver() -> RegexResolver:
    """Built on first use: compiling the rules takes a while, and most processes that
    import flowray never parse a User-Agent."""
    return RegexResolver(load_lazy_builtins())


def describe_user_agent(ua: str | None) -> UserAgent:
    """One User-Agent, as :func:`parse_user_agents` describes each row."""
    if ua is None or not ua.strip():
        return NO_USER_AGENT
    return _describe_user_agent(ua)


@functools.lru_cache(maxsize=USER_AGENTS_CACHED_MAX)
def _describe_user_agent(ua: str) -> UserAgent:
    parsed = _resolver()(ua, Domain.ALL).complete().with_defaults()
    browser, os = parsed.user_agent.family, parsed.os.family
    device = parsed.device
    is_bot = device.family == "Spider" or browser in BOT_BROWSERS or _names_bot_product(ua)
    kind = "bot" if is_bot else _device_type(ua, os, device.family, device.brand, device.model)
    return UserAgent(browser, os, kind, is_bot)


def _names_bot_product(ua: str) -> bool:
    for separator in "();,":
        ua = ua.replace(separator, " ")
    return any(token.partition("/")[0].lower() in BOT_PRODUCTS for token in ua.split())


def _device_type(ua: str, os: str, family: str, brand: str | None, model: str | None) -> str:
    """A person's device type from what the parser named. Android browsers on tablets
    leave "Mobile" out of the User-Agent (Google's documented convention), which is how
    a tablet the rules do not know is told from a phone."""
    if (
        os in _TV_OSES
        or os.startswith("Chromecast")
        or brand in _TV_BRANDS
        or "TV" in family.replace("-", " ").split()
    ):
        return "other"
    if (
        family in _TABLET_FAMILIES
        or brand in _TABLET_BRANDS
        or model == "Tablet"
        or os in _TABLET_OSES
        or (os == "Android" and "Mobile" not in ua)
    ):
        return "tablet"
    if os in _MOBILE_OSES or family in _MOBILE_FAMILIES:
        return "mobile"
    if os in _DESKTOP_OSES:
        return "desktop"
    return "other"


def parse_user_agents(uas: Strings) -> pa.Table:
    """browser, os, device and is_bot (USER_AGENT_SCHEMA) for each User-Agent, null or
    blank ones as NO_USER_AGENT."""
    indices, distinct = _distinct(uas)
    return _take(USER_AGENT_SCHEMA, [describe_user_agent(ua) for ua in distinct], indices)


# ------------------------------------------------------------------ sources and paths

SOURCE_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),
        pa.field("utm_medium", pa.string(), nullable=False),
        pa.field("utm_campaign", pa.string(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
    ]
)

# Distinct URLs and referrers remembered per process, each. Referrers and URLs carry
# query strings, so they repeat less than User-Agents; cheap to describe again, so
# the cache only needs to cover a batch's few thousand, and its keys stay under about
# 20 MiB at the longest values ingest accepts.
URLS_CACHED_MAX = 8192

# Schemes whose host names where a visitor came from. "android-app" is the referrer an
# Android app (the Gmail app, say) gives, with its package name as host.
_REFERRER_SCHEMES = frozenset({"http", "https", "android-app"})
_UTM_KEYS = ("utm_source", "utm_medium", "utm_campaign")


class Source(NamedTuple):
    """Where a page view came from and which page it was. ``source`` is the URL's
    utm_source, else the external referrer's host (lower case, ASCII as site names
    are, without "www."), else "" (direct, unknown, or a link within the site)."""

    source: str
    utm_medium: str
    utm_campaign: str
    path: str


class _UrlParts(NamedTuple):
    path: str
    utm_source: str
    utm_medium: str
    utm_campaign: str


def describe_source(referrer: str | None, url: str | None, site: str) -> Source:
    """One event, as :func:`sources` describes each row."""
    parts = _url_parts(url or "")
    source = parts.utm_source
    if not source:
        host = _referrer_host(referrer or "")
        source = "" if _is_internal(host, _site_key(site)) else host
    return Source(source, parts.utm_medium, parts.utm_campaign, parts.path)


@functools.lru_cache(maxsize=URLS_CACHED_MAX)
def _url_parts(url: str) -> _UrlParts:
    """The path (as sent, without query or fragment; "/" for a URL with no path) and the
    UTM values of the query: keys in any case, values percent-decoded and stripped, the
    first non-empty value of a repeated key; "" when absent or empty. An event's path
    field may hold a whole URL (a tracker sends location.href) or only the path."""
    text = url.strip()
    base = text.partition("#")[0]
    before, _, query = base.partition("?")
    path = before
    if "//" in before:  # maybe a whole URL (a path alone spares the split)
        try:
            split = urlsplit(before)
            if split.scheme and split.netloc:
                path = split.path or "/"
        except ValueError:  # a malformed authority ("http://[::1"): keep the text as is
            pass
    found = dict.fromkeys(_UTM_KEYS, "")
    if "utm" in query.lower():
        for key, value in parse_qsl(query):
            key = key.lower()
            if key in found and not found[key]:
                found[key] = value.strip()
    return _UrlParts(path[:PATH_CHARS_MAX], *found.values())


@functools.lru_cache(maxsize=URLS_CACHED_MAX)
def _referrer_host(referrer: str) -> str:
    """The referrer's host named as sites are (UTS #46, lower case, ASCII), without a
    port or a leading "www."; "" for none, another scheme, or an invalid URL."""
    try:
        split = urlsplit(referrer.strip())
        host = split.hostname
    except ValueError:
        return ""
    if split.scheme not in _REFERRER_SCHEMES or not host:
        return ""
    try:
        return _without_www(normalize_site(host))
    except SiteError:
        return ""


def _without_www(host: str) -> str:
    return host[4:] if host.startswith("www.") and len(host) > 4 else host


@functools.lru_cache(maxsize=1024)
def _site_key(site: str) -> str:
    """The site as referrer hosts are compared with it; "" (matching nothing) for a name
    that is not a site's."""
    try:
        return _without_www(normalize_site(site))
    except SiteError:
        return ""


def _is_internal(host: str, site_key: str) -> bool:
    """A referrer on the site or any of its subdomains is navigation within the site."""
    return bool(host and site_key) and (host == site_key or host.endswith("." + site_key))


def sources(referrers: Strings, urls: Strings, site: str | Strings) -> pa.Table:
    """source, utm_medium, utm_campaign and path (SOURCE_SCHEMA) for each event, from
    its referrer, its URL or path, and its site (one for all rows, or one per row)."""
    n = len(urls)
    if len(referrers) != n or (not isinstance(site, str) and len(site) != n):
        raise ValueError("referrers, urls and sites must have the same length")
    url_indices, distinct_urls = _distinct(urls)
    by_url = _take(_URL_SCHEMA, [_url_parts(url) for url in distinct_urls], url_indices)
    hosts = _external_hosts(referrers, site)
    utm_source = by_url.column("utm_source")
    source = pc.if_else(pc.not_equal(utm_source, ""), utm_source, hosts)
    columns = [source, by_url.column("utm_medium"), by_url.column("utm_campaign")]
    return pa.Table.from_arrays([*columns, by_url.column("path")], schema=SOURCE_SCHEMA)


_URL_SCHEMA = pa.schema([(name, pa.string()) for name in _UrlParts._fields])


def _external_hosts(referrers: Strings, site: str | Strings) -> pa.Array:
    """Each row's referrer host, or "" where it is the row's own site. Per distinct
    referrer for one site; for many, no per-row or per-site Python: a row is internal
    when its site's key is its host or a parent domain of it, so each site's key is
    looked up among the few parent domains of the few distinct hosts."""
    indices, distinct = _distinct(referrers)
    hosts = [_referrer_host(referrer) for referrer in distinct]
    if isinstance(site, str):
        key = _site_key(site)
        return _strings_at(["" if _is_internal(host, key) else host for host in hosts], indices)
    domains = [_parent_domains(host) for host in hosts]
    parents = sorted({p for under in domains for p in under})
    host_of_row = indices.to_numpy(zero_copy_only=False).astype(np.int64)
    if not parents:  # no referrer with a host: nothing to compare
        return _strings_at(hosts, indices)
    encoded = pc.dictionary_encode(_strings(site))
    keys = _site_keys(encoded.dictionary)
    parent_of_key = pc.fill_null(pc.index_in(keys, value_set=pa.array(parents)), -1)
    parent_of_row = parent_of_key.to_numpy()[encoded.indices.to_numpy(zero_copy_only=False)]
    # internal[h, p]: parent domain p is host h or one of its parents; the last
    # column stands for "no parent domain" and is never internal.
    internal = np.zeros((len(hosts), len(parents) + 1), dtype=bool)
    column = {parent: i for i, parent in enumerate(parents)}
    for h, under in enumerate(domains):
        internal[h, [column[p] for p in under]] = True
    inside = internal[host_of_row, parent_of_row]
    return _strings_at([*hosts, ""], pa.array(np.where(inside, len(hosts), host_of_row)))


def _parent_domains(host: str) -> list[str]:
    """The host and every domain it is under ("a.b.c": "a.b.c", "b.c", "c"): the site
    keys it is internal to; none for no host."""
    if not host:
        return []
    labels = host.split(".")
    return [".".join(labels[i:]) for i in range(len(labels))]


# A site name already in normalize_site's form (lower-case ASCII labels of at most 63
# letters, digits and inner hyphens), as an RE2 pattern for Arrow.
_LABEL_RE2 = "[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_NORMAL_SITE = f"^{_LABEL_RE2}(?:\\.{_LABEL_RE2})*$"


def _site_keys(sites: pa.Array) -> pa.Array:
    """_site_key of each distinct site: by Arrow for sites already normal (every site
    ingest stores), by normalize_site for the rest."""
    normal = pc.and_(
        pc.match_substring_regex(sites, _NORMAL_SITE),
        pc.less_equal(pc.binary_length(sites), SITE_BYTES_MAX),
    )
    www = pc.and_(pc.starts_with(sites, "www."), pc.greater(pc.binary_length(sites), 4))
    keys = pc.if_else(www, pc.utf8_slice_codeunits(sites, 4), sites)
    if pc.all(normal).as_py():
        return keys
    odd = np.flatnonzero(~normal.to_numpy(zero_copy_only=False))
    values = keys.to_pylist()
    for i in odd.tolist():
        values[i] = _site_key(sites[i].as_py())
    return pa.array(values, pa.string())


# ---------------------------------------------------------------------------- shared


def _strings(values: Strings) -> pa.Array:
    """One plain string array with nulls as "": whatever string-like array came in."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks() if values.num_chunks != 1 else values.chunk(0)
    elif not isinstance(values, pa.Array):
        values = pa.array(values, pa.string())
    if pa.types.is_dictionary(values.type):
        values = values.dictionary_decode()
    if not pa.types.is_string(values.type):
        values = values.cast(pa.string())
    return pc.fill_null(values, "")


def _distinct(values: Strings) -> tuple[pa.Array, list[str]]:
    """Each row's index into the distinct values, and the distinct values."""
    encoded = pc.dictionary_encode(_strings(values))
    return encoded.indices, encoded.dictionary.to_pylist()


def _take(schema: pa.Schema, rows: Sequence[tuple], indices: pa.Array) -> pa.Table:
    """A table of ``schema`` holding, for each index, that row of ``rows``."""
    columns = [
        pa.array([row[i] for row in rows], field.type).take(indices)
        for i, field in enumerate(schema)
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def _strings_at(values: list[str], indices: pa.Array) -> pa.Array:
    """For each index, that value."""
    return pa.array(values, pa.string()).take(indices)


def clear_caches() -> None:
    """Forget every remembered description (for measurements and tests)."""
    for cached in (_describe_user_agent, _url_parts, _referrer_host, _site_key):
        cached.cache_clear()


def cache_info() -> dict[str, functools._CacheInfo]:
    """Hits, misses, size and bound of each cache."""
    return {
        "user_agents": _describe_user_agent.cache_info(),
        "urls": _url_parts.cache_info(),
        "referrers": _referrer_host.cache_info(),
    }
