"""The plain-data encoding of small messages (csrc/codec.c): exact round
trips of the types it covers, everything else through pickle, and no crash
on malformed input.  Also end to end through a pool, both directions."""
import collections
import copyreg
import datetime as dt
import enum
import gc
import math
import pickle
import pickletools
import random
import struct
import sys
import weakref

import pytest

import helpers
from cpool import _core

pytestmark = pytest.mark.cpool_only

MAGIC = 0xCB


class Color(enum.IntEnum):
    RED = 1


class MyInt(int):
    pass


class MyStr(str):
    pass


class MyTuple(tuple):
    pass


class MyList(list):
    pass


class MyDict(dict):
    pass


Point = collections.namedtuple("Point", "x y")

PLAIN = [
    None, True, False,
    0, 1, -1, 255, 256, -5, 2**31 - 1, -2**31, 2**31, -2**31 - 1,
    2**63 - 1, -2**63, 2**63, -2**63 - 1, 2**64, 2**100, -2**100, 10**300, -(10**300),
    0.0, -0.0, 1.5, -2.25, 1e300, float("inf"), float("-inf"),
    "", "a", "hello world", "é", "日本語", "emoji \U0001f600", "\x00nul", "\u0100" * 50,
    b"", b"\x00\xff", bytes(range(256)),
    (), [], {}, (1,), [1], {"a": 1},
    ((1, 2), [3, (4, [5])], {"k": (6, 7)}),
    {1: "int key", "s": None, (1, 2): "tuple key", 2.5: b"float key", None: True},
    [[1, 2], [3, 4], [], [[]]],
    ((5,), {}), ((1, "a", 2.0), {"kw": [1, 2]}),
    list(range(1000)), tuple("abc" * 100),
    set(), {1, 2}, frozenset(), frozenset({"a", (1, 2), None}),
    {None, 1.5, "x", b"y", (1, "a"), 2**70, frozenset({3})},
    [{1}, frozenset([frozenset([1]), 2]), {"k": {4, 5}}],
    set(range(500)),
]


