"""numpy arrays through the pool, against multiprocessing.Pool: what arrives
(writable or not, layout, values) and who sees a change made to it.

Sizes cover each way an array travels in cpool: in the pickle (small),
out of band through the ring (256 KiB up) and through the shared arena
(1 MiB up)."""
import pickle

import pytest

np = pytest.importorskip("numpy")

T = 60

# float64 elements: 0 and 8 in band; 20_000 (160 KiB) in band but a large
# message; 60_000 (480 KiB) out of band, gathered; 400_000 (3.2 MB) arena.
SIZES = [0, 8, 20_000, 60_000, 400_000]


def read_only(n, order="C"):
    a = np.arange(n, dtype=np.float64)
    if order == "F":
        a = np.asfortranarray(a.reshape(-1, 2) if n else a.reshape(0, 2))
    a.flags.writeable = False
    return a


def layout(a):
    return (a.dtype.str, a.shape, a.flags.c_contiguous, a.flags.f_contiguous,
            a.flags.writeable)


def bump(a):
    """Write to the array the task was given; report what it was."""
    before = layout(a)
    a -= 1
    return before, float(a.sum())


_kept = {}


def kept_read_only(n):
    """The same read-only array every time, held by the worker."""
    if n not in _kept:
        _kept[n] = read_only(n)
    return _kept[n]


def from_bytes(n):
    return np.frombuffer(bytes(8 * n), dtype=np.float64)


def broadcast(n):
    return np.broadcast_to(np.arange(4.0), (n, 4))


@pytest.fixture
def pool(Pool):
    p = Pool(2)
    yield p
    p.terminate()
    p.join()


@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("n", SIZES)
def test_a_read_only_argument_arrives_writable(pool, n, order):
    # multiprocessing (protocol 4 before Python 3.14) rebuilds every array
    # as a new writable one; cpool's protocol 5 would keep the flag.
    a = read_only(n, order)
    before, total = pool.apply(bump, (a,))
    assert before == layout(a)[:4] + (True,)
    assert total == float(a.sum()) - n
    assert (a == np.arange(n).reshape(a.shape)).all()  # unchanged


@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("n", SIZES)
def test_a_read_only_result_arrives_writable(pool, n, order):
    out = pool.apply(read_only, (n, order))
    assert layout(out) == layout(read_only(n, order))[:4] + (True,)
    out -= 1
    assert (out == np.arange(n).reshape(out.shape) - 1).all()


@pytest.mark.parametrize("n", [8, 400_000])
def test_a_result_the_worker_keeps_is_the_parents_own(pool, n):
    # The parent writes to what it got; the worker's array is untouched, so
    # the next result is the original again (each worker keeps its own).
    for _ in range(4):
        out = pool.apply(kept_read_only, (n,))
        assert out.flags.writeable
        assert (out == np.arange(n)).all()
        out[:] = -1.0


@pytest.mark.parametrize("n", [8, 60_000, 400_000])
def test_arrays_over_other_read_only_memory(pool, n):
    a = pool.apply(from_bytes, (n,))
    assert a.flags.writeable and a.shape == (n,) and not a.any()
    a += 2
    b = pool.apply(broadcast, (n,))
    # numpy pickles a broadcast (not contiguous) in band, as a copy
    assert b.flags.writeable and b.shape == (n, 4)
    assert (b == np.arange(4.0)).all()


def test_many_small_read_only_arrays_in_a_map(pool):
    arrays = [read_only(i % 7) for i in range(500)]
    out = pool.map(bump, arrays, chunksize=50)
    assert [b[0][-1] for b in out] == [True] * 500
    assert [b[1] for b in out] == [float(a.sum()) - a.size for a in arrays]
    back = list(pool.imap(read_only, [i % 7 for i in range(200)], chunksize=10))
    assert all(b.flags.writeable for b in back)


def test_read_only_arrays_keep_their_sharing(pool):
    a = read_only(60_000)
    x, y = pool.apply(_identity_pair, ((a, a),))
    assert x is y and x.flags.writeable
    x[0] = 5.0
    assert y[0] == 5.0


