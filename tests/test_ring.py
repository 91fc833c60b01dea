"""The shared-memory ring on its own (cpool._core.Ring: the same C code as the
pool's rings, over private memory): records, wrap-around, a full ring,
messages larger than a ring, corrupt input, and wake-ups that come late."""
import random
import struct

import pytest

from cpool import _core

pytestmark = pytest.mark.cpool_only

CAP = 4096


def test_capacity_is_validated():
    for bad in (0, 1000, 4095, 6000, 1 << 40):
        with pytest.raises(ValueError):
            _core.Ring(bad)


def test_push_pop_in_order():
    r = _core.Ring(CAP)
    assert r.pop() is None
    for i in range(10):
        assert r.push(b"x" * i + bytes([i]))
    for i in range(10):
        kind, flags, total, payload = r.pop()
        assert kind == _core.K_TASK and flags == 0
        assert payload == b"x" * i + bytes([i]) and total == len(payload)
    assert r.pop() is None


def test_full_ring_refuses_then_accepts_after_pop():
    r = _core.Ring(CAP)
    n = 0
    while r.push(b"a" * 100):
        n += 1
    header = _core.REC_HEADER
    # Every record takes header + payload rounded up to 8 bytes.
    assert n == CAP // (header + 104)
    assert r.free < header + 104
    assert r.pop()[3] == b"a" * 100
    assert r.push(b"b" * 100)
    assert not r.push(b"c" * 100)


def test_wrap_around_with_padding_many_times():
    r = _core.Ring(CAP)
    rng = random.Random(1)
    sent = []
    got = []
    for _ in range(5000):
        if rng.random() < 0.55:
            data = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, r.max_frag + 1, 7)))
            if r.push(data):
                sent.append(data)
        else:
            rec = r.pop()
            if rec is not None:
                got.append(rec[3])
    while (rec := r.pop()) is not None:
        got.append(rec[3])
    assert got == sent
    head, tail = r.positions
    assert head == tail and tail > 10 * CAP   # it really wrapped, many times


def test_record_larger_than_max_frag_is_rejected():
    r = _core.Ring(CAP)
    with pytest.raises(ValueError):
        r.push(b"x" * (r.max_frag + 1))
    assert r.push(b"x" * r.max_frag)


def _receive(r, total):
    parts = []
    while True:
        rec = r.pop()
        if rec is None:
            return parts, False
        kind, flags, t, payload = rec
        assert t == total
        parts.append(payload)
        if not flags & _core.F_MORE:
            return parts, True


@pytest.mark.parametrize("size", [0, 1, 1000, 4096, 3 * 4096 + 5, 100_000])
def test_message_larger_than_ring_streams_in_fragments(size):
    r = _core.Ring(CAP)
    msg = bytes(random.Random(size).getrandbits(8) for _ in range(size))
    off = 0
    received = []
    done = False
    rounds = 0
    while not done:
        off = r.send(msg, off)
        parts, done = _receive(r, size)
        received += parts
        rounds += 1
    assert off == size
    assert b"".join(received) == msg
    if size > CAP:
        assert rounds > 1        # it cannot have fitted at once
    assert all(len(p) <= r.max_frag for p in received)


def _header(size, kind, flags=0, total=None):
    return struct.pack("<IHHIIQQQQ", size, kind, flags, 0, 0, 0, 0, 0,
                       size if total is None else total)


@pytest.mark.parametrize("raw", [
    _header(10**6, _core.K_TASK),                 # size beyond the ring
    _header(8, 0) + b"x" * 8,                     # kind 0
    _header(8, 99) + b"x" * 8,                    # unknown kind
    _header(64, _core.K_TASK)[:20],               # truncated header
    _header(64, _core.K_TASK) + b"x" * 10,        # truncated payload
    _header(16, _core.K_TASK, total=8) + b"x" * 16,  # size > total
    _header(8, _core.K_PAD) + b"x" * 8,           # PAD not reaching the end
])
def test_corrupt_records_are_reported_not_read(raw):
    r = _core.Ring(CAP)
    assert r.raw(raw)
    with pytest.raises(ValueError, match="corrupt"):
        r.pop()


def test_fuzz_random_bytes_never_crash():
    rng = random.Random(7)
    for _ in range(3000):
        r = _core.Ring(CAP)
        n = rng.randrange(1, 600)
        blob = bytes(rng.getrandbits(8) for _ in range(n))
        if rng.random() < 0.5:
            # A plausible header with random fields, then random bytes.
            blob = _header(rng.randrange(0, 5000), rng.randrange(0, 9),
                           rng.randrange(0, 4), rng.randrange(0, 5000)) + blob
        r.raw(blob)
        for _ in range(4):
            try:
                rec = r.pop()
            except ValueError:
                break
            if rec is None:
                break
            assert len(rec[3]) <= r.max_frag


def test_valid_traffic_after_resync():
    r = _core.Ring(CAP)
    r.raw(_header(8, 99) + b"x" * 8)
    with pytest.raises(ValueError):
        r.pop()
    r.resync()
    assert r.push(b"fine")
    assert r.pop()[3] == b"fine"


# ------------------------------------------------- message decoder (gather)

OOB_MAGIC = 0x424F5043
OOB_ARENA = 1 << 63
OOB_BYTES = 1 << 62


