"""Serve a bundle on Ray Serve: many Switch replicas behind one OpenAI-compatible endpoint.

    meswitch serve bundle/ --ray --replicas 2 --experts-per-replica 4
    serve run meswitch.server.ray_serve:app_builder bundle=/shared/bundle replicas=2
    (or a Serve config file: import_path meswitch.server.ray_serve:app_builder, args as below)

Three deployments, one application:
  - SwitchReplica (N replicas, or autoscaled): one Switch each (one resident base, experts made
    hot on demand under its memory budget, continuous batching across experts).
  - Ingress (one replica): the same FastAPI app as the single-process server (create_app), over
    a RemoteSwitch that forwards each generation to a replica and streams the text back. `auto`
    routing, validation, auth, errors and metrics are the app's, unchanged.
  - Coordinator (one replica, no CPU): state shared across processes: the conversation memory
    (which expert answered a conversation, for `auto` stickiness) and each replica's latest
    runtime stats (for /metrics).

Expert-affine routing uses Serve's model multiplexing: a request for expert E goes with
`multiplexed_model_id=E`; every replica registers the experts it served (an LRU of
`experts_per_replica` ids), and Serve's router prefers a replica that holds E, then the replica
holding the fewest experts. Serve multiplexes (and `@serve.batch` would split batches) by model
id, so batching across experts stays inside each replica's engine: the replica's `generate`
handles one request and the Switch batches all of a replica's requests together. The base model
(`model: base`) carries no id and goes to any replica (power of two choices).

A replica that dies while a request is in flight: the request is retried on another replica if
no text has reached the client yet, or if its sampling is reproducible (temperature 0 or a seed:
the text already sent is regenerated, checked to be the same, and the stream goes on); otherwise
it ends with an error (a 500 for a plain request; an error event in a stream), never a hang.

The bundle (and the base) are a path every node can read (a shared file system) or a URI
(`scheme://...`, anything fsspec opens: file://, s3://, gs://, http(s):// with the matching
fsspec plugin installed), copied once per machine into a cache directory; the replica then
loads it like the single-process server does, base fingerprint check included.
"""
from __future__ import annotations

import asyncio
import fcntl
import hashlib
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import ray
from pydantic import BaseModel, ConfigDict, Field, field_validator
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError
from ray.serve.exceptions import ReplicaUnavailableError as ServeReplicaUnavailable

from ..bundle.format import Bundle, BundleError
from ..runtime.engine import Completion, QueueFullError, SamplingParams
from .app import ReplicaGoneError, UnsupportedOperation, create_app
from .metrics import process_resident_bytes
from .ray_state import Coordinator, SharedConversationMemory

log = logging.getLogger("meswitch.server.ray")
APP_NAME = "meswitch"
REPLICA_HEADER = "x-meswitch-replica"
REPORT_INTERVAL_S = 1.0      # replicas push their runtime stats this often
REPLICA_GONE = (RayActorError, ServeReplicaUnavailable)  # the replica process is gone or unreachable


class NoReplicaError(QueueFullError):
    """No replica accepted the request in time (all busy, dead or starting): answered like a full
    queue, 429 with Retry-After."""


class ServeArgs(BaseModel):
    """The deployment's settings: `meswitch serve --ray` flags, `serve run` key=value arguments or
    a Serve config file's `args`."""
    model_config = ConfigDict(extra="forbid")
    bundle: str = Field(description="bundle path on every node, or a URI copied once per node")
    base: str | None = Field(default=None, description="base checkpoint path or URI (default: the bundle's reference)")
    replicas: int = Field(default=1, ge=1)
    autoscale: str | None = Field(default=None, description="MIN:MAX replicas, scaled on ongoing requests")
    experts_per_replica: int = Field(default=4, ge=1, description="experts one replica advertises as held (routing)")
    max_memory: str | None = None
    max_batch: int = Field(default=8, ge=1)
    max_queue: int = Field(default=256, ge=1)
    max_model_len: int | None = None
    dtype: str = "auto"
    backend: str = "auto"
    threads: int = Field(default=1, ge=1, description="torch threads (and Ray CPUs) per replica")
    max_ongoing_requests: int | None = Field(default=None, ge=1,
                                             description="requests one replica takes at once (default 2 x max_batch)")
    api_key: str | list[str] | None = Field(default=None, description="inference key, or several")
    admin_key: str | None = Field(default=None, description="admin key (admin changes are refused on Ray Serve)")
    router: bool = True
    cache_dir: str | None = Field(default=None, description="where URIs are copied (default ~/.cache/meswitch)")

    @field_validator("autoscale")
    @classmethod
    def _min_max(cls, v):
        if v is not None:
            lo, sep, hi = v.partition(":")
            if not sep or not lo.isdigit() or not hi.isdigit() or not 0 <= int(lo) <= int(hi) or int(hi) < 1:
                raise ValueError(f"autoscale expects MIN:MAX with 0 <= MIN <= MAX and MAX >= 1, got {v!r}")
        return v


