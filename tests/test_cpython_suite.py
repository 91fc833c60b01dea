"""CPython's own tests of multiprocessing.Pool, run against cpool.Pool.

The test classes come from the interpreter's test package
(Lib/test/_test_multiprocessing.py: _TestPool, _TestPoolWorkerErrors and
_TestPoolWorkerLifetime), combined with the mixin CPython uses for its
process-based runs, with cpool.Pool in place of multiprocessing.Pool.
Nothing of them is copied here: they are imported from the installed
interpreter, so they are the tests of whatever Python runs the suite.
Skipped where the interpreter ships without its test package.
"""
import unittest

import pytest

import cpool

suite = pytest.importorskip("test._test_multiprocessing",
                            reason="the interpreter has no test package")

pytestmark = pytest.mark.cpool_only


class CpoolMixin(suite.ProcessesMixin):
    Pool = staticmethod(cpool.Pool)


CLASSES = ("_TestPool", "_TestPoolWorkerErrors", "_TestPoolWorkerLifetime")

for _name in CLASSES:
    _cls = type("TestCpython" + _name[len("_Test"):],
                (getattr(suite, _name), CpoolMixin, unittest.TestCase), {})
    _cls.__module__ = __name__
    globals()[_cls.__name__] = _cls
del _name, _cls


def test_the_suite_runs_against_cpool():
    # The classes above build their pools with this, not multiprocessing's.
    with TestCpythonPool.Pool(1) as p:
        assert isinstance(p, cpool.Pool)
        assert p.apply(suite.sqr, (7,)) == 49
    n = sum(1 for name in CLASSES for attr in dir(getattr(suite, name))
            if attr.startswith("test_"))
    assert n >= 30                      # the suite is there, not an empty shell
