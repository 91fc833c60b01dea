"""Type stub for the private C module cpool._core (see csrc/)."""
from typing import Any, Callable, Optional, Tuple

MODE_APPLY: int
MODE_MAP: int
MODE_STARMAP: int
MODE_CALL1: int
E_LOST: int
E_TERMINATED: int
E_BROKEN: int
E_PROTO: int
E_STARTUP: int
STATE_RUN: int
STATE_DONE: int
STATE_TERMINATED: int
STATE_BROKEN: int
REC_HEADER: int
K_PAD: int
K_TASK: int
K_RESULT: int
F_MORE: int

class Core:
    state: int
    zygote_pid: int
    unfinished: int
    def __init__(self, processes: int, initializer: Optional[Callable[..., Any]],
                 initargs: tuple, maxtasks: int, ring_bytes: int, cache: dict,
                 make_error: Callable[..., BaseException], spin_ns: int) -> None: ...
    def submit(self, job: int, index: int, mode: int, func: Callable[..., Any],
               body: Any) -> None: ...
    def submit_many(self, job: int, first_index: int, mode: int,
                    func: Callable[..., Any], bodies: list) -> None: ...
    def call(self, func: Callable[..., Any], args: Any,
             kwds: Any) -> Optional[Tuple[bool, Any]]: ...
    def collect(self) -> None: ...
    def close(self) -> None: ...
    def terminate(self, quiet: bool = False) -> None: ...
    def pids(self) -> list[int]: ...
    def workers(self, make: Callable[[int, int], Any]) -> Tuple[list[Any], int]: ...

class Ring:
    free: int
    max_frag: int
    positions: Tuple[int, int]
    def __init__(self, capacity: int) -> None: ...
    def push(self, data: bytes, kind: int = ...) -> bool: ...
    def send(self, data: bytes, offset: int) -> int: ...
    def pop(self) -> Optional[Tuple[int, int, int, bytes]]: ...
    def raw(self, data: bytes) -> bool: ...
    def resync(self) -> None: ...