def _identity_pair(p):
    return p


class Named:
    """A pickled object whose data names numpy's _frombuffer without being an
    array: it goes the arrays' way and must arrive as it was."""
    def __init__(self):
        self.tag = "_frombuffer"
        self.arr = read_only(4)

    def __eq__(self, other):
        return (self.tag == other.tag and (self.arr == other.arr).all()
                and self.arr.flags.writeable == other.arr.flags.writeable)


def test_a_message_naming_frombuffer_otherwise(pool):
    from helpers import identity
    assert pool.apply(identity, ("_frombuffer",)) == "_frombuffer"
    out = pool.apply(identity, (Named(),))
    assert out.tag == "_frombuffer" and out.arr.flags.writeable
    # and what arrives can be pickled again, as an array of its own
    again = pickle.loads(pickle.dumps(out, protocol=5))
    assert (again.arr == out.arr).all()


def refilled_arrays(nbytes, n):
    buf = np.zeros(nbytes, dtype=np.uint8)
    for i in range(n):
        buf[:] = i
        yield buf


@pytest.mark.parametrize("nbytes", [1000, 300_000, 2 << 20])
def test_imap_of_a_generator_that_refills_one_array(pool, nbytes):
    from helpers import first_and_last
    got = list(pool.imap(first_and_last, refilled_arrays(nbytes, 30)))
    assert got == [(i, i) for i in range(30)]


def as_protocol_4(a):
    # what multiprocessing before 3.14 delivers: its pickle protocol is 4
    return pickle.loads(pickle.dumps(a, protocol=4))


def describe(a):
    return (type(a).__name__, a.dtype.str, a.dtype.descr, a.shape,
            a.flags.c_contiguous, a.flags.f_contiguous, a.flags.writeable,
            a.tobytes())


BYTE_ORDER_CASES = {
    "i4": lambda n: np.arange(n, dtype=">i4"),
    "f8": lambda n: np.linspace(0, 1, n, dtype=">f8"),
    "c16": lambda n: np.arange(n, dtype=">c16") * 1j,
    "U3": lambda n: np.array([str(i % 999) for i in range(n)], dtype=">U3"),
    "fortran": lambda n: np.asfortranarray(np.arange(2 * n, dtype=">i2").reshape(n, 2)),
    "struct": lambda n: np.zeros(n, dtype=[("a", ">i4"), ("b", "<f8")]),
    "native": lambda n: np.arange(n, dtype="<u2"),
}


@pytest.mark.parametrize("n", [3, 50_000, 300_000])
@pytest.mark.parametrize("kind", sorted(BYTE_ORDER_CASES))
def test_byte_order_as_multiprocessing_delivers_it(pool, kind, n):
    # Protocol 4 rebuilds an array of a plain dtype of the other byte order
    # (big-endian data, as FITS files hold it) in native order; structured
    # dtypes keep theirs.
    from helpers import identity
    a = BYTE_ORDER_CASES[kind](n)
    expected = describe(as_protocol_4(a))
    assert describe(pool.apply(identity, (a,))) == expected
    assert pool.apply(describe, (a,)) == expected


class FromBufferCall:
    """Pickles as a call of numpy's _frombuffer with a dtype given as a
    string or a scalar type, not a dtype object."""
    def __init__(self, dtype):
        self.dtype = dtype

    def __reduce__(self):
        from numpy._core.numeric import _frombuffer
        return _frombuffer, (bytes(16), self.dtype, (2,), "C")


@pytest.mark.skipif(not hasattr(np, "_core"), reason="numpy 1.x")
def test_numpys_frombuffer_called_and_passed_as_it_is(pool):
    from helpers import identity
    from numpy._core.numeric import _frombuffer
    for dtype in (">f8", np.dtype(">f8"), np.float64):
        out = pool.apply(identity, (FromBufferCall(dtype),))
        assert out.shape == (2,) and not out.any() and out.flags.writeable
    assert pool.apply(identity, (_frombuffer,)) is _frombuffer
