"""Task functions for the benchmarks.

They live in their own importable module because every pool pickles tasks by
reference (module name + function name).
"""


import dataclasses


def square(x):
    return x * x


@dataclasses.dataclass
class Record:
    key: int
    name: str
    score: float


def make_record(i):
    return Record(i, "item", i / 4)


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