def _same(a, b):
    """Equal, with the exact same types all the way down."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(k1, k2) and _same(a[k1], b[k2])
                                          for k1, k2 in zip(a, b))
    if isinstance(a, (set, frozenset)):
        return len(a) == len(b) and all(any(_same(x, y) for y in b) for x in a)
    return a == b


@pytest.mark.parametrize("obj", PLAIN, ids=range(len(PLAIN)))
def test_plain_values_round_trip_with_exact_types(obj):
    data = _core.encode_plain(obj)
    assert isinstance(data, bytes) and data[0] == MAGIC
    assert _same(_core.loads(data), obj)


@pytest.mark.parametrize("obj", PLAIN, ids=range(len(PLAIN)))
def test_plain_values_as_pickles_without_memo(obj):
    data = _core.pickle_plain(obj)
    assert isinstance(data, bytes) and data[:2] == b"\x80\x05" and data[-1:] == b"."
    assert _same(pickle.loads(data), obj)
    assert _same(_core.loads(data), obj)
    # no memo: the unpickler is told to keep nothing
    assert not any(op.name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT")
                   for op, _, _ in pickletools.genops(data))


def test_pickle_writer_boundaries():
    ints = [0, 255, 256, 65535, 65536, -1, -256, 2**31 - 1, -2**31, 2**31, 2**63 - 1,
            -2**63, 2**63, -2**63 - 1, 2**2050, -2**2050, 2**2047]
    ints += [s * 2**k + d for k in range(31, 64) for s in (1, -1) for d in (-1, 0, 1)]
    seqs = [tuple(range(n)) for n in range(6)] + [list(range(n)) for n in range(3)]
    strs = ["x" * n for n in (0, 255, 256, 70000)] + ["é" * 200]
    blobs = [b"y" * n for n in (0, 255, 256, 70000)]
    for obj in ints + seqs + strs + blobs + [{}, {1: 2}, {i: str(i) for i in range(600)}]:
        assert _same(pickle.loads(_core.pickle_plain(obj)), obj), obj
    for obj in NOT_PLAIN:
        assert _core.pickle_plain(obj) is None
    inner = [1]
    assert _core.pickle_plain([inner, inner]) is None


def test_nan_round_trips():
    got = _core.loads(_core.encode_plain([float("nan")]))
    assert type(got[0]) is float and math.isnan(got[0])


def test_dict_order_is_kept():
    d = {k: k for k in ("z", "a", "m", 3, 1)}
    assert list(_core.loads(_core.encode_plain(d))) == list(d)


NOT_PLAIN = [
    helpers.ByName.A, MyInt(3), MyStr("x"), MyTuple((1,)), MyList([1]), MyDict(a=1),
    collections.OrderedDict(a=1), bytearray(b"x"), 1j,
    range(3), object, helpers.square, ValueError("x"),
    [1, helpers.ByName.A], ({"a": MyInt(1)},), "\udc80",   # a lone surrogate
]


@pytest.mark.parametrize("obj", NOT_PLAIN, ids=range(len(NOT_PLAIN)))
def test_other_types_are_refused(obj):
    assert _core.encode_plain(obj) is None


def _via_pickle(obj):
    return pickle.loads(pickle.dumps(obj, 5))


def _same_deep(got, want):
    """Equal, of the same types, with the same instance dicts, all the way
    down (dataclasses and Plain compare their fields; this also compares
    types, and the dicts of classes that do not compare), and for times the
    same fold and, if None or UTC, the very same tzinfo."""
    assert type(got) is type(want)
    if isinstance(want, (list, tuple)):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            _same_deep(g, w)
    elif isinstance(want, dict):
        assert list(got) == list(want)
        for k in want:
            _same_deep(got[k], want[k])
    elif isinstance(want, (dt.datetime, dt.time)):
        assert got == want and got.fold == want.fold
        if want.tzinfo is None or want.tzinfo is UTC:
            assert got.tzinfo is want.tzinfo
        else:       # pickled: a copy
            assert type(got.tzinfo) is type(want.tzinfo)
    elif hasattr(want, "__dict__"):
        _same_deep(vars(got), vars(want))
    else:
        assert got == want


OBJECTS = [Point(1, 2), Point("a", [Point(3, 4.5)])] + helpers.make_objects(7) + [
    {"rows": [helpers.Rec("x", 1.0, []), helpers.Rec("y", 2.0, [None])]},
    helpers.Pair((), {}),
]


@pytest.mark.parametrize("obj", OBJECTS, ids=range(len(OBJECTS)))
def test_objects_are_rebuilt_as_pickle_rebuilds_them(obj):
    data = _core.encode_plain(obj)
    assert data is not None and data[0] == MAGIC
    _same_deep(_core.loads(data), _via_pickle(obj))


def test_what_the_classes_own_code_does_on_loading_happens_as_with_pickle():
    # TenfoldPair.__new__ runs on loading, with the fields it was sent
    sent = helpers.TenfoldPair(1, 2)
    assert sent == (1, 20)
    assert _core.loads(_core.encode_plain(sent)) == (1, 200) == _via_pickle(sent)
    # __setstate__ runs, with the instance's dict; not for an empty one
    got = _core.loads(_core.encode_plain(helpers.Restored(v=1)))
    assert vars(got) == {"v": 1, "restored": True}
    assert vars(_core.loads(_core.encode_plain(helpers.Restored()))) == {}
    # a frozen dataclass is rebuilt without its __setattr__
    assert _core.loads(_core.encode_plain(helpers.FrozenRec(1))) == helpers.FrozenRec(1)


def test_rebuilt_instances_have_interned_keys():
    # As pickle's BUILD before 3.13.  From 3.13 C interning makes a string
    # immortal, so the keys are left as decoded: not interned at all.
    got = _core.loads(_core.encode_plain([helpers.Plain(**{"k%d" % i: i}) for i in range(3)]))
    for o in got:
        for k in vars(o):
            if sys.version_info < (3, 13):
                assert k is sys.intern(k)
            else:
                assert not sys._is_interned(k)


def test_many_instances_share_their_class_and_keys():
    rows = [helpers.Rec("n", i, []) for i in range(1000)]
    data = _core.encode_plain(rows)
    # the class is named once, then referred to by index
    assert data.count(b"helpers") == 1 and data.count(b"Rec") == 1
    got = _core.loads(data)
    assert got == rows
    assert len({id(k) for r in got for k in vars(r)}) == 3


def _local_class():
    class Local(helpers.Plain):
        pass
    return Local(a=1)


REFUSED_OBJECTS = [
    helpers.Slotted(), helpers.Reduced(a=1), helpers.WithGetstate(a=1),
    helpers.Lazy(a=1), helpers.InCopyreg(a=1), helpers.WithNew(a=1),
    helpers.Outer.Inner(a=1), helpers.ErrorRecord("x"), _local_class(),
    helpers.Plain(__reduce_ex__=1), [helpers.Plain(a=1), helpers.Slotted()],
]


@pytest.mark.parametrize("obj", REFUSED_OBJECTS, ids=range(len(REFUSED_OBJECTS)))
def test_objects_pickle_treats_otherwise_are_refused(obj):
    assert _core.encode_plain(obj) is None


def test_refused_objects_go_through_pickle_in_a_pool(cpool_Pool):
    with cpool_Pool(2) as p:
        got = p.apply(helpers.identity, (helpers.Reduced(a=1),))
        assert vars(got) == {"via": "reduce"}
        got = p.apply(helpers.identity, (helpers.WithGetstate(a=1),))
        assert vars(got) == {"via": "getstate"}
        got = p.apply(helpers.identity, (helpers.InCopyreg(a=1),))
        assert vars(got) == {"via": "copyreg"}
        assert p.apply(helpers.identity, (helpers.Slotted(5),)) == helpers.Slotted(5)
        with pytest.raises(Exception) as ei:
            p.apply(helpers.identity, (_local_class(),))
        assert "Local" in str(ei.value)


def test_a_class_registered_with_forking_pickler_is_refused():
    from multiprocessing.reduction import ForkingPickler
    obj = helpers.Plain(a=1)
    assert _core.encode_plain(obj) is not None
    ForkingPickler.register(helpers.Plain, lambda o: (helpers.Plain, ()))
    try:
        assert _core.encode_plain(obj) is None
    finally:
        del ForkingPickler._extra_reducers[helpers.Plain]
    assert _core.encode_plain(obj) is not None


def test_an_instance_met_twice_or_in_itself_is_refused():
    a = helpers.Plain(x=1)
    assert _core.encode_plain([a, a]) is None
    assert _core.encode_plain([helpers.Pair(1, 2)] * 2) is None
    got = _via_pickle([a, a])
    assert got[0] is got[1]
    a.me = a
    assert _core.encode_plain(a) is None
    # two instances given one dict: its list is one list for pickle
    b, c = helpers.Plain(), helpers.Plain(items=[1])
    b.__dict__ = c.__dict__
    assert _core.encode_plain([b, c]) is None
    got = _via_pickle([b, c])
    assert got[0].items is got[1].items


def test_a_class_not_found_on_loading_fails_as_with_pickle(monkeypatch):
    data = _core.encode_plain(helpers.Plain(a=1))
    monkeypatch.delattr(helpers, "Plain")
    with pytest.raises(AttributeError):
        _core.loads(data)
    with pytest.raises(AttributeError):
        _core.loads(data)
    monkeypatch.setattr(helpers, "Plain", 5, raising=False)
    with pytest.raises(TypeError, match="not a class"):
        _core.loads(data)


def test_objects_through_a_pool_both_ways(cpool_Pool):
    with cpool_Pool(2) as p:
        for i in range(3):
            # as multiprocessing delivers them: a pickle's round trip
            # (TenfoldPair's __new__ runs once more on each)
            want = helpers.make_objects(i)
            _same_deep(p.apply(helpers.make_objects, (i,)), _via_pickle(want))
            _same_deep(p.apply(helpers.identity, (want,)),
                       _via_pickle(_via_pickle(want)))
        got = p.map(helpers.make_objects, range(500))
        for i in range(0, 500, 97):
            _same_deep(got[i], _via_pickle(helpers.make_objects(i)))
        rows = [helpers.Rec("r", i, [i]) for i in range(2000)]
        assert p.map(helpers.identity, rows) == rows
        assert list(p.imap(helpers.identity, rows[:50])) == rows[:50]


class OwnMeta(type(enum.Enum)):
    pass


class Metered(enum.Enum, metaclass=OwnMeta):
    ONE = 1


class Registered(enum.Enum):
    ONE = 1


ENUMS = [helpers.Color.RED, helpers.Color.GREEN, helpers.Color.TUPLE,
         helpers.Level.HIGH, helpers.Perm.R | helpers.Perm.W, helpers.Perm(0),
         Color.RED]


def test_enum_members_arrive_as_themselves():
    for member in ENUMS:
        data = _core.encode_plain(member)
        assert data is not None and data[0] == MAGIC, member
        assert _core.loads(data) is member
        assert _via_pickle(member) is member
    many = [helpers.Color.RED] * 3 + [{"lvl": helpers.Level.LOW}, (helpers.Perm.X,)]
    data = _core.encode_plain(many)
    assert data.count(b"Color") == 1          # the class named once
    got = _core.loads(data)
    assert got == many and all(g is m for g, m in zip(got[:3], many[:3]))
    assert got[3]["lvl"] is helpers.Level.LOW and got[4][0] is helpers.Perm.X


def test_enums_pickle_treats_otherwise_are_refused():
    from multiprocessing.reduction import ForkingPickler
    assert _core.encode_plain(helpers.ByName.A) is None     # own __reduce_ex__
    assert _core.encode_plain(Metered.ONE) is None          # own metaclass
    assert _core.encode_plain(Registered.ONE) is not None
    copyreg.pickle(Registered, lambda m: (str, ("x",)))
    try:
        assert _core.encode_plain([Registered.ONE]) is None
    finally:
        del copyreg.dispatch_table[Registered]
    ForkingPickler.register(Registered, lambda m: (str, ("x",)))
    try:
        assert _core.encode_plain([Registered.ONE]) is None
    finally:
        del ForkingPickler._extra_reducers[Registered]
    assert _core.encode_plain([Registered.ONE]) is not None


def test_malformed_enum_messages_raise():
    data = _core.encode_plain(helpers.Level.HIGH)
    assert data.endswith(b"j\x02\x00\x00\x00N")
    with pytest.raises(ValueError):             # as pickle: no such member
        _core.loads(data[:-6] + b"j\x07\x00\x00\x00N")
    with pytest.raises(RuntimeError):           # a state: not for a member
        _core.loads(data[:-1] + b"D\x00\x00\x00\x00")
    with pytest.raises(RuntimeError):           # two arguments
        _core.loads(data[:-10] + b"\x02\x00\x00\x00j\x02\x00\x00\x00NN")
    _cut_damage_and_load([_core.encode_plain(m) for m in ENUMS],
                         random.Random(5))


def test_enums_through_a_pool(cpool_Pool):
    with cpool_Pool(2) as p:
        got = p.map(helpers.identity, ENUMS * 200)
        assert all(g is m for g, m in zip(got, ENUMS * 200))
        assert p.apply(helpers.identity, (helpers.ByName.A,)) is helpers.ByName.A


UTC = dt.timezone.utc
T0 = dt.datetime(2026, 11, 28, 4, 30, 15, 123456)

DATES = [
    dt.date(2026, 11, 28), dt.date(1, 1, 1), dt.date(9999, 12, 31),
    dt.time(), dt.time(23, 59, 59, 999999), dt.time(1, 2, 3, 4, tzinfo=UTC),
    dt.time(1, 2, fold=1), T0, dt.datetime.min, dt.datetime.max,
    T0.replace(tzinfo=UTC), T0.replace(fold=1), T0.replace(tzinfo=UTC, fold=1),
    dt.timedelta(0), dt.timedelta(microseconds=-1), dt.timedelta.min,
    dt.timedelta.max, dt.timedelta(days=3, seconds=7, microseconds=9),
    [T0, T0, {"when": T0, "span": dt.timedelta(hours=1)}],
    helpers.Rec("r", 1.0, [T0.date(), T0.time()]),
    {dt.date(2020, 2, 29): {T0, T0 + dt.timedelta(1)}},
]


@pytest.mark.parametrize("obj", DATES, ids=range(len(DATES)))
def test_dates_and_times_are_rebuilt_as_pickle_rebuilds_them(obj):
    data = _core.encode_plain(obj)
    assert data is not None and data[0] == MAGIC
    _same_deep(_core.loads(data), obj)
    _same_deep(_core.loads(data), _via_pickle(obj))
    # written out, not pickled: no class names in the message
    assert b"datetime" not in data


class MyDatetime(dt.datetime):
    pass


class Paris(dt.tzinfo):
    def utcoffset(self, when):
        return dt.timedelta(hours=1)


REFUSED_DATES = [
    T0.replace(tzinfo=dt.timezone(dt.timedelta(hours=1))),
    T0.replace(tzinfo=dt.timezone(dt.timedelta(0), "Z")),
    T0.replace(tzinfo=Paris()), dt.time(tzinfo=Paris()),
    MyDatetime(2026, 1, 1), [T0, MyDatetime(2026, 1, 1)],
    UTC,                                # a tzinfo on its own
]


@pytest.mark.parametrize("obj", REFUSED_DATES, ids=range(len(REFUSED_DATES)))
def test_other_tzinfos_and_subclasses_go_through_pickle(obj):
    assert _core.encode_plain(obj) is None


def test_no_pickle_writer_for_dates():
    assert _core.pickle_plain(T0) is None
    assert _core.pickle_plain([1, dt.timedelta(1)]) is None


@pytest.mark.parametrize("kind, value", [
    (dt.date, dt.date(2026, 1, 2)), (dt.timedelta, dt.timedelta(5)),
    (dt.datetime, T0), (dt.time, dt.time(3)),
    (dt.timezone, T0.replace(tzinfo=UTC))])
def test_a_date_type_with_a_reducer_goes_through_pickle(kind, value):
    """pickle consults its dispatch table for these types (not for ints or
    lists): a reducer in copyreg's or ForkingPickler's makes the message a
    pickle, which then applies it."""
    from multiprocessing.reduction import ForkingPickler
    assert _core.encode_plain([value]) is not None
    copyreg.pickle(kind, lambda o: (str, ("reduced",)))
    try:
        assert _core.encode_plain([value]) is None
        assert b"reduced" in pickle.dumps(value)      # pickle applies it
    finally:
        del copyreg.dispatch_table[kind]
    assert _core.encode_plain([value]) is not None
    ForkingPickler.register(kind, lambda o: (str, ("reduced",)))
    try:
        assert _core.encode_plain([value]) is None
    finally:
        del ForkingPickler._extra_reducers[kind]
    assert _core.encode_plain([value]) is not None


def test_malformed_dates_and_sets_raise():
    rng = random.Random(11)
    _cut_damage_and_load([_core.encode_plain(o) for o in DATES], rng)
    date = _core.encode_plain(dt.date(2026, 1, 31))
    stamp = _core.encode_plain(T0)
    clock = _core.encode_plain(dt.time(1))
    bad = [
        date[:4] + b"\x0d" + date[5:],               # month 13
        date[:5] + b"\x20",                          # day 32
        date[:2] + b"\x00\x00" + date[4:],            # year 0
        stamp[:6] + b"\x18" + stamp[7:],             # hour 24
        stamp[:9] + b"\x04" + stamp[10:],            # an unknown flag
        stamp[:10] + struct.pack("<I", 10**6),       # microsecond 10**6
        clock[:5] + b"\x07" + clock[6:],
        clock[:6] + struct.pack("<I", 2**32 - 1),
        bytes([MAGIC]) + b"Q" + struct.pack("<iii", 10**9, 0, 0),   # days
        bytes([MAGIC]) + b"S" + struct.pack("<I", 0xFFFFFFFF),
        bytes([MAGIC]) + b"R\x02\x00\x00\x00N",      # one item of two
    ]
    for data in bad:
        with pytest.raises(RuntimeError):
            _core.loads(data)
    with pytest.raises(TypeError):                   # an unhashable item
        _core.loads(bytes([MAGIC]) + b"S\x01\x00\x00\x00l\x00\x00\x00\x00")


def test_dates_decode_where_datetime_was_never_imported():
    import subprocess
    data = _core.encode_plain([T0.replace(tzinfo=UTC), dt.timedelta(2)])
    code = ("import sys, cpool._core as c; assert 'datetime' not in sys.modules; "
            "v = c.loads(%r); print(repr(v), v[0].tzinfo is sys.modules['datetime'].timezone.utc)"
            % data)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [
        "[datetime.datetime(2026,", "11,", "28,", "4,", "30,", "15,", "123456,",
        "tzinfo=datetime.timezone.utc),", "datetime.timedelta(days=2)]", "True"]


def test_dates_and_sets_through_a_pool_both_ways(cpool_Pool):
    with cpool_Pool(2) as p:
        for obj in DATES + REFUSED_DATES[:-1]:
            _same_deep(p.apply(helpers.identity, (obj,)), _via_pickle(obj))
        rows = [helpers.Rec("r", i, [T0 + dt.timedelta(seconds=i), {i, -i}])
                for i in range(3000)]
        assert p.map(helpers.identity, rows) == rows
        got = p.map(helpers.identity, [frozenset({i, str(i)}) for i in range(100)])
        assert got == [frozenset({i, str(i)}) for i in range(100)]
        assert all(type(x) is frozenset for x in got)


def test_no_reference_is_left_on_a_class():
    # a leaked reference to a class (or to its __new__) would not show as a
    # new object: count the references themselves
    objs = helpers.make_objects(1) + [helpers.Plain(bad=helpers.Slotted())]
    keep = [type(o) for o in objs] + [helpers.Pair.__new__, helpers.TenfoldPair.__new__]
    data = _core.encode_plain(objs[:-1])
    broken = _core.encode_plain(helpers.Restored(v=1)).replace(b"Restored", b"Nothere")
    for _ in range(10):
        _core.loads(data)
    before = [sys.getrefcount(c) for c in keep]
    for _ in range(1000):
        _core.loads(_core.encode_plain(objs[:-1]))
        assert _core.encode_plain(objs) is None
        with pytest.raises(AttributeError):
            _core.loads(broken)
    gc.collect()
    assert [sys.getrefcount(c) for c in keep] == before


def test_pickles_still_load():
    for obj in PLAIN + [Color.RED, Point(1, 2), MyList([1, 2])]:
        got = _core.loads(pickle.dumps(obj, 5))
        assert got == obj and type(got) is type(obj)


def test_shared_references_are_refused():
    inner = [1, 2]
    assert _core.encode_plain([inner, inner]) is None
    t = ([],)
    assert _core.encode_plain((t, t)) is None
    d = {}
    assert _core.encode_plain({"a": d, "b": d}) is None
    # Pickle keeps the sharing; so does the pool, through pickle.
    got = pickle.loads(pickle.dumps([inner, inner], 5))
    assert got[0] is got[1]


def test_many_distinct_shared_containers_are_fine():
    rows = [(i, i + 1) for i in range(5000)]       # each also held by `rows`
    data = _core.encode_plain(rows[:])
    assert data is not None and _core.loads(data) == rows


def test_recursive_and_too_deep_are_refused():
    a = []
    a.append(a)
    assert _core.encode_plain(a) is None
    deep = x = []
    for _ in range(100):
        x.append([])
        x = x[0]
    assert _core.encode_plain(deep) is None
    ok = x = []
    for _ in range(10):
        x.append([])
        x = x[0]
    assert _core.loads(_core.encode_plain(ok)) == ok


def test_size_limit():
    assert _core.encode_plain(b"x" * 100, 50) is None
    assert _core.encode_plain(list(range(100)), 50) is None
    assert _core.encode_plain(b"x" * 100, 200) is not None
    assert _core.encode_plain(2**8000, 100) is None


def _damage_and_load(good, rng, errors, rounds=3000):
    """Change 1-3 random bytes of messages from `good` and load them: each
    loads or raises one of `errors`, and nothing crashes."""
    for _ in range(rounds):
        data = bytearray(rng.choice(good))
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(len(data))] = rng.getrandbits(8)
        data[0] = MAGIC
        try:
            _core.loads(bytes(data))
        except errors:
            pass


def _cut_damage_and_load(good, rng):
    """Every truncation of each message in `good` is malformed; damaged
    ones load or fail as a message naming classes may."""
    for data in good:
        for cut in range(1, len(data)):
            with pytest.raises(RuntimeError):
                _core.loads(data[:cut])
    _damage_and_load(good, rng, (RuntimeError, UnicodeDecodeError, TypeError,
                                 ImportError, AttributeError, ValueError))


def test_malformed_input_raises_and_never_crashes():
    good = [_core.encode_plain(o) for o in PLAIN]
    rng = random.Random(7)
    for data in good:
        for cut in range(1, min(len(data), 40)):
            with pytest.raises(RuntimeError):
                _core.loads(data[:cut])
        with pytest.raises(RuntimeError):
            _core.loads(data + b"N")           # trailing bytes
    _damage_and_load(good, rng, (RuntimeError, UnicodeDecodeError, TypeError))
    # objects: a damaged class name fails to import or to be found
    _cut_damage_and_load([_core.encode_plain(o) for o in OBJECTS], rng)
    for head in (b"k\x00", b"k\x05", b"K" + b"s\x01\x00\x00\x00x" * 2):
        with pytest.raises((RuntimeError, ImportError)):
            _core.loads(bytes([MAGIC]) + head + b"\x00\x00\x00\x00N")
    # huge counts and lengths
    for tag in b"tlDsbI":
        with pytest.raises(RuntimeError):
            _core.loads(bytes([MAGIC, tag]) + struct.pack("<I", 0xFFFFFFFF))
    with pytest.raises(RuntimeError):
        _core.loads(bytes([MAGIC, ord("I")]) + struct.pack("<I", 0))
    with pytest.raises(RuntimeError):
        _core.loads(bytes([MAGIC]) + b"l\x01\x00\x00\x00" * 200 + b"N")   # too deep
    with pytest.raises(TypeError):
        _core.loads(bytes([MAGIC]) + b"D\x01\x00\x00\x00l\x00\x00\x00\x00N")  # unhashable key


def test_large_plain_messages_through_a_pool(cpool_Pool):
    """Plain data too large for one ring record: the plain encoding in
    fragments, gathered and decoded (or pickle, where sharing must be kept)."""
    pairs = [(i, -i, float(i), str(i)) for i in range(60000)]
    with cpool_Pool(2) as p:
        assert p.starmap(helpers.echo_args, pairs, chunksize=30000) == [(t, {}) for t in pairs]
        got = p.map(helpers.identity, pairs, chunksize=40000)
        assert all(_same(a, b) for a, b in zip(got, pairs))
        big = [2**70 + i for i in range(100000)]
        assert p.apply(helpers.identity, (big,)) == big
        mixed = ["é" * 70000, [None, True, False] * 30000, {"k": [1.5] * 50000},
                 b"\x00" * 100000, -(2**200)]
        got = p.apply(helpers.identity, (mixed,))
        assert got == mixed and [type(x) for x in got] == [type(x) for x in mixed]
        s = "x" * 200_000               # one long string many times: once on the
        got = p.apply(helpers.identity, ([s] * 1000,))    # wire, as with pickle
        assert got == [s] * 1000 and len({id(x) for x in got}) == 1
        shared = [[1, 2]] * 100000     # one list many times: pickle keeps it shared
        got = p.apply(helpers.identity, (shared,))
        assert got == shared and got[0] is got[1]


def test_through_a_pool_both_ways(cpool_Pool):
    values = PLAIN + NOT_PLAIN[:8] + [[Color.RED, 1], {"p": Point(1, 2)}]
    with cpool_Pool(2) as p:
        for v in values:
            got = p.apply(helpers.identity, (v,))
            assert _same(got, v) or (got == v and type(got) is type(v)), v
            assert p.apply_async(helpers.identity, (v,)).get(helpers.START_TIMEOUT) == v
        got = p.map(helpers.identity, values, chunksize=3)
        assert all(type(a) is type(b) and a == b for a, b in zip(got, values))
        got = list(p.imap(helpers.identity, values))
        assert all(type(a) is type(b) and a == b for a, b in zip(got, values))
        inner = [1]
        a, b = p.apply(helpers.identity, ([inner, inner],))
        assert a is b
        assert p.apply(helpers.echo_args, (1, "é"), {"k": [2.5, None]}) == ((1, "é"), {"k": [2.5, None]})


def test_repeated_short_strings_decode_to_one_object():
    """A list of records repeats its keys in every record: the receiver gets
    one object per key, as pickle's memo gives it, not one per record."""
    recs = [{"name": "item", "value": i, "kind": "a" if i % 2 else "b"} for i in range(500)]
    got = _core.loads(_core.encode_plain(recs))
    assert got == recs
    assert len({id(k) for r in got for k in r}) == 3
    assert len({id(r["kind"]) for r in got}) == 2
    # up to 63 characters, any of them, and bytes too (longer ones met
    # twice go through pickle, whose memo keeps them shared)
    for key in ["k" * 40, "ключ", "€" * 63, b"k" * 40, b"\xff\x00"]:
        got = _core.loads(_core.encode_plain([{key: i} for i in range(100)] + [key] * 100))
        assert all(type(k) is type(key) and k == key for r in got[:100] for k in r)
        assert len({id(k) for r in got[:100] for k in r} | {id(x) for x in got[100:]}) == 1
    # the same bytes as a str and as bytes stay apart
    got = _core.loads(_core.encode_plain(["abc", b"abc"] * 3))
    assert [type(x) for x in got] == [str, bytes] * 3 and got == ["abc", b"abc"] * 3
    # strings that collide in the decoder's cache and ones too long to be
    # cached all come back equal and of the same type
    rng = random.Random(3)
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789é€\x00\x7f"
    words = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 64)))
             for _ in range(3000)]
    words += [w.encode()[:63] for w in words[:1000]]
    value = [rng.choice(words) for _ in range(20000)]
    value += ["".join(rng.choice(alphabet) for _ in range(rng.randrange(64, 200)))
              for _ in range(300)]
    got = _core.loads(_core.encode_plain(value))
    assert _same(got, value)
    # records whose values are all distinct still share their keys; a
    # message of mostly distinct strings is decoded without the cache
    recs = [{"a": "x%d" % i, "b": "y%d" % i, "c": "z%d" % i} for i in range(2000)]
    got = _core.loads(_core.encode_plain(recs))
    assert got == recs and len({id(k) for r in got for k in r}) == 3
    value = ["w%d" % i for i in range(2000)] + ["k" * 10 for _ in range(100)]
    assert _same(_core.loads(_core.encode_plain(value)), value)
    # a cached string is not kept alive by the decoder
    s = "abc" + str(rng.random())
    got = _core.loads(_core.encode_plain([s, s]))
    refs = sys.getrefcount(got[0])          # the list's two and the call's
    assert got[0] is got[1] and refs == 3


