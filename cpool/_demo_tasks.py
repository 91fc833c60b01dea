"""Task functions for ``python -m cpool``.

Tasks are pickled by reference (module + name), so they live in an importable
module rather than in ``cpool.__main__``.
"""

import time


def square(x):
    return x * x


def cube(x):
    return x * x * x


def add(a, b):
    return a + b


def slow_square(x):
    time.sleep(0.02)
    return x * x
