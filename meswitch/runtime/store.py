"""Expert residency: which experts are in memory, in which form, under a memory budget.

Three tiers, as in the design of the runtime:
    disk    the bundle's experts/<name>.safetensors (nothing read until an expert is needed)
    packed  its compressed deltas in RAM, as stored (b-bit codes, fp16 salient columns)
    hot     additionally, the compute-ready form the delta layers read (backend.prepare)

`max_memory` bounds packed + hot bytes together (the base model and KV cache are not in it).
When a new expert needs room, the least recently used hot experts that no running request holds
are demoted to packed first, then the least recently used packed experts are dropped. A request
pins its expert's hot form from admission to completion, so nothing it uses is ever evicted;
if the pinned experts alone fill the budget, `try_acquire` answers None and the engine keeps
the request waiting. Prefetch loads queued experts' packed form in a background thread.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

from ..bundle.format import Bundle, BundleError
from ..compression.delta import CompressedDelta
from .backend import DeltaBackend
from .layers import HotExpert, build_hot_expert


class MemoryBudgetError(RuntimeError):
    pass


def release_freed_memory() -> None:
    """Give freed heap memory back to the OS (glibc keeps it otherwise: building an expert's
    compute-ready form allocates large temporaries, and RSS would stay at the peak)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def parse_memory(value: str | int | None) -> int | None:
    """'2GiB', '512MB', '1.5G', '800000000' -> bytes; None/'' -> None (no limit)."""
    if value is None or value == "":
        return None
    if isinstance(value, int):
        n = value
    else:
        s = value.strip().lower().replace(" ", "")
        units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6,
                 "gb": 10**9, "tb": 10**12, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40, "b": 1}
        for unit in sorted(units, key=len, reverse=True):
            if s.endswith(unit):
                num, mult = s[: -len(unit)], units[unit]
                break
        else:
            num, mult = s, 1
        try:
            n = int(float(num) * mult)
        except ValueError:
            raise ValueError(f"cannot read memory size {value!r} (examples: 2GiB, 512MB, 800000000)") from None
    if n <= 0:
        raise ValueError(f"memory size must be positive, got {value!r}")
    return n


def _packed_bytes(deltas: dict[str, CompressedDelta]) -> int:
    return sum(d.nbytes for d in deltas.values())


