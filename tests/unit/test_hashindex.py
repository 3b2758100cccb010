"""Radius search over PDQ hashes: every known fake within 31 bits is found, nothing farther.

The index must give exactly what comparing with every entry gives (`brute_force`), which
is itself checked against the plain-integer `phash.distance`; a missed match is a known
fake let through, so the planted neighbours sit where the pigeonhole bound is tightest.
"""

from __future__ import annotations

import threading

import numpy as np
import numpy.typing as npt
import pytest

from synthwatch.operators import hashindex
from synthwatch.operators.hashindex import HammingIndex, brute_force, pack_hex, unpack_hex
from synthwatch.operators.phash import MATCH_DISTANCE, distance

Codes = npt.NDArray[np.uint64]


def _random_codes(rng: np.random.Generator, n: int) -> Codes:
    return rng.integers(0, 2**64, size=(n, 4), dtype=np.uint64)


def _flip(code: Codes, bits: list[int] | npt.NDArray[np.int64]) -> Codes:
    """`code` with the given bit positions (0: the first hex digit's high bit) flipped."""
    out = code.copy()
    for b in bits:
        out[b // 64] ^= np.uint64(1 << (63 - b % 64))
    return out


def _spread(d: int) -> list[int]:
    """d flipped bits spread over the 16 substrings of 16 bits as evenly as possible: the
    case where every substring is as far as it can be and the bound must still hold."""
    return [16 * (k % 16) + k // 16 * 5 for k in range(d)]


def _near(rng: np.random.Generator, queries: Codes, max_d: int) -> Codes:
    """One neighbour per query at a random distance up to max_d, random positions."""
    return np.stack(
        [_flip(q, rng.choice(256, int(rng.integers(0, max_d + 1)), replace=False)) for q in queries]
    )


PLANTED_FOUND = (0, 1, 15, 16, 17, 30, 31)
PLANTED_NOT_FOUND = (32, 33)


@pytest.mark.parametrize("spread", [True, False], ids=["spread-over-substrings", "random-bits"])
def test_planted_neighbours_up_to_31_bits_are_found_and_none_beyond(spread: bool) -> None:
    rng = np.random.default_rng(31)
    base = _random_codes(rng, 20_000)  # beyond the delta bound: searched through the tables
    query = _random_codes(rng, 1)[0]
    planted = {}
    for n, d in enumerate(PLANTED_FOUND + PLANTED_NOT_FOUND):
        bits = _spread(d) if spread else rng.choice(256, d, replace=False)
        planted[1_000_000 + n] = (_flip(query, bits), d)
    codes = np.concatenate([base, np.stack([c for c, _ in planted.values()])])
    ids = np.concatenate([np.arange(len(base)), np.array(list(planted))]).astype(np.int64)
    index = HammingIndex()
    index.add(codes, ids)

    found = dict(index.search(query[None, :])[0])

    for id_, (code, d) in planted.items():
        assert distance(unpack_hex(code[None, :])[0], unpack_hex(query[None, :])[0]) == d
        if d <= MATCH_DISTANCE:
            assert found.get(id_) == d, f"planted at distance {d} not found"
        else:
            assert id_ not in found, f"planted at distance {d} returned"
    assert index.search(query[None, :]) == brute_force(query[None, :], codes, ids, MATCH_DISTANCE)


def test_brute_force_agrees_with_integer_distance_and_sorts_by_distance_then_id() -> None:
    rng = np.random.default_rng(1)
    query = _random_codes(rng, 1)
    codes = np.concatenate([_near(rng, np.repeat(query, 300, axis=0), 40), _random_codes(rng, 50)])
    ids = rng.permutation(len(codes)).astype(np.int64)
    q_hex, hexes = unpack_hex(query)[0], unpack_hex(codes)

    got = brute_force(query, codes, ids, MATCH_DISTANCE)[0]

    expected = sorted(
        (int(i), distance(q_hex, h))
        for i, h in zip(ids, hexes, strict=True)
        if distance(q_hex, h) <= MATCH_DISTANCE
    )
    assert sorted(got) == expected
    assert got == sorted(got, key=lambda pair: (pair[1], pair[0]))
    assert len({d for _, d in got}) < len(got)  # ties exist, so the id order was exercised


@pytest.mark.parametrize("substrings", [16, 13, 32])
def test_index_equals_brute_force_on_random_queries_at_several_radii(substrings: int) -> None:
    """16 is the default; 13 cuts substrings across word boundaries into unequal widths
    and binary-searches them; 32 has sub-radius 0."""
    rng = np.random.default_rng(substrings)
    codes = _random_codes(rng, 20_000)
    ids = rng.permutation(10 * len(codes))[: len(codes)].astype(np.int64)
    queries = np.concatenate(
        [_near(rng, codes[rng.integers(0, len(codes), 150)], 45), _random_codes(rng, 50)]
    )
    index = HammingIndex(substrings=substrings)
    index.add(codes, ids)
    for radius in (0, 7, MATCH_DISTANCE, 40, 70):
        assert index.search(queries, radius) == brute_force(queries, codes, ids, radius), radius


def test_queries_verified_in_several_batches_get_the_same_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = np.random.default_rng(9)
    codes = _random_codes(rng, 10_000)
    ids = np.arange(len(codes), dtype=np.int64)
    queries = _near(rng, codes[rng.integers(0, len(codes), 100)], 35)
    index = HammingIndex()
    index.add(codes, ids)
    monkeypatch.setattr(hashindex, "CHUNK_CANDIDATES", 5_000)  # a dozen queries a batch
    assert index.search(queries) == brute_force(queries, codes, ids, MATCH_DISTANCE)


def test_the_tables_answer_without_scanning_the_main_part(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(2)
    codes = _random_codes(rng, 20_000)
    ids = np.arange(len(codes), dtype=np.int64)
    queries = _near(rng, codes[:200], 35)
    expected = brute_force(queries, codes, ids, MATCH_DISTANCE)
    index = HammingIndex()
    index.add(codes, ids)

    def no_scan(*_args: object) -> None:
        raise AssertionError("scanned instead of using the tables")

    monkeypatch.setattr(hashindex, "_scan", no_scan)
    assert index.search(queries) == expected
    assert sum(map(len, expected)) >= 150  # most queries have their neighbour


def test_adds_after_a_search_and_removals_keep_results_equal_to_brute_force() -> None:
    rng = np.random.default_rng(3)
    codes = _random_codes(rng, 20_000)
    ids = np.arange(len(codes), dtype=np.int64)
    index = HammingIndex()
    index.add(codes[:12_000], ids[:12_000])
    queries = _near(rng, codes[rng.integers(0, len(codes), 200)], 35)

    def check(live: npt.NDArray[np.bool_], upto: int) -> None:
        keep = live[:upto]
        assert len(index) == int(keep.sum())
        assert index.search(queries) == brute_force(
            queries, codes[:upto][keep], ids[:upto][keep], MATCH_DISTANCE
        )

    live = np.ones(len(codes), np.bool_)
    check(live, 12_000)
    # Small adds stay in the delta; the last ones push it past its bound and are merged.
    for start in range(12_000, 20_000, 500):
        index.add(codes[start : start + 500], ids[start : start + 500])
        check(live, start + 500)
    gone = rng.choice(len(codes), 3_000, replace=False)
    index.remove(int(i) for i in gone)
    live[gone] = False
    check(live, len(codes))
    index.remove(range(0, 20_000, 2))  # past the tombstone bound: rebuilt without them
    live[::2] = False
    check(live, len(codes))
    index.remove([10**9])  # unknown ids are ignored: a follower may replay a removal
    check(live, len(codes))


def test_a_removed_id_added_again_matches_with_its_new_code_only() -> None:
    rng = np.random.default_rng(4)
    codes = _random_codes(rng, 6_000)
    index = HammingIndex()
    index.add(codes, np.arange(6_000, dtype=np.int64))
    index.remove([7])
    assert index.search(codes[7:8]) == [[]]

    index.add(codes[8:9], np.array([7]))  # id 7 now carries entry 8's code (in the delta)

    assert index.search(codes[7:8]) == [[]]
    assert index.search(codes[8:9]) == [[(7, 0), (8, 0)]]
    index.remove(np.array([7]))
    assert index.search(codes[8:9]) == [[(8, 0)]]
    assert len(index) == 5_999


def test_empty_index_and_empty_queries() -> None:
    index = HammingIndex()
    query = pack_hex(["0" * 64])
    assert index.search(query) == [[]]
    assert index.search(np.zeros((0, 4), np.uint64)) == []
    index.add(query, np.array([5]))
    assert index.search(query, radius=0) == [[(5, 0)]]
    assert len(index) == 1


def test_pack_hex_reads_the_first_hex_digit_high_bit_as_bit_0() -> None:
    first = "8" + "0" * 63
    last = "0" * 63 + "1"
    packed = pack_hex([first, last])
    assert packed.dtype == np.uint64 and packed.shape == (2, 4)
    assert packed[0].tolist() == [1 << 63, 0, 0, 0]
    assert packed[1].tolist() == [0, 0, 0, 1]
    assert int(first, 16) == 1 << 255


def test_pack_hex_round_trips_and_its_distances_equal_phash_distance() -> None:
    rng = np.random.default_rng(5)
    hexes = [bytes(rng.integers(0, 256, 32, dtype=np.uint8)).hex() for _ in range(200)]
    packed = pack_hex(hexes)
    assert unpack_hex(packed) == hexes
    assert unpack_hex(pack_hex([h.upper() for h in hexes[:3]])) == hexes[:3]
    for a in range(0, 200, 20):
        got = np.bitwise_count(packed[a] ^ packed).sum(axis=1)
        assert got.tolist() == [distance(hexes[a], h) for h in hexes]


@pytest.mark.parametrize(
    "bad", ["abc", "0" * 63, "0" * 65, "g" + "0" * 63, "0x" + "0" * 62, " " + "0" * 63, None]
)
def test_pack_hex_names_a_hash_that_is_not_64_hex_digits(bad: object) -> None:
    with pytest.raises(ValueError, match="not a PDQ hash") as err:
        pack_hex(["0" * 64, bad])  # type: ignore[list-item]
    assert repr(bad) in str(err.value)


def test_a_search_keeps_the_state_it_started_with_while_entries_change(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = np.random.default_rng(7)
    codes = _random_codes(rng, 9_000)
    ids = np.arange(len(codes), dtype=np.int64)
    index = HammingIndex()
    index.add(codes[:8_000], ids[:8_000])
    index.add(codes[8_000:8_500], ids[8_000:8_500])  # stays in the delta
    queries = np.concatenate([codes[:50], codes[8_000:8_050]])
    before = index.search(queries)
    verify = hashindex._row_distances

    def verify_while_writing(*args: object) -> npt.NDArray[np.uint16]:
        index.remove(range(9_000))  # the main part's and the delta's entries
        index.add(codes[8_500:], ids[8_500:])
        return verify(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(hashindex, "_row_distances", verify_while_writing)
    assert index.search(queries) == before
    monkeypatch.undo()
    assert len(index) == 500
    assert index.search(queries) == [[]] * len(queries)


def test_substrings_follow_the_hex_bit_order() -> None:
    rng = np.random.default_rng(8)
    codes = _random_codes(rng, 50)
    numbers = [int(h, 16) for h in unpack_hex(codes)]
    for lo, width in [(0, 16), (48, 16), (60, 8), (57, 20), (120, 19), (237, 19), (240, 16)]:
        got = hashindex._substring(codes, lo, width).tolist()
        assert got == [(n >> (256 - lo - width)) & ((1 << width) - 1) for n in numbers]


def test_searches_during_adds_and_removals_see_consistent_results() -> None:
    rng = np.random.default_rng(6)
    codes = _random_codes(rng, 16_000)
    ids = np.arange(len(codes), dtype=np.int64)
    index = HammingIndex()
    index.add(codes[:4_000], ids[:4_000])
    queries = _near(rng, codes[rng.integers(0, 4_000, 64)], 31)
    # Entries present from the start and never removed: every search must find these.
    stable = brute_force(queries, codes[:2_000], ids[:2_000], MATCH_DISTANCE)
    errors: list[BaseException] = []
    done = threading.Event()

    def reader() -> None:
        try:
            while not done.is_set():
                for q, got, must in zip(queries, index.search(queries), stable, strict=True):
                    assert set(must) <= set(got)
                    for id_, d in got:
                        assert d == int(np.bitwise_count(codes[id_] ^ q).sum()) <= 31
        except BaseException as exc:
            errors.append(exc)

    readers = [threading.Thread(target=reader) for _ in range(3)]
    for t in readers:
        t.start()
    try:
        for start in range(4_000, 16_000, 400):
            index.add(codes[start : start + 400], ids[start : start + 400])
            index.remove(range(start - 1_000, start - 900))  # never below 2,000
    finally:
        done.set()
        for t in readers:
            t.join()

    assert not errors, errors[0]
    live = np.ones(len(codes), np.bool_)
    for start in range(4_000, 16_000, 400):
        live[start - 1_000 : start - 900] = False
    assert len(index) == int(live.sum())
    assert index.search(queries) == brute_force(queries, codes[live], ids[live], MATCH_DISTANCE)