def test_records_through_a_pool_share_their_keys(cpool_Pool):
    with cpool_Pool(2) as p:
        got = p.apply(helpers.records, (2000,))
        assert got == helpers.records(2000)
        assert len({id(k) for r in got for k in r}) == 3
        got = p.map(helpers.records, [3000] * 4)
        assert all(g == helpers.records(3000) for g in got)


def test_decoded_tuples_of_atomic_items_are_untracked():
    """The decoder leaves the collector nothing to do for tuples that can be
    in no cycle, and keeps tracking every other container, as CPython's own
    rule has it (a dict or list may gain references later; a tuple not)."""
    value = [(1, "a", 2.5, None, b"x", True, 2**80), ((1, 2), (3,)), (1, [2]),
             ({},), ({"a": [1]},), ((1, []),), [1, 2], {"k": (4, 5)}]
    got = _core.loads(_core.encode_plain(value))
    assert got == value
    assert not gc.is_tracked(got[0])
    assert not gc.is_tracked(got[1]) and not gc.is_tracked(got[1][0])
    assert gc.is_tracked(got[2])          # holds a list
    assert gc.is_tracked(got[3])          # an empty dict, which may fill up
    assert gc.is_tracked(got[4])
    assert gc.is_tracked(got[5]) and gc.is_tracked(got[5][0])
    assert gc.is_tracked(got[6])          # lists always are
    assert not gc.is_tracked(got[7]["k"])
    # The dict filled later closes a cycle through its tuple, which the
    # collector must still see (it would leak were the tuple untracked).
    obj = MyList()
    alive = weakref.ref(obj)
    t = got[3]
    t[0]["obj"] = obj
    t[0]["self"] = t
    del got, t, obj
    gc.collect()
    assert alive() is None


