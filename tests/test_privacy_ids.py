"""Visitor ids without IP addresses: the hash, its framing, address normalization, the
daily salts on real files with a fake clock, and what reaches the disk."""

from __future__ import annotations

import hashlib
import ipaddress
import multiprocessing
import os
import stat
import threading
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowray.ingest import visitors_id
from flowray.ingest.visitors_id import (
    IpError,
    day_of_ms,
    normalize_ip,
    visitor_id,
    visitor_ids,
    visitor_ids_by_day,
)
from flowray.storage import salts as salts_module
from flowray.storage.salts import ImportSalts, SaltError, SaltExpired, SaltStore

SALT = bytes(range(32))
UA = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
DAY = date(2026, 3, 14)


class FakeClock:
    """Epoch milliseconds that a test moves by hand."""

    def __init__(self, day: date, hour: int = 12) -> None:
        self.ms = int(datetime(day.year, day.month, day.day, hour, tzinfo=UTC).timestamp() * 1000)

    def __call__(self) -> int:
        return self.ms

    def advance(self, days: float) -> None:
        self.ms += int(days * 86_400_000)


def store_at(path: Path, day: date = DAY) -> tuple[SaltStore, FakeClock]:
    clock = FakeClock(day)
    return SaltStore(path / "salts", clock_ms=clock), clock


# --------------------------------------------------------------------------- the hash


def _frame(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


def test_the_id_is_keyed_blake2b_64_over_length_prefixed_fields() -> None:
    """The format, pinned: changing it changes every id, so it must be deliberate."""
    message = _frame(b"example.com") + _frame(bytes([192, 0, 2, 1])) + _frame(UA.encode())
    expected = hashlib.blake2b(
        message, key=SALT, digest_size=8, person=b"flowray-visitor1"
    ).hexdigest()
    got = visitor_id(SALT, "example.com", "192.0.2.1", UA)
    assert got == expected
    assert len(got) == 16 and got == got.lower() and int(got, 16) >= 0


def test_fields_are_framed_so_moving_a_boundary_changes_the_id() -> None:
    # 99.46.100.101 packs to b"c.de": unframed, both would hash b"a.bc.dec.deUA".
    ip = "99.46.100.101"
    assert ipaddress.ip_address(ip).packed == b"c.de"
    one, two = ("a.b", ip, "c.deUA"), ("a.bc.de", ip, "UA")
    assert b"".join(f.encode() for f in (one[0], "c.de", one[2])) == b"".join(
        f.encode() for f in (two[0], "c.de", two[2])
    )
    assert visitor_id(SALT, *one) != visitor_id(SALT, *two)
    assert visitor_id(SALT, "ab.com", ip, "c") != visitor_id(SALT, "ab.co", ip, "mc")


def test_each_input_and_the_salt_change_the_id() -> None:
    base = visitor_id(SALT, "example.com", "192.0.2.1", UA)
    others = {
        visitor_id(bytes(32), "example.com", "192.0.2.1", UA),
        visitor_id(SALT, "example.org", "192.0.2.1", UA),
        visitor_id(SALT, "example.com", "192.0.2.2", UA),
        visitor_id(SALT, "example.com", "192.0.2.1", UA + " "),
        visitor_id(SALT, "example.com", "192.0.2.1", ""),
    }
    assert base not in others and len(others) == 5


def test_the_site_is_normalized_as_routing_does() -> None:
    assert visitor_id(SALT, "Example.COM.", "192.0.2.1", UA) == visitor_id(
        SALT, "example.com", "192.0.2.1", UA
    )


@pytest.mark.parametrize("salt", [b"", b"short", bytes(15), bytes(65), "text" * 8])
def test_a_weak_or_wrong_salt_is_refused(salt: object) -> None:
    with pytest.raises(ValueError, match="a salt is 16 to 64 bytes"):
        visitor_id(salt, "example.com", "192.0.2.1", UA)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- addresses


@pytest.mark.parametrize(
    ("spelling", "canonical"),
    [
        ("192.0.2.1", "192.0.2.1"),
        ("::ffff:192.0.2.1", "192.0.2.1"),
        ("::FFFF:C000:0201", "192.0.2.1"),
        ("0:0:0:0:0:ffff:c000:201", "192.0.2.1"),
        ("2001:0DB8:0000:0000:0000:0000:0000:0001", "2001:db8::1"),
        ("2001:db8:0:0:1:0:0:1", "2001:db8::1:0:0:1"),
        ("2001:DB8::1", "2001:db8::1"),
        ("0:0:0:0:0:0:0:1", "::1"),
        ("fe80::1%eth0", "fe80::1"),
        ("::", "::"),
        ("::192.0.2.1", "::c000:201"),  # IPv4-compatible (deprecated): not mapped
        ("64:ff9b::192.0.2.1", "64:ff9b::c000:201"),  # NAT64: another address
    ],
)
def test_every_spelling_of_an_address_hashes_alike(spelling: str, canonical: str) -> None:
    assert normalize_ip(spelling) == canonical
    assert visitor_id(SALT, "example.com", spelling, UA) == visitor_id(
        SALT, "example.com", canonical, UA
    )


def test_ipv4_and_its_mapped_ipv6_differ_from_other_ipv6() -> None:
    v4 = visitor_id(SALT, "example.com", "192.0.2.1", UA)
    assert v4 != visitor_id(SALT, "example.com", "::c000:201", UA)
    assert v4 != visitor_id(SALT, "example.com", "64:ff9b::c000:201", UA)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        " 192.0.2.1",
        "192.0.2.1 ",
        "192.0.2.1:8080",
        "[2001:db8::1]",
        "192.000.2.1",
        "192.0.2.01",
        "256.0.2.1",
        "192.0.2",
        "example.com",
        "2001:db8::1::2",
        "2001:db8:::1",
        "192.0.2.1\x00",
        "-",
        "１９２.0.2.1",
    ],
)
def test_an_invalid_address_is_a_clear_error_that_does_not_repeat_it(bad: str) -> None:
    with pytest.raises(IpError, match="not an IPv4 or IPv6 address") as caught:
        visitor_id(SALT, "example.com", bad, UA)
    assert bad.strip() == "" or bad.strip() not in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    with pytest.raises(IpError):
        normalize_ip(bad)