def _oob_message(obj, min_bytes=64):
    """A message as cpool's sender builds it: prefix, pickle, buffers; bytes
    objects of min_bytes or more go out of band by persistent id."""
    import io
    import pickle
    import struct
    bufs, kinds, ids = [], [], {}

    class P(pickle.Pickler):
        def persistent_id(self, o):
            if type(o) is bytes and len(o) >= min_bytes:
                if id(o) not in ids:
                    ids[id(o)] = len(bufs)
                    bufs.append(o)
                    kinds.append(OOB_BYTES)
                return ids[id(o)]
            return None

    def callback(pb):
        bufs.append(pb.raw())
        kinds.append(0)
        return False

    f = io.BytesIO()
    P(f, 5, buffer_callback=callback).dump(obj)
    data = f.getvalue()
    pre = struct.pack("<IIQ", OOB_MAGIC, len(bufs), len(data))
    pre += b"".join(struct.pack("<Q", len(b) | k) for b, k in zip(bufs, kinds))
    return pre + data + b"".join(bytes(b) for b in bufs)


def test_decoder_round_trips_out_of_band_messages():
    import pickle
    obj = [bytearray(b"a" * 100), b"b" * 200, pickle.PickleBuffer(bytearray(b"c" * 70)),
           b"b" * 200, "text", b"short"]
    obj[3] = obj[1]                      # one object twice
    msg = _oob_message(obj)
    for chunk in (1, 7, 64, len(msg)):
        out = _core.decode_message(msg, True, chunk)
        assert out[0] == obj[0] and type(out[0]) is bytearray
        assert out[1] == obj[1] and out[3] is out[1]
        assert bytes(out[2]) == b"c" * 70
        assert out[4:] == ["text", b"short"]


def test_decoder_fuzz_never_crashes():
    import struct
    rng = random.Random(7)
    base = _oob_message([b"x" * 300, bytearray(b"y" * 100), list(range(20))])
    n_pre = 16 + 8 * 2
    for _ in range(3000):
        m = bytearray(base)
        for _ in range(rng.randint(1, 4)):
            what = rng.random()
            if what < 0.5 and len(m) >= n_pre:   # a prefix byte
                m[rng.randrange(n_pre)] = rng.randrange(256)
            elif what < 0.75 and len(m) >= n_pre:  # flags on a length
                i = rng.randrange(2)
                ln = struct.unpack_from("<Q", m, 16 + 8 * i)[0]
                ln |= rng.choice([OOB_ARENA, OOB_BYTES, OOB_ARENA | OOB_BYTES])
                struct.pack_into("<Q", m, 16 + 8 * i, ln)
            else:                                # cut or pad
                # (The pickle itself is left alone: that would test
                # CPython's unpickler, not this decoder.)
                m = m[:rng.randrange(len(m) or 1)] if rng.random() < 0.5 else m + b"\0" * 9
        try:
            _core.decode_message(bytes(m), True, rng.choice([1, 5, 50, 10_000]))
        except Exception:
            pass                                  # refused: fine; a crash is not


def _late_wake_ups(r, sleeper, step, late, n=3000):
    """Let the thread running sleeper(progress, stop) make progress n times,
    one step(i) at a time.  After each, once the sleeper has moved, wake it
    again and again with late() (nothing new) while it heads back to sleep:
    some of those wake-ups land between its last look at the ring and its
    sleep.  Returns the step the sleeper never woke up for, or None."""
    import sys
    import threading
    import time

    progress, stop = [0], []
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    t = threading.Thread(target=sleeper, args=(progress, stop))
    t.start()
    stuck = None
    try:
        for i in range(n):
            step(i)
            deadline = time.monotonic() + 10.0
            while progress[0] <= i and time.monotonic() < deadline:
                pass
            if progress[0] <= i:
                stuck = i
                break
            for _ in range(100):
                late()
    finally:
        sys.setswitchinterval(old)
        stop.append(1)
        step(n)          # a real one, to wake it for the stop
        t.join()
    assert stuck is not None or progress[0] == n
    return stuck


def test_a_late_wake_up_does_not_cost_the_consumer_the_next_one():
    """A wake-up can reach the consumer after it has already taken the
    records it was for (its producer was held up between publishing and
    waking), just as it is about to sleep again.  That must not leave it
    asleep through the next publish."""
    r = _core.Ring(CAP)

    def consume(progress, stop):
        while not stop:
            if r.pop() is not None:
                progress[0] += 1
            else:
                r.wait(12.0)

    stuck = _late_wake_ups(r, consume, lambda i: r.push(b"%d" % i), r.flush)
    assert stuck is None, f"record {stuck} left unread: its wake-up was lost"


def test_a_late_wake_up_does_not_cost_the_producer_the_next_one():
    """The same for a producer asleep on a full ring (a worker whose result
    ring the parent drains): room handed back must wake it."""
    r = _core.Ring(CAP)
    payload = b"x" * 8
    while r.push(payload):
        pass

    def produce(progress, stop):
        while not stop:
            if r.push(payload):
                progress[0] += 1
            else:
                r.wait_space(len(payload), 12.0)

    def take(i):
        assert r.pop() is not None   # the ring stays full

    stuck = _late_wake_ups(r, produce, take, r.release)
    assert stuck is None, f"room freed by record {stuck} unseen: wake-up lost"
