"""Task functions for the benchmarks.

They live in their own importable module because every pool pickles tasks by
reference (module name + function name).
"""


import dataclasses
import datetime
import enum


def square(x):
    return x * x


@dataclasses.dataclass
class Record:
    key: int
    name: str
    score: float


def make_record(i):
    return Record(i, "item", i / 4)


# Records of other field kinds (benchmarks/records.py).
EPOCH = datetime.datetime(2026, 1, 1)


class Colour(enum.Enum):
    RED = 1
    GREEN = 2


@dataclasses.dataclass
class StampedRecord:
    key: int
    name: str
    at: datetime.datetime


@dataclasses.dataclass
class ColouredRecord:
    key: int
    colour: Colour


def make_stamped_record(i):
    return StampedRecord(i, "item", EPOCH + datetime.timedelta(seconds=i))


def make_coloured_record(i):
    return ColouredRecord(i, Colour.RED if i & 1 else Colour.GREEN)


def make_set(i):
    return {i, i + 1, i + 2}


def make_datetime(i):
    return EPOCH + datetime.timedelta(seconds=i)


def add(a, b):
    return a + b


def length(data):
    return len(data)


def echo(obj):
    return obj


def slice_sum(arr):
    """Sum of every 4096th element: touches every page of the argument."""
    return float(arr[::4096].sum())


def make_array(n):
    import numpy as np

    return np.arange(n, dtype=np.float64)


def burn(n):
    """Pure-Python CPU work; the cost grows linearly with ``n``."""
    acc = 0
    for i in range(n):
        acc = (acc + i * i) % 1000003
    return acc