@pytest.mark.parametrize("kind", [list, tuple])
def test_chunks_of_a_list_or_tuple_are_sent_as_multiprocessing_sends_them(
        cpool_Pool, kind):
    """map/starmap chunks of a list or tuple are encoded straight from it
    (csrc/core.c, make_slice_task): the same items, the same sharing within
    a chunk as pickle's, and anything that is not plain data through
    pickle."""
    shared = [5]
    pairs = kind([(i, -i) for i in range(3000)] + [(shared, 1), (shared, 2)])
    lists = kind([[] for _ in range(10)] + [shared, shared])
    with cpool_Pool(2) as p:
        assert p.starmap(helpers.mul, pairs[:3000], chunksize=700) == \
            [i * -i for i in range(3000)]
        # one list twice in a chunk arrives as one list, mutated twice
        assert p.map(helpers.append_one, lists, chunksize=12) == [1] * 10 + [2, 3]
        assert p.starmap(helpers.append_one, pairs[3000:], chunksize=2) == [2, 3]
        # split across chunks: each chunk has its own copy, as with pickle
        assert p.map(helpers.append_one, lists, chunksize=11) == [1] * 10 + [2, 2]
        odd = kind([Point(1, 2), helpers.Multiplier(3), 2.5, "s"])  # not plain
        got = p.map(helpers.identity, odd, chunksize=3)
        assert [type(x) for x in got] == [type(x) for x in odd]
        assert got[0] == odd[0] and got[2:] == list(odd[2:])
        big = kind([b"\x01" * (2 << 20), b"\x02" * 10])    # out of band
        assert p.map(len, big, chunksize=2) == [2 << 20, 10]
        with pytest.raises(RuntimeError, match="cannot pickle Unpicklable"):
            p.map(helpers.identity, kind([1, helpers.Unpicklable()]), chunksize=2)
        # the last chunk is short; an empty input sends nothing
        assert p.map(helpers.square, kind(range(7)), chunksize=3) == \
            [i * i for i in range(7)]
        assert p.map(helpers.square, kind()) == []


def test_a_list_subclass_is_iterated_as_multiprocessing_iterates_it(cpool_Pool):
    class Backwards(list):
        def __iter__(self):
            return reversed(self)

    with cpool_Pool(2) as p:
        assert p.map(helpers.square, Backwards([1, 2, 3]), chunksize=2) == [9, 4, 1]
