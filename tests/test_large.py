"""Messages larger than a ring, through every path (cpool only: the ring
size is cpool's)."""
import os

import pytest

import helpers

pytestmark = pytest.mark.cpool_only

T = 60


def echo(x):
    return x


def make_bytes(n):
    return b"\x5a" * n


@pytest.fixture(scope="module")
def pool():
    from cpool import Pool
    p = Pool(2)
    yield p
    p.terminate()
    p.join()


SIZES = [(1 << 20) - 100, 3 << 20, (8 << 20) + 13]


@pytest.mark.parametrize("n", SIZES)
def test_apply_large_argument_and_result(pool, n):
    data = os.urandom(n)
    assert pool.apply(len, (data,)) == n
    assert pool.apply(helpers.identity, (data,)) == data


@pytest.mark.parametrize("n", SIZES)
def test_apply_async_large_result(pool, n):
    r = pool.apply_async(make_bytes, (n,))
    assert r.get(timeout=T) == b"\x5a" * n


def test_map_with_large_items_interleaved_with_small(pool):
    items = [os.urandom(3 << 20) if i % 3 == 0 else b"s%d" % i for i in range(12)]
    assert pool.map(len, items, chunksize=1) == [len(x) for x in items]
    out = list(pool.imap(helpers.identity, items))
    assert out == items


def test_many_concurrent_large_messages(pool):
    data = [os.urandom((2 << 20) + i) for i in range(6)]
    rs = [pool.apply_async(helpers.identity, (d,)) for d in data]
    assert [r.get(timeout=T) for r in rs] == data


@pytest.mark.skipif(os.environ.get("CPOOL_TEST_HUGE") != "1",
                    reason="needs ~12 GiB of memory and a minute; CPOOL_TEST_HUGE=1")
def test_argument_and_result_over_4_gib(pool):
    n = (4 << 30) + 4096
    data = bytes(n)
    assert pool.apply(len, (data,)) == n
    del data
    out = pool.apply(bytes, (n,))
    assert len(out) == n