# ----- where the bundle lives ------------------------------------------------------------------------
def is_uri(location: str) -> bool:
    return "://" in location


def local_copy(location: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local path for `location`: the path itself (a shared file system), or for a URI a copy
    made once per machine with fsspec. Processes on one machine share the copy: the first copies
    under a file lock into a temporary folder and renames it into place; the others wait for it."""
    if not is_uri(location):
        return Path(location)
    import fsspec

    cache = Path(cache_dir or Path.home() / ".cache" / "meswitch") / "uris"
    cache.mkdir(parents=True, exist_ok=True)
    dest = cache / hashlib.sha256(location.encode()).hexdigest()[:24]
    with open(cache / (dest.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if dest.is_dir():
            return dest
        fs, path = fsspec.core.url_to_fs(location)
        if not fs.exists(path):
            raise BundleError(f"{location}: not found")
        tmp = Path(tempfile.mkdtemp(dir=cache, prefix=dest.name + ".part-"))
        try:
            fs.get(path.rstrip("/") + "/", str(tmp) + "/", recursive=True)
            tmp.rename(dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("copied %s to %s", location, dest)
        return dest


# ----- a replica: one Switch ------------------------------------------------------------------------
class SwitchReplica:
    def __init__(self, args: dict, coordinator):
        from ..runtime import Switch

        cfg = ServeArgs(**args)
        bundle = local_copy(cfg.bundle, cfg.cache_dir)
        base = local_copy(cfg.base, cfg.cache_dir) if cfg.base else None
        self.switch = Switch.load(bundle, base, dtype=cfg.dtype, max_memory=cfg.max_memory, max_batch=cfg.max_batch,
                                  max_queue=cfg.max_queue, max_model_len=cfg.max_model_len, threads=cfg.threads,
                                  backend=cfg.backend)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.coordinator = coordinator

        async def hold(expert: str) -> str:
            # Serve records the experts a replica holds (LRU of experts_per_replica) and routes by
            # them; the Switch's store itself loads and evicts the deltas under the memory budget.
            return expert

        self._hold = serve.multiplexed(max_num_models_per_replica=cfg.experts_per_replica)(hold)
        self._stop = threading.Event()
        self._reporter = threading.Thread(target=self._report_loop, name="meswitch-report", daemon=True)
        self._reporter.start()

    def snapshot(self) -> dict:
        s = self.switch.stats()
        rss = process_resident_bytes()
        if rss is not None:
            s["process_resident_bytes"] = rss
        return s

    def _report_loop(self) -> None:
        while not self._stop.wait(REPORT_INTERVAL_S):
            try:
                self.coordinator.report.remote(self.replica, self.snapshot())
            except Exception as e:  # the coordinator restarting: report again next time
                log.warning("stats report failed: %s", e)

    async def generate(self, prompt, expert: str | None, params: SamplingParams):
        """Stream ("replica", id) once the Switch accepted the request, then ("text", piece)...,
        then ("done", Completion). Refusals (RequestError, QueueFullError) raise before the first
        item. Cancelling the stream cancels the request."""
        if expert is not None and expert in self.switch.bundle.experts:
            await self._hold(expert)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def on_update(req, delta, done):
            loop.call_soon_threadsafe(queue.put_nowait, (delta, done))

        req = self.switch.submit(prompt, expert, on_update=on_update, params=params)
        try:
            yield ("replica", self.replica)
            while True:
                delta, done = await queue.get()
                pieces = [delta]
                while done is None and not queue.empty():  # send what piled up as one item
                    delta, done = queue.get_nowait()
                    pieces.append(delta)
                text = "".join(pieces)
                if text:
                    yield ("text", text)
                if done is not None:
                    yield ("done", done)
                    return
        finally:
            if not req.done:
                req.cancel()

    def __del__(self):
        self._stop.set()
        try:
            self.coordinator.forget.remote(self.replica)
        except Exception:
            pass
        self.switch.close()


# ----- the ingress side --------------------------------------------------------------------------------
class RemoteRequest:
    """The ingress's view of a request running on a replica (what the app uses of a Request)."""

    def __init__(self):
        self.result: Completion | None = None
        self.response_headers: dict[str, str] = {}
        self.stream = None
        self.task: asyncio.Task | None = None

    @property
    def done(self) -> bool:
        return self.result is not None

    def cancel(self) -> None:
        if self.stream is not None:
            self.stream.cancel()
        if self.task is not None:
            self.task.cancel()


class RemoteSwitch:
    """The Switch's serving surface (what create_app uses) over SwitchReplica deployments."""

    def __init__(self, bundle: Bundle, replicas, coordinator, max_retries: int = 2, accept_timeout_s: float = 60.0):
        self.bundle, self.replicas, self.coordinator = bundle, replicas, coordinator
        self.max_retries, self.accept_timeout_s = max_retries, accept_timeout_s

    @property
    def experts(self) -> list[str]:
        return sorted(self.bundle.experts)

    def description(self, name: str) -> str:
        return self.bundle.entry(name).get("description") or ""

    def sync_bundle(self) -> set[str]:
        """The deployment serves the bundle it started with (replicas hold their own copies):
        changes to the bundle take effect on redeploy, so there is nothing to take again."""
        return set()

    def add_expert(self, *args, **kw) -> None:
        raise UnsupportedOperation("adding experts at run time is not supported on Ray Serve: add the expert to the bundle "
                          "(`meswitch compress --out BUNDLE`) and redeploy")

    def remove_expert(self, *args, **kw) -> None:
        raise UnsupportedOperation("removing experts at run time is not supported on Ray Serve: remove it from the bundle "
                          "and redeploy")

    # ----- requests ------------------------------------------------------------------------------
    async def submit(self, prompt, expert: str | None = None, on_update=None, params: SamplingParams | None = None):
        params = params or SamplingParams()
        req = RemoteRequest()
        await self._open(req, prompt, expert, params)
        req.task = asyncio.create_task(self._pump(req, prompt, expert, params, on_update))
        return req

    async def _open(self, req: RemoteRequest, prompt, expert, params) -> None:
        """Send the request to a replica (one holding the expert, if any) and wait until its Switch
        accepted it. The Switch's refusals are raised here, as the single-process server raises them."""
        handle = self.replicas.options(stream=True) if expert is None else \
            self.replicas.options(stream=True, multiplexed_model_id=expert)
        last: Exception | None = None
        for _ in range(self.max_retries + 1):
            stream = handle.generate.remote(prompt, expert, params)
            try:
                kind, replica = await asyncio.wait_for(stream.__anext__(), self.accept_timeout_s)
            except RayTaskError as e:  # raised by the replica's Switch: RequestError, QueueFullError...
                raise e.cause from None
            except BackPressureError as e:
                raise NoReplicaError(f"every replica is busy ({e})") from None
            except asyncio.TimeoutError:
                stream.cancel()
                raise NoReplicaError(f"no replica accepted the request within {self.accept_timeout_s:.0f} s") from None
            except REPLICA_GONE as e:
                log.warning("replica gone before accepting a request (%s); trying another", type(e).__name__)
                last = e
                continue
            req.stream = stream
            req.response_headers = {REPLICA_HEADER: replica}
            return
        raise NoReplicaError(f"no replica could take the request ({type(last).__name__})")

    async def _pump(self, req: RemoteRequest, prompt, expert, params: SamplingParams, on_update) -> None:
        """Hand the replica's text to on_update; on a dead replica retry (see the module doc)."""
        sent = ""       # text handed to on_update
        replay = None   # after a retry: the regenerated text while it is still within `sent`
        retries = 0

        def finish(result: Completion) -> None:
            req.result = result
            if on_update is not None:
                on_update(req, "", result)

        def fail(message: str) -> None:
            log.warning("request failed: %s", message)
            finish(Completion(0, expert, "", [], "error", 0, 0, message, exception=ReplicaGoneError(message)))

        while True:
            try:
                async for kind, value in req.stream:
                    if kind == "text":
                        if replay is not None:
                            replay += value
                            if not (sent.startswith(replay) or replay.startswith(sent)):
                                return fail("the retried generation differs from the text already sent")
                            if len(replay) <= len(sent):
                                continue
                            value, replay = replay[len(sent):], None
                        sent += value
                        if on_update is not None:
                            on_update(req, value, None)
                    elif kind == "done":
                        if replay is not None and replay != sent:
                            return fail("the retried generation differs from the text already sent")
                        return finish(value)
                return fail("the replica's stream ended without a result")
            except asyncio.CancelledError:
                raise
            except REPLICA_GONE as e:
                reproducible = params.temperature == 0 or params.seed is not None
                if retries >= self.max_retries or (sent and not reproducible):
                    why = "retries exhausted" if retries >= self.max_retries else \
                        "text was already sent and sampling is not reproducible (temperature > 0, no seed)"
                    return fail(f"the replica serving this request stopped ({type(e).__name__}); not retried: {why}")
                retries += 1
                log.warning("replica %s gone mid-request (%s); retrying on another replica",
                            req.response_headers.get(REPLICA_HEADER), type(e).__name__)
                try:
                    await self._open(req, prompt, expert, params)
                except Exception as e2:
                    return fail(f"the replica serving this request stopped and no other took it ({e2})")
                replay = "" if sent else None
            except Exception as e:
                log.exception("request failed on replica %s", req.response_headers.get(REPLICA_HEADER))
                return fail(f"generation failed on a replica ({type(e).__name__})")

    # ----- stats (called off the event loop: /health and /metrics run them in a threadpool) -------------
    def replica_stats(self) -> dict[str, dict]:
        return self.coordinator.replica_stats.remote().result(timeout_s=10)

    def stats(self) -> dict:
        """Totals over the replicas (residency: the warmest tier of each expert on any replica)."""
        per = self.replica_stats()
        total: dict = {"replicas": len(per), "residency": {}}
        order = {"disk": 0, "packed": 1, "hot": 2}
        for s in per.values():
            for k, v in s.items():
                if k == "residency":
                    for name, tier in v.items():
                        if order[tier] >= order[total["residency"].get(name, "disk")]:
                            total["residency"][name] = tier
                elif isinstance(v, (int, float)):
                    total[k] = total.get(k, 0) + v
        for k in ("queue_depth", "running"):
            total.setdefault(k, 0)
        return total


class Ingress:
    """The HTTP entry: create_app over a RemoteSwitch (built in the replica, at start-up)."""

    def __init__(self, args: dict, replicas, coordinator):
        from .cli import load_bundle_router

        cfg = ServeArgs(**args)
        bundle = Bundle.open(local_copy(cfg.bundle, cfg.cache_dir))
        self.switch = RemoteSwitch(bundle, replicas, coordinator)
        self.router = load_bundle_router(bundle) if cfg.router else None
        self.api_key, self.admin_key = cfg.api_key, cfg.admin_key
        self.coordinator = coordinator

    def __serve_build_asgi_app__(self):
        return create_app(self.switch, router=self.router, api_key=self.api_key, admin_key=self.admin_key,
                          conversations=SharedConversationMemory(self.coordinator))


# ----- the application ------------------------------------------------------------------------------
def build_app(cfg: ServeArgs):
    """The Serve application: Ingress -> SwitchReplica x N, both -> Coordinator."""
    args = cfg.model_dump()
    coordinator = serve.deployment(Coordinator, name="Coordinator", num_replicas=1, max_ongoing_requests=1000,
                                   ray_actor_options={"num_cpus": 0}).bind()
    opts = dict(name="SwitchReplica", ray_actor_options={"num_cpus": cfg.threads},
                max_ongoing_requests=cfg.max_ongoing_requests or 2 * cfg.max_batch, max_queued_requests=cfg.max_queue)
    if cfg.autoscale:
        lo, hi = (int(x) for x in cfg.autoscale.split(":"))
        opts["autoscaling_config"] = {"min_replicas": lo, "max_replicas": hi, "initial_replicas": max(lo, 1),
                                      "target_ongoing_requests": cfg.max_batch}
    else:
        opts["num_replicas"] = cfg.replicas
    replicas = serve.deployment(SwitchReplica, **opts).bind(args, coordinator)
    ingress = serve.deployment(serve.ingress()(Ingress), name="Ingress", num_replicas=1, max_ongoing_requests=1000,
                               ray_actor_options={"num_cpus": 0})
    return ingress.bind(args, replicas, coordinator)


def app_builder(args: dict):
    """Entry point for `serve run meswitch.server.ray_serve:app_builder key=value ...` and Serve
    config files (import_path + args): the keys are ServeArgs's fields."""
    return build_app(ServeArgs(**args))


def run(cfg: ServeArgs, host: str = "127.0.0.1", port: int = 8000, blocking: bool = True):
    """Deploy on the Ray cluster at $RAY_ADDRESS (or a local one started here) and serve HTTP on
    host:port; with blocking, until interrupted (then the application is deleted)."""
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    handle = serve.run(build_app(cfg), name=APP_NAME, route_prefix="/")
    if not blocking:
        return handle

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)  # a plain kill also deletes the application (and a local Ray)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.delete(APP_NAME)
    return None
