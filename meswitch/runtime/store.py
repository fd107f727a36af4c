"""Expert residency: which experts are in memory, in which form, under a memory budget.

Tiers, as in the design of the runtime:
    disk    the bundle's expert file (nothing read until an expert is needed)
    packed  its compressed deltas in RAM, as stored (b-bit codes, fp16 salient columns)
    hot     the compute-ready form the delta layers read (backend.prepare). With the CPU kernel
            this is the packed form itself plus a few bytes per matrix; the reference backend
            adds a dense copy.

Loading never blocks the engine or the HTTP loop: reading a file, checking its SHA-256 and
building the compute-ready form run in a background thread, without the store's lock; the lock
only guards bookkeeping (a few dictionary operations), so `stats()`, `/health` and `/metrics`
never wait for a disk. The engine asks `acquire(name)` at every step for each waiting request:
it answers the pinned hot expert, or None while the expert is being loaded (or waits for room),
or raises what made its load fail, so one bad file fails only the requests that need it.

Device: the packed tier lives on the model's device (an expert's tensors are read from disk into
host memory, checked there, then moved), so on a GPU the budget counts device memory and the
default budget is derived from the device's free memory (torch.cuda.mem_get_info).

Memory: `max_memory` bounds everything the runtime adds to the base: packed and hot experts,
loads in flight (reserved before reading), experts removed from the bundle but still pinned by
running requests (until they finish), and the engine's KV cache (`other_bytes`). When room is
needed, the least recently used experts that no running request pins and no waiting request
wants are evicted (hot forms first, then packed). Without an explicit budget, Switch.load
derives one from the memory actually available (default_budget).
"""
from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Collection

from ..bundle.format import Bundle, UnknownExpertError
import torch

from ..compression.delta import CompressedDelta, delta_to
from .backend import DeltaBackend
from .layers import DeltaEmbedding, HotExpert, build_hot_expert

DEFAULT_BUDGET_FRACTION = 0.8  # of the memory available when the runtime starts


class MemoryBudgetError(RuntimeError):
    """An expert that cannot fit the memory budget even alone."""


def release_freed_memory() -> None:
    """Give freed heap memory back to the OS (glibc keeps it otherwise: building an expert's
    compute-ready form allocates temporaries, and RSS would stay at the peak)."""
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


def available_memory() -> int:
    """Bytes this process can still take: the OS's available memory, bounded by a cgroup limit."""
    import psutil

    avail = psutil.virtual_memory().available
    try:
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        used = int(open("/sys/fs/cgroup/memory.current").read().strip())
        if limit != "max":
            avail = min(avail, int(limit) - used)
    except (OSError, ValueError):
        pass
    return max(0, avail)


def default_budget(device: torch.device | str = "cpu") -> int:
    """The budget when none is given: a fraction of the memory available now (after the base is
    loaded) on `device` (host memory, or a CUDA device's free memory), so that experts are
    evicted before the process (or the device) runs out of memory."""
    device = torch.device(device)
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else available_memory()
    return max(64 << 20, int(free * DEFAULT_BUDGET_FRACTION))


def _packed_bytes(deltas: dict[str, CompressedDelta]) -> int:
    return sum(d.nbytes for d in deltas.values())


@dataclass(eq=False)
class _Entry:
    name: str
    generation: int
    deltas: dict[str, CompressedDelta]
    packed_bytes: int
    hot: HotExpert | None
    hot_bytes: int
    pins: int = 0

    @property
    def nbytes(self) -> int:
        return self.packed_bytes + (self.hot_bytes if self.hot is not None else 0)