def test_a_non_string_address_is_refused() -> None:
    with pytest.raises(IpError, match="must be a string"):
        visitor_id(SALT, "example.com", 3221225985, UA)  # type: ignore[arg-type]


def _reference_packed(text: str) -> bytes | None:
    """What :mod:`ipaddress` alone makes of ``text`` (the rules' reference)."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.packed
    return address.packed


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(
        st.text(alphabet="0123456789abcdefABCDEF:.%[] x", max_size=45),
        st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n))),
        st.integers(0, 2**128 - 1).map(lambda n: ipaddress.IPv6Address(n).exploded),
        st.integers(0, 2**128 - 1).map(lambda n: str(ipaddress.IPv6Address(n)).upper()),
        st.integers(0, 2**32 - 1).map(lambda n: f"::ffff:{ipaddress.IPv4Address(n)}"),
    )
)
def test_the_fast_path_accepts_exactly_what_ipaddress_accepts(text: str) -> None:
    expected = _reference_packed(text)
    try:
        got: bytes | None = visitors_id._packed(text)
    except IpError:
        got = None
    assert got == expected


# --------------------------------------------------------------------------- vectorized


def _mixed_rows(count: int, seed: int) -> tuple[list[str | None], list[str | None]]:
    rng = np.random.default_rng(seed)
    pool = [
        "192.0.2.1",
        "::ffff:192.0.2.1",
        "198.51.100.7",
        "2001:db8::1",
        "2001:0DB8:0:0:0:0:0:1",
        "fe80::1%eth0",
        "fe80::1",
        None,
    ] + [str(ipaddress.IPv4Address(int(n))) for n in rng.integers(0, 2**32, 40)]
    uas: list[str | None] = [UA, "curl/8.5.0", "", None, "ü", "a" * 300]
    ips = [pool[i] for i in rng.integers(0, len(pool), count)]
    return ips, [uas[i] for i in rng.integers(0, len(uas), count)]


def test_the_vectorized_ids_equal_the_scalar_ones() -> None:
    ips, uas = _mixed_rows(2000, seed=7)
    got = visitor_ids(SALT, "example.com", ips, uas).to_pylist()
    want = [
        None if ip is None else visitor_id(SALT, "example.com", ip, ua or "")
        for ip, ua in zip(ips, uas, strict=True)
    ]
    assert got == want
    assert None in got and len(set(got)) > 40


@pytest.mark.parametrize(
    "wrap",
    [
        lambda v: v,
        lambda v: np.array(v, dtype=object),
        lambda v: pa.array(v, pa.string()),
        lambda v: pa.array(v, pa.large_string()),
        lambda v: pa.chunked_array([pa.array(v[:5], pa.string()), pa.array(v[5:], pa.string())]),
        lambda v: pa.array(v, pa.string()).dictionary_encode(),
    ],
    ids=["list", "numpy", "arrow", "large", "chunked", "dictionary"],
)
def test_the_vectorized_ids_take_lists_numpy_and_arrow(wrap: object) -> None:
    ips, uas = _mixed_rows(30, seed=1)
    want = visitor_ids(SALT, "example.com", ips, uas).to_pylist()
    assert visitor_ids(SALT, "example.com", wrap(ips), wrap(uas)).to_pylist() == want  # type: ignore[operator]


def test_sites_per_row_and_days_per_row_match_the_scalar_ids() -> None:
    ips, uas = _mixed_rows(600, seed=3)
    rng = np.random.default_rng(3)
    sites = [["a.example", "B.example", "c.example"][i] for i in rng.integers(0, 3, 600)]
    day_ms = int(datetime(2026, 3, 14, tzinfo=UTC).timestamp() * 1000)
    ts = day_ms + rng.integers(-86_400_000, 2 * 86_400_000, 600)
    salt_of = {DAY + timedelta(days=k): bytes([k + 1]) * 32 for k in (-1, 0, 1)}
    asked: list[date] = []

    def salt_of_day(day: date) -> bytes:
        asked.append(day)
        return salt_of[day]

    got = visitor_ids_by_day(salt_of_day, pa.array(ts), sites, ips, uas).to_pylist()
    want = [
        None if ip is None else visitor_id(salt_of[day_of_ms(int(t))], s, ip, ua or "")
        for t, s, ip, ua in zip(ts.tolist(), sites, ips, uas, strict=True)
    ]
    assert got == want
    assert sorted(asked) == sorted(salt_of)  # once per day


def test_a_vectorized_call_names_every_row_with_an_invalid_address() -> None:
    ips = ["192.0.2.1", "192.0.2.1:80", None, "2001:db8::1", "192.0.2.1:80", "nope"]
    with pytest.raises(IpError, match=r"^row 1 \(and 2 more\): client address is not") as e:
        visitor_ids(SALT, "example.com", ips, [UA] * 6)
    assert e.value.positions == [1, 4, 5]
    assert "192.0.2.1" not in str(e.value)


def test_vectorized_edge_cases() -> None:
    assert visitor_ids(SALT, "example.com", [], []).to_pylist() == []
    assert visitor_ids(SALT, "example.com", [None, None], [UA, None]).to_pylist() == [None] * 2
    with pytest.raises(ValueError, match="user_agent has 1 rows, not 2"):
        visitor_ids(SALT, "example.com", ["192.0.2.1"] * 2, [UA])
    with pytest.raises(ValueError, match="site must not be null"):
        visitor_ids(SALT, ["example.com", None], ["192.0.2.1"] * 2, [UA] * 2)
    with pytest.raises(TypeError, match="ip must be strings"):
        visitor_ids(SALT, "example.com", pa.array([1, 2]), [UA] * 2)
    with pytest.raises(ValueError, match="a salt is"):
        visitor_ids(b"", "example.com", [], [])


def test_day_of_ms_is_the_utc_day() -> None:
    midnight = int(datetime(2026, 3, 14, tzinfo=UTC).timestamp() * 1000)
    assert day_of_ms(midnight) == DAY
    assert day_of_ms(midnight - 1) == DAY - timedelta(days=1)
    assert day_of_ms(0) == date(1970, 1, 1)


# --------------------------------------------------------------------------- the salt store


def test_a_salt_is_made_once_per_day_kept_private_and_read_back(tmp_path: Path) -> None:
    store, _ = store_at(tmp_path)
    salt = store.salt_for(DAY)
    assert len(salt) == 32 and store.salt_for(DAY) == salt
    path = tmp_path / "salts" / "2026-03-14.salt"
    assert path.read_bytes() == salt
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "salts").stat().st_mode) == 0o700
    again, _ = store_at(tmp_path)  # another process, later
    assert again.salt_for(DAY) == salt
    assert store.salt_for(DAY + timedelta(days=1)) != salt  # tomorrow: for skew at midnight
    assert store.days() == [DAY, DAY + timedelta(days=1)]
    assert not [p for p in (tmp_path / "salts").iterdir() if p.name.endswith(".tmp")]


def test_the_window_is_yesterday_today_and_tomorrow(tmp_path: Path) -> None:
    store, clock = store_at(tmp_path)
    assert store.window() == (DAY - timedelta(days=1), DAY + timedelta(days=1))
    with pytest.raises(SaltError, match="no salt for 2026-03-16 yet"):
        store.salt_for(DAY + timedelta(days=2))
    with pytest.raises(SaltExpired, match="no salt was kept for 2026-03-13"):
        store.salt_for(DAY - timedelta(days=1))  # past days are never made
    with pytest.raises(SaltExpired, match="the salt of 2026-03-12 is deleted"):
        store.salt_for(DAY - timedelta(days=2))
    today = store.salt_for(DAY)
    clock.advance(1)  # just after midnight: yesterday's salt still hashes its late events
    assert store.salt_for(DAY) == today
    assert store.days() == [DAY]


def test_two_stores_racing_for_one_day_agree(tmp_path: Path) -> None:
    for round_ in range(20):
        day = DAY + timedelta(days=2 * round_)
        stores = [store_at(tmp_path, day)[0] for _ in range(6)]
        barrier = threading.Barrier(len(stores))
        got: list[bytes] = []

        def race(
            store: SaltStore,
            day: date = day,
            barrier: threading.Barrier = barrier,
            got: list[bytes] = got,
        ) -> None:
            barrier.wait()
            got.append(store.salt_for(day + timedelta(days=1)))

        threads = [threading.Thread(target=race, args=(s,)) for s in stores]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(got) == len(stores) and len(set(got)) == 1
        assert (tmp_path / "salts" / f"{day + timedelta(days=1)}.salt").read_bytes() == got[0]


def test_the_loser_of_a_race_reads_the_winners_salt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deterministically: the other store publishes between our write and our link."""
    mine, _ = store_at(tmp_path)
    theirs, _ = store_at(tmp_path)
    real_link = os.link
    published: list[bytes] = []

    def link_after_them(src: str, dst: str) -> None:
        if not published:
            monkeypatch.setattr(salts_module.os, "link", real_link)
            published.append(theirs.salt_for(DAY))
        real_link(src, dst)

    monkeypatch.setattr(salts_module.os, "link", link_after_them)
    assert mine.salt_for(DAY) == published[0]
    assert (tmp_path / "salts" / "2026-03-14.salt").read_bytes() == published[0]
    assert [p.name for p in (tmp_path / "salts").iterdir() if p.suffix == ".tmp"] == []


