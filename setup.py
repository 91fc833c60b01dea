"""Build of cpool's C extension, cpool._core.

Switches (environment variables):
  CPOOL_DEBUG=1     -O0 -g3, assertions on
  CPOOL_SANITIZE=1  AddressSanitizer + UndefinedBehaviorSanitizer (implies DEBUG);
                    run Python with LD_PRELOAD=$(gcc -print-file-name=libasan.so)
"""
import os
import sys

from setuptools import Extension, setup

if not sys.platform.startswith("linux"):
    sys.exit("cpool needs Linux (memfd, futex, pidfd); other platforms are not supported yet")

debug = os.environ.get("CPOOL_DEBUG") == "1"
sanitize = os.environ.get("CPOOL_SANITIZE") == "1"

cflags = ["-std=gnu11", "-Wall", "-Wextra", "-Wno-missing-field-initializers",
          "-Wno-cast-function-type", "-fvisibility=hidden"]
ldflags = []
undef = []
if debug or sanitize:
    cflags += ["-O0", "-g3", "-fno-omit-frame-pointer"]
    undef = ["NDEBUG"]
else:
    cflags += ["-O2"]
if sanitize:
    san = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]
    cflags += san + ["-DCPOOL_SANITIZED=1"]
    ldflags += san
if os.environ.get("CPOOL_WERROR") == "1":
    cflags.append("-Werror")

setup(
    ext_modules=[
        Extension(
            "cpool._core",
            sources=[f"csrc/{n}.c" for n in
                     ("ring", "shm", "arena", "npalloc", "pyheap", "proc", "msg", "codec", "result", "worker",
                      "core", "module")],
            depends=["csrc/cpool.h", "csrc/atomics.h"],
            extra_compile_args=cflags,
            extra_link_args=ldflags,
            undef_macros=undef,
        )
    ],
)