class ExpertStore:
    def __init__(self, bundle: Bundle, wrapped: dict, backend: DeltaBackend, dtype, tied: bool,
                 max_memory: int | None = None, verify: bool = True):
        self.bundle = bundle
        self.wrapped = wrapped
        self.backend = backend
        self.dtype = dtype
        self.tied = tied
        self.max_memory = max_memory
        self.verify = verify
        self._lock = threading.RLock()
        self._packed: OrderedDict[str, dict[str, CompressedDelta]] = OrderedDict()
        self._packed_bytes: dict[str, int] = {}
        self._hot: OrderedDict[str, HotExpert] = OrderedDict()
        self._pins: dict[str, int] = {}
        self._loading: dict[str, Future] = {}
        self._verified: set[str] = set()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="meswitch-prefetch")
        self.stats = {"hits": 0, "misses": 0, "disk_loads": 0, "hot_builds": 0, "hot_evictions": 0,
                      "packed_evictions": 0, "load_seconds": 0.0, "build_seconds": 0.0, "prefetches": 0}

    # ----- queries ----------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return sorted(self.bundle.experts)

    def memory_bytes(self) -> int:
        with self._lock:
            return sum(self._packed_bytes.values()) + sum(h.nbytes for h in self._hot.values())

    def residency(self) -> dict[str, str]:
        with self._lock:
            return {n: ("hot" if n in self._hot else "packed" if n in self._packed else "disk") for n in self.names}

    # ----- loading ----------------------------------------------------------------------------
    def _load_packed(self, name: str) -> dict[str, CompressedDelta]:
        """Disk -> packed (deduplicated between the engine thread and the prefetcher)."""
        with self._lock:
            if name in self._packed:
                self._packed.move_to_end(name)
                return self._packed[name]
            fut = self._loading.get(name)
            owner = fut is None
            if owner:
                fut = self._loading[name] = Future()
        if not owner:
            return fut.result()
        try:
            t0 = time.perf_counter()
            deltas = self.bundle.load_deltas(name, verify=self.verify and name not in self._verified)
            nbytes = _packed_bytes(deltas)
            with self._lock:
                self._verified.add(name)
                self._make_room(nbytes, keep=name)
                self._packed[name] = deltas
                self._packed_bytes[name] = nbytes
                self.stats["disk_loads"] += 1
                self.stats["load_seconds"] += time.perf_counter() - t0
            fut.set_result(deltas)
            return deltas
        except BaseException as e:
            fut.set_exception(e)
            raise
        finally:
            with self._lock:
                self._loading.pop(name, None)

    def _make_room(self, need: int, keep: str) -> bool:
        """Evict unpinned experts (hot forms first, LRU) until `need` more bytes fit. Lock held."""
        if self.max_memory is None:
            return True
        while self.memory_bytes() + need > self.max_memory:
            victim = next((n for n in self._hot if not self._pins.get(n) and n != keep), None)
            if victim is not None:
                del self._hot[victim]
                self.stats["hot_evictions"] += 1
                continue
            victim = next((n for n in self._packed if not self._pins.get(n) and n != keep and n not in self._hot), None)
            if victim is None:
                return False
            del self._packed[victim]
            del self._packed_bytes[victim]
            self.stats["packed_evictions"] += 1
        return True

    def try_acquire(self, name: str) -> HotExpert | None:
        """The expert's hot form, pinned for one request; None while pinned experts leave no room."""
        if name not in self.bundle.experts:
            raise BundleError(f"unknown expert {name!r} (experts: {', '.join(self.names) or 'none'})")
        with self._lock:
            hot = self._hot.get(name)
            if hot is not None:
                self._hot.move_to_end(name)
                self._pins[name] = self._pins.get(name, 0) + 1
                self.stats["hits"] += 1
                return hot
        deltas = self._load_packed(name)
        need = self.backend_bytes(deltas)
        with self._lock:
            if name in self._hot:  # built meanwhile by another thread
                return self.try_acquire(name)
            if self.max_memory is not None and self._packed_bytes.get(name, 0) + need > self.max_memory:
                raise MemoryBudgetError(
                    f"expert {name!r} needs {(self._packed_bytes.get(name, 0) + need) / 2**20:.1f} MiB "
                    f"(packed + compute-ready) but the memory budget is {self.max_memory / 2**20:.1f} MiB"
                )
            if not self._make_room(need, keep=name):
                return None
            t0 = time.perf_counter()
            hot = build_hot_expert(name, deltas, self.wrapped, self.backend, self.dtype, self.tied)
            self.stats["build_seconds"] += time.perf_counter() - t0
            self.stats["hot_builds"] += 1
            self.stats["misses"] += 1
            self._hot[name] = hot
            self._pins[name] = self._pins.get(name, 0) + 1
        release_freed_memory()
        return hot

    def backend_bytes(self, deltas: dict[str, CompressedDelta]) -> int:
        """Bytes the compute-ready form will take (computed without building it)."""
        return sum(self.backend.ready_nbytes(d, self.dtype) for d in deltas.values())

    def release(self, name: str) -> None:
        with self._lock:
            n = self._pins.get(name, 0) - 1
            if n > 0:
                self._pins[name] = n
            else:
                self._pins.pop(name, None)

    def prefetch(self, name: str) -> None:
        """Start loading an expert's packed form in the background (for a queued request)."""
        with self._lock:
            if name in self._packed or name in self._loading or name not in self.bundle.experts:
                return
            self.stats["prefetches"] += 1

        def job():
            try:
                self._load_packed(name)
            except Exception:
                pass  # the request that needs it will load it again and report the error

        self._pool.submit(job)

    # ----- experts added and removed at run time ---------------------------------------------------
    def forget(self, name: str) -> None:
        """Drop an expert's memory (after it was removed from the bundle). Pinned forms stay
        referenced by the requests that hold them until they finish."""
        with self._lock:
            self._hot.pop(name, None)
            self._packed.pop(name, None)
            self._packed_bytes.pop(name, None)
            self._verified.discard(name)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