def _race_in_a_process(directory: str, ms: int, barrier: object, out: object) -> None:
    store = SaltStore(Path(directory), clock_ms=lambda: ms)
    barrier.wait()  # type: ignore[attr-defined]
    out.put(store.salt_for(DAY).hex())  # type: ignore[attr-defined]


def test_processes_racing_for_one_day_agree(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    barrier, out = context.Barrier(4), context.Queue()
    ms = FakeClock(DAY)()
    workers = [
        context.Process(target=_race_in_a_process, args=(str(tmp_path / "s"), ms, barrier, out))
        for _ in range(4)
    ]
    for w in workers:
        w.start()
    got = {out.get(timeout=60) for _ in workers}
    for w in workers:
        w.join(timeout=60)
        assert w.exitcode == 0
    assert got == {(tmp_path / "s" / "2026-03-14.salt").read_bytes().hex()}


def test_rotation_deletes_salts_older_than_yesterday(tmp_path: Path) -> None:
    store, clock = store_at(tmp_path)
    salts = {}
    for _ in range(4):
        salts[store.today()] = store.salt_for(store.today())
        clock.advance(1)
    # the first use of each day rotated: the salt of two days ago is gone
    assert store.days() == [DAY + timedelta(days=2), DAY + timedelta(days=3)]
    assert store.floor() == DAY + timedelta(days=2)
    stray = tmp_path / "salts" / ".2026-03-01.0123456789abcdef.tmp"
    stray.write_bytes(b"x")
    assert store.rotate() == [DAY + timedelta(days=2)]  # today is DAY + 4
    assert store.days() == [DAY + timedelta(days=3)] and not stray.exists()
    assert store.salt_for(DAY + timedelta(days=3)) == salts[DAY + timedelta(days=3)]
    with pytest.raises(SaltExpired):
        store.salt_for(DAY + timedelta(days=2))


def test_the_store_stays_bounded_over_a_month(tmp_path: Path) -> None:
    store, clock = store_at(tmp_path)
    most = 0
    for _ in range(30):
        store.salt_for(store.today())
        store.salt_for(store.today() + timedelta(days=1))
        most = max(most, len(store.days()))
        clock.advance(1)
    assert most == 3  # yesterday, today, tomorrow
    assert len(list((tmp_path / "salts").iterdir())) <= 4  # and floor.json


def test_a_deleted_days_salt_is_never_made_again(tmp_path: Path) -> None:
    store, clock = store_at(tmp_path)
    old = store.salt_for(DAY)
    clock.advance(3)
    store.rotate()
    assert DAY not in store.days()
    with pytest.raises(SaltExpired, match="the salt of 2026-03-14 is deleted"):
        store.salt_for(DAY)
    clock.advance(-3)  # a clock that goes back, in this process or a fresh one
    for again in (store, store_at(tmp_path)[0]):
        with pytest.raises(
            SaltExpired, match="was deleted .floor 2026-03-16.: the clock went back"
        ):
            again.salt_for(DAY)
    assert DAY not in store.days() and old not in [
        (tmp_path / "salts" / f"{d}.salt").read_bytes() for d in store.days()
    ]


@pytest.mark.parametrize("rotation_runs", ["before the temporary file", "before the link"])
def test_a_salt_made_while_a_rotation_passes_it_is_taken_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rotation_runs: str
) -> None:
    """A process whose clock is days behind checks the floor; then a rotation records a
    later floor and lists the files, before the late process wrote its temporary file
    (which then sees the floor after its link and deletes its salt) or before it linked
    it (the rotation deleted the temporary file, so the link fails)."""
    late, _ = store_at(tmp_path, DAY)
    late.rotate()  # its own rotation, for its (wrong) today, is done
    ahead, _ = store_at(tmp_path, DAY + timedelta(days=5))
    if rotation_runs == "before the link":
        real_link = os.link

        def rotation_then_link(src: str, dst: str) -> None:
            ahead.rotate()
            real_link(src, dst)

        monkeypatch.setattr(salts_module.os, "link", rotation_then_link)
    else:
        real_make = late._make_directory

        def rotation_then_make() -> None:
            real_make()
            ahead.rotate()

        monkeypatch.setattr(late, "_make_directory", rotation_then_make)
    with pytest.raises(SaltExpired, match="the clock went back"):
        late.salt_for(DAY)
    assert late.days() == [] and ahead.floor() == DAY + timedelta(days=4)
    assert [p.name for p in (tmp_path / "salts").iterdir()] == ["floor.json"]