class ExpertStore:
    def __init__(self, bundle: Bundle, wrapped: dict, backend: DeltaBackend, dtype, tied: bool,
                 max_memory: int | None = None, verify: bool = True,
                 other_bytes: Callable[[], int] = lambda: 0, on_change: Callable[[], None] = lambda: None,
                 device: torch.device | str = "cpu"):
        self.bundle = bundle
        self.device = torch.device(device)  # where the packed and hot tiers live (the model's device)
        self.wrapped = wrapped
        self.backend = backend
        self.dtype = dtype
        self.tied = tied
        self.max_memory = max_memory
        self.verify = verify
        self.other_bytes = other_bytes  # memory outside the store counted in the budget (KV cache)
        self.on_change = on_change  # called when a load finishes or fails (the engine wakes up)
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._retired: list[_Entry] = []  # removed from the bundle, still pinned by running requests
        self._loading: dict[str, int] = {}  # name -> bytes reserved for its load in flight
        self._failed: dict[str, tuple[float, BaseException]] = {}  # name -> (when, why) of its last failed load
        self._generation: dict[str, int] = {}  # bumped by forget(): a load in flight for an older one is dropped
        self._verified: set[str] = set()
        self._file_sizes: dict = {}  # expert file path -> tensor bytes (_file_bytes)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="meswitch-load")
        self.stats = {"hits": 0, "misses": 0, "disk_loads": 0, "hot_builds": 0, "hot_evictions": 0,
                      "packed_evictions": 0, "load_seconds": 0.0, "build_seconds": 0.0, "prefetches": 0,
                      "load_failures": 0}

    # ----- queries (cheap: the lock is never held across I/O) ---------------------------------------
    @property
    def names(self) -> list[str]:
        return sorted(self.bundle.experts)

    def _bytes(self) -> int:
        return (sum(e.nbytes for e in self._entries.values()) + sum(e.nbytes for e in self._retired)
                + sum(self._loading.values()))

    def memory_bytes(self) -> int:
        """Bytes held by experts (packed, hot, retired-but-pinned) and reserved for loads in flight."""
        with self._lock:
            return self._bytes()

    def residency(self) -> dict[str, str]:
        with self._lock:
            def state(n):
                e = self._entries.get(n)
                if e is not None:
                    return "hot" if e.hot is not None else "packed"
                return "loading" if n in self._loading else "disk"
            return {n: state(n) for n in self.names}

    # ----- the engine's side ------------------------------------------------------------------------
    def acquire(self, name: str, since: float = 0.0, protect: Collection[str] = ()) -> HotExpert | None:
        """The expert's hot form, pinned for one request (release it with `release`); None while
        it is loading or waiting for room. Raises UnknownExpertError, MemoryBudgetError, or the
        error of a load that failed after `since` (time.perf_counter() of the request's arrival:
        a request that came later starts a new attempt). `protect`: experts that waiting requests
        want, not evicted to make room."""
        if name not in self.bundle.experts:
            raise UnknownExpertError(f"unknown expert {name!r}: not (or no longer) in the bundle "
                                     f"(experts: {', '.join(self.names) or 'none'})")
        file_bytes = self._file_bytes(name)  # before the lock: it may read the file's header
        with self._lock:
            e = self._entries.get(name)
            if e is not None and e.hot is not None:
                self._entries.move_to_end(name)
                e.pins += 1
                self.stats["hits"] += 1
                return e.hot
            failed = self._failed.get(name)
            if failed is not None:
                if failed[0] >= since:
                    raise failed[1]
                del self._failed[name]
            if name in self._loading:
                return None
            if e is not None:  # packed, not hot: build in the background too (the reference backend's is slow)
                need = self._ready_bytes(e.deltas)
                self._check_fits(name, need + e.packed_bytes)
            else:
                # The tensors' bytes in the file: the packed size, known exactly once read; the
                # compute-ready part is checked by the load (_load).
                need = file_bytes
                self._check_fits(name, need)
            if not self._make_room(need, keep={name, *protect}):
                return None
            self._start_load(name, need)
            self.stats["misses"] += 1
            return None

    def acquire_blocking(self, name: str, timeout: float | None = 60.0) -> HotExpert:
        """acquire() until it answers (tests, benchmarks and tools; the engine never blocks)."""
        since = time.perf_counter()
        deadline = None if timeout is None else since + timeout
        while True:
            hot = self.acquire(name, since)
            if hot is not None:
                return hot
            if deadline is not None and time.perf_counter() > deadline:
                raise TimeoutError(f"expert {name!r} did not load within {timeout} s (memory budget full?)")
            time.sleep(0.002)

    def release(self, hot: HotExpert) -> None:
        """Unpin an expert acquired for a request (by the HotExpert acquire returned)."""
        with self._lock:
            e = self._find(hot)
            if e is None:
                return
            e.pins -= 1
            if e.pins <= 0 and e in self._retired:
                self._retired.remove(e)

    def prefetch(self, name: str) -> None:
        """Load a queued request's expert in the background if it fits without evicting anything."""
        need = self._file_bytes(name)  # before the lock: it may read the file's header
        with self._lock:
            if name in self._entries or name in self._loading or name not in self.bundle.experts:
                return
            if self.max_memory is not None and self._bytes() + self.other_bytes() + need > self.max_memory:
                return
            self.stats["prefetches"] += 1
            self._start_load(name, need)

    def make_room(self, nbytes: int, protect: Collection[str] = ()) -> bool:
        """Evict unpinned experts so that `nbytes` more (e.g. KV cache growth) fit the budget."""
        with self._lock:
            return self._make_room(nbytes, keep=set(protect))

    def read_packed(self, name: str) -> dict[str, CompressedDelta]:
        """An expert's packed deltas, from memory when resident, else read from disk (not kept)."""
        with self._lock:
            e = self._entries.get(name)
            if e is not None:
                return e.deltas
        return self.bundle.load_deltas(name, verify=self.verify)

    # ----- loading (background thread) ----------------------------------------------------------------
    def _start_load(self, name: str, reserve: int) -> None:
        """Lock held. Reserve the bytes and queue the load."""
        self._loading[name] = reserve
        gen = self._generation.get(name, 0)
        self._pool.submit(self._load, name, gen)

    def _load(self, name: str, gen: int) -> None:
        try:
            with self._lock:
                e = self._entries.get(name)
                deltas = e.deltas if e is not None and e.generation == gen else None
                verify = self.verify and name not in self._verified
            t0 = time.perf_counter()
            if deltas is None:
                deltas = self.bundle.load_deltas(name, verify=verify)
                deltas = {k: delta_to(d, self.device) for k, d in deltas.items()}  # checked on the host first
                self.stats["disk_loads"] += 1
            t1 = time.perf_counter()
            packed = _packed_bytes(deltas)
            ready = self._ready_bytes(deltas)
            with self._lock:  # the exact size is known now: settle the reservation
                self._check_fits(name, packed + ready)
                held = self._entries[name].packed_bytes if name in self._entries else 0
                extra = packed - held + ready - self._loading.get(name, 0)
                if extra > 0 and not self._make_room(extra, keep={name}):
                    self._loading.pop(name, None)  # no room any more: the request waits and asks again
                    return
                self._loading[name] = packed - held + ready
            hot = build_hot_expert(name, deltas, self.wrapped, self.backend, self.dtype, self.tied)
            t2 = time.perf_counter()
            with self._lock:
                self._loading.pop(name, None)
                if self._generation.get(name, 0) != gen or name not in self.bundle.experts:
                    return  # removed or replaced meanwhile: what was read is stale
                e = self._entries.get(name)
                if e is None:
                    e = _Entry(name, gen, deltas, packed, None, 0)
                    self._entries[name] = e
                e.hot, e.hot_bytes = hot, hot.nbytes
                self._entries.move_to_end(name)
                self._verified.add(name)
                self.stats["hot_builds"] += 1
                self.stats["load_seconds"] += t1 - t0
                self.stats["build_seconds"] += t2 - t1
            release_freed_memory()
        except BaseException as err:  # any failure: reported to the requests that wait for this load
            with self._lock:
                self._loading.pop(name, None)
                self._failed[name] = (time.perf_counter(), err)
                self.stats["load_failures"] += 1
        finally:
            self.on_change()

    # ----- bookkeeping (lock held) ------------------------------------------------------------------
    def _find(self, hot: HotExpert) -> _Entry | None:
        e = self._entries.get(hot.name)
        if e is not None and e.hot is hot:
            return e
        return next((r for r in self._retired if r.hot is hot), None)

    def _file_bytes(self, name: str) -> int:
        """The tensor bytes of an expert's file: its size less the safetensors header (an
        8-byte little-endian length, then that many bytes of JSON). Read once per file (the
        engine asks at every step while a request waits for room); call it without the lock."""
        try:
            path = self.bundle.path / self.bundle.experts[name]["weights"]
        except KeyError:
            return 0
        size = self._file_sizes.get(path)
        if size is None:
            try:
                with open(path, "rb") as f:
                    header = int.from_bytes(f.read(8), "little")
                    size = max(0, os.fstat(f.fileno()).st_size - 8 - header)
            except OSError:
                return 0
            self._file_sizes[path] = size  # until the bundle changes (forget)
        return size

    def _ready_bytes(self, deltas: dict[str, CompressedDelta]) -> int:
        """What build_hot_expert adds: the backend's matrices, plus norm weights / bias fixes and
        added vocabulary rows materialized in the model dtype."""
        n = 0
        for tname, d in deltas.items():
            if isinstance(self.wrapped.get(tname.rpartition(".")[0]), DeltaEmbedding):
                # rows for the lookups; a tied LM head also prepares the same delta as a matrix
                n += self.backend.rows_nbytes(d) + (self.backend.ready_nbytes(d, self.dtype) if self.tied else 0)
            elif len(d.shape) == 2:
                n += self.backend.ready_nbytes(d, self.dtype)
            else:
                n += d.shape[0] * self.dtype.itemsize
            if d.extra_rows is not None:
                n += d.extra_rows.numel() * self.dtype.itemsize
        return n

    def _check_fits(self, name: str, nbytes: int) -> None:
        """An expert that cannot fit even with every other expert evicted (the KV cache stays)."""
        if self.max_memory is None:
            return
        other = self.other_bytes()
        if nbytes + other > self.max_memory:
            raise MemoryBudgetError(
                f"expert {name!r} needs {nbytes / 2**20:.1f} MiB (packed + compute-ready) but the memory budget is "
                f"{self.max_memory / 2**20:.1f} MiB, of which the KV cache takes {other / 2**20:.1f} MiB")

    def _make_room(self, need: int, keep: Collection[str]) -> bool:
        """Evict unpinned, unwanted experts (hot forms first, LRU) until `need` more bytes fit."""
        if self.max_memory is None:
            return True
        while self._bytes() + self.other_bytes() + need > self.max_memory:
            # A hot form worth dropping on its own (a dense copy); the CPU kernel's hot form is its
            # packed form plus descriptors, so there the whole expert goes.
            victim = next((e for e in self._entries.values() if e.hot is not None and e.pins == 0
                           and e.name not in keep and e.name not in self._loading
                           and 4 * e.hot_bytes >= e.packed_bytes), None)
            if victim is not None:
                victim.hot = None
                self.stats["hot_evictions"] += 1
                continue
            victim = next((e for e in self._entries.values()
                           if e.pins == 0 and e.name not in keep and e.name not in self._loading), None)
            if victim is None:
                return False
            del self._entries[victim.name]
            self.stats["packed_evictions"] += 1
        return True

    def evict(self, name: str) -> bool:
        """Drop an expert's packed and compute-ready forms now (back to disk; its file stays
        verified). False if running requests use it (it stays) or it is not in memory."""
        with self._lock:
            e = self._entries.get(name)
            if e is None or e.pins > 0 or name in self._loading:
                return False
            del self._entries[name]
            self.stats["packed_evictions"] += 1
            return True

    # ----- experts added, replaced and removed at run time ------------------------------------------------
    def forget(self, name: str) -> None:
        """Drop an expert's memory (it was removed or replaced in the bundle). Forms pinned by
        running requests stay counted until those finish; a load in flight is discarded."""
        with self._lock:
            self._generation[name] = self._generation.get(name, 0) + 1
            e = self._entries.pop(name, None)
            if e is not None and e.pins > 0:
                self._retired.append(e)
            self._failed.pop(name, None)
            self._verified.discard(name)
            self._file_sizes.clear()  # the bundle changed: sizes are read again when needed

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