def test_a_damaged_salt_file_is_an_error_not_replaced(tmp_path: Path) -> None:
    store, _ = store_at(tmp_path)
    store.salt_for(DAY)
    path = tmp_path / "salts" / "2026-03-14.salt"
    path.write_bytes(b"short")
    with pytest.raises(SaltError, match="damaged"):
        store_at(tmp_path)[0].salt_for(DAY)
    assert path.read_bytes() == b"short"


# --------------------------------------------------------------------------- log imports


def test_an_import_uses_the_stored_salt_inside_the_window_and_its_own_before(
    tmp_path: Path,
) -> None:
    store, clock = store_at(tmp_path)
    today = store.salt_for(DAY)
    first, second = ImportSalts(store), ImportSalts(store)
    assert first.salt_for(DAY) == today == second.salt_for(DAY)
    before = sorted(p.name for p in (tmp_path / "salts").iterdir())
    old = DAY - timedelta(days=30)
    assert first.salt_for(old) == first.salt_for(old)  # links within the import
    assert first.salt_for(old) != second.salt_for(old)  # and only there
    assert first.salt_for(old) != first.salt_for(old + timedelta(days=1))  # per day
    assert first.salt_for(DAY - timedelta(days=1)) == first.import_salt(DAY - timedelta(days=1))
    assert sorted(p.name for p in (tmp_path / "salts").iterdir()) == before  # nothing stored
    clock.advance(2)  # the import runs past midnight twice: its ids stay one per day
    assert first.salt_for(DAY) == today
    assert ImportSalts(store).salt_for(DAY) != today
    with pytest.raises(SaltError, match="yet"):
        first.salt_for(DAY + timedelta(days=9))
    assert ImportSalts(None).salt_for(DAY) != today
    with pytest.raises(ValueError, match="at least 16 bytes"):
        ImportSalts(None, key=b"short")


def test_old_log_lines_link_within_their_import_only(tmp_path: Path) -> None:
    store, _ = store_at(tmp_path)
    old_ms = FakeClock(DAY - timedelta(days=100))()
    rows = ([old_ms, old_ms + 1000, FakeClock(DAY)()], ["192.0.2.1"] * 3, [UA] * 3)
    one = visitor_ids_by_day(ImportSalts(store).salt_for, rows[0], "example.com", *rows[1:])
    two = visitor_ids_by_day(ImportSalts(store).salt_for, rows[0], "example.com", *rows[1:])
    a, b = one.to_pylist(), two.to_pylist()
    assert a[0] == a[1] and b[0] == b[1] and a[0] != b[0]
    assert a[2] == b[2] == visitor_id(store.salt_for(DAY), "example.com", "192.0.2.1", UA)


# --------------------------------------------------------------------------- privacy


def test_other_days_give_unlinkable_ids(tmp_path: Path) -> None:
    store, clock = store_at(tmp_path)
    ips = [f"192.0.2.{n}" for n in range(1, 201)] + [f"2001:db8::{n:x}" for n in range(1, 201)]
    by_day = []
    for _ in range(3):
        salt = store.salt_for(store.today())
        by_day.append([visitor_id(salt, "example.com", ip, UA) for ip in ips])
        clock.advance(1)
    for one, other in [(0, 1), (1, 2), (0, 2)]:
        assert not set(by_day[one]) & set(by_day[other])
    # not even a shared bit pattern: each bit of the ids changes about half the time
    xor = [int(a, 16) ^ int(b, 16) for a, b in zip(by_day[0], by_day[1], strict=True)]
    assert 0.45 < sum(bin(x).count("1") for x in xor) / (64 * len(xor)) < 0.55
    with pytest.raises(SaltExpired):
        store.salt_for(DAY)  # the first day's salt is gone: its ids link to nothing


def test_no_ip_text_reaches_the_stores_files(tmp_path: Path) -> None:
    store, clock = store_at(tmp_path)
    ips = ["192.0.2.77", "198.51.100.23", "2001:db8::beef", "::ffff:203.0.113.9"]
    texts = {ip.encode() for ip in ips} | {normalize_ip(ip).encode() for ip in ips}
    packed = {ipaddress.ip_address(normalize_ip(ip)).packed for ip in ips}
    ids = []
    for _ in range(3):
        imports = ImportSalts(store)
        ids += visitor_ids_by_day(
            imports.salt_for,
            [clock.ms - 200 * 86_400_000, clock.ms, clock.ms + 1, clock.ms - 86_400_000],
            "example.com",
            ips,
            [UA] * 4,
        ).to_pylist()
        store.rotate()
        clock.advance(1)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written and all(p.parent == tmp_path / "salts" for p in written)
    for path in written:
        data = path.read_bytes()
        for needle in texts | packed:
            assert needle not in data, (path.name, needle)
        assert not any(ip in path.name for ip in ips)
    for visitor in ids:
        assert visitor is not None and not any(ip in visitor for ip in ips)
