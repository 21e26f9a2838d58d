"""HTTP serving of adaptive inference: FastAPI + uvicorn, one model worker, Prometheus metrics.

Requests only validate and enqueue; one worker thread owns the model and gathers the texts of
concurrent requests into micro-batches (``max_batch`` texts, or whatever arrived within
``max_wait_ms`` of the oldest). Two ways to batch:

- ``request``: each micro-batch runs `adaptive_predict` to the end, thinning as rows leave (what
  batched `predict` does);
- ``segment``: rows that go on past an exit wait in that exit's queue and are merged with other
  micro-batches' rows that reached it (`EarlyExitModel.merge`, `Cascade.merge`), so under load every
  segment runs on full batches. A queue runs when it holds ``max_batch`` rows, when its oldest row has
  waited ``max_wait_ms``, or when the worker has nothing else to do; deeper queues go first, since
  they finish requests.

A row decides on its own logits alone, so both give the answers of `predict` one text at a time.

With ``--workers N`` uvicorn runs N such processes on one socket, each with its own model (and ONNX
sessions) on its share of the threads; /metrics sums them (prometheus_client's multiprocess mode).

A hostile or broken client costs little: a body over ``max_body_bytes`` is refused on its
``Content-Length`` before it is read (and cut off while streaming when it has none), a body must
arrive within ``body_timeout_s``, a connection whose next request's headers have not all come within
``idle_timeout_s`` is closed, and past ``max_connections`` open connections requests get 503.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
import socket
import tempfile
import threading
import time
from collections import deque
from contextlib import asynccontextmanager
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from frugalnlp.backbones.base import used_length
from frugalnlp.dev_choice import OperatingTarget
from frugalnlp.early_exit.policies import exit_step, heads_run
from frugalnlp.early_exit.runner import length_runs
from frugalnlp.errors import FrugalError
from frugalnlp.predict import Predictor, check_finite
from frugalnlp.serve_request import CLIENT_CLOSED, RequestError, ServeSettings, parse_request, read_body


class Metrics:
    """The server's Prometheus metrics, in their own registry (names prefixed ``frugalnlp_``)."""

    def __init__(self, exit_layers: list[int], max_batch: int) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("frugalnlp_requests", "HTTP /predict requests by status code", ["code"], registry=r)
        self.texts = Counter("frugalnlp_texts", "texts classified", registry=r)
        self.exits = Histogram("frugalnlp_exit_layer", "layer each text left after", buckets=exit_layers,
                               registry=r)
        self.latency = Histogram("frugalnlp_request_latency_seconds", "time from request to answer",
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10), registry=r)
        sizes = sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, max_batch})
        self.batch_rows = Histogram("frugalnlp_batch_size", "rows per model run, by the exit it ends at",
                                    ["exit_layer"], buckets=[s for s in sizes if s <= max_batch], registry=r)
        # with worker processes: the sum over the live ones
        self.queued = Gauge("frugalnlp_queued_texts", "texts waiting for the model worker", registry=r,
                            multiprocess_mode="livesum")

    def exposition(self) -> bytes:
        """The metrics in Prometheus' text format: this process's, or with worker processes (`serve`'s
        ``workers``) every worker's summed, from prometheus_client's shared folder."""
        if os.environ.get(MULTIPROCESS_METRICS):
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)


@dataclass
class Job:
    """One request's texts; the worker fills ``results`` and resolves ``future`` on the request's loop."""

    texts: list[str]
    pairs: list[str] | None
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    results: list[dict | None] = field(default_factory=list)
    remaining: int = 0
    cancelled: bool = False  # its client left: rows not yet run are dropped

    def __post_init__(self) -> None:
        self.results = [None] * len(self.texts)
        self.remaining = len(self.texts)


@dataclass
class Group:
    """Rows standing at the same exit: the model's state for them, the policy's, and whose they are."""

    state: Any  # the model's segment state: State (early exit), Tokens (cascade), an export's NumPy tuples
    policy_state: np.ndarray | None
    owners: list[tuple[Job, int]]
    since: float


class ModelWorker:
    """The one thread that runs the model; requests `submit` jobs from the event loop."""

    def __init__(self, predictor: Predictor, settings: ServeSettings, metrics: Metrics) -> None:
        self.predictor, self.settings, self.metrics = predictor, settings, metrics
        self.model, self.policy = predictor.model, predictor.policy
        self.temperatures = self.model.temperatures  # a property that builds its list: read once, not per segment
        self.heads = heads_run(self.policy, self.model.num_exits)
        self.layers_to_exit = self.model.layers_to_exit(self.heads)
        self.last = self.model.num_exits - 1
        self.inbox: deque[tuple[Job, int, float]] = deque()  # texts not started: (job, row, arrival)
        self.queues: list[deque[Group]] = [deque() for _ in range(self.model.num_exits)]  # [0] unused
        self.queued = 0  # texts anywhere in the worker
        self.wake = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="frugalnlp-model-worker", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Finish every text already submitted, then end the thread."""
        with self.wake:
            self.stopping = True
            self.wake.notify()
        self.thread.join()

    def submit(self, job: Job) -> None:
        with self.wake:
            if self.queued + len(job.texts) > self.settings.max_queue:
                raise RequestError(503, "texts", f"the server is overloaded ({self.queued} texts waiting); retry later")
            now = time.perf_counter()
            self.inbox.extend((job, i, now) for i in range(len(job.texts)))
            self.queued += len(job.texts)
            self.metrics.queued.set(self.queued)
            self.wake.notify()

    def cancel(self, job: Job) -> None:
        """The job's client has left: its rows still in the inbox are dropped now, those past an exit when their
        queue is next taken (`_live`); rows in a segment already running finish unseen."""
        with self.wake:
            job.cancelled = True
            waiting = len(self.inbox)
            self.inbox = deque(entry for entry in self.inbox if entry[0] is not job)
            self._forget(waiting - len(self.inbox))

    def _forget(self, rows: int) -> None:
        """``rows`` texts leave the worker unanswered (called under the lock)."""
        self.queued -= rows
        self.metrics.queued.set(self.queued)

    def _live(self, group: Group) -> Group | None:
        """The group without the rows of cancelled jobs; None when none is left (called under the lock)."""
        keep = [i for i, (job, _) in enumerate(group.owners) if not job.cancelled]
        if len(keep) == len(group.owners):
            return group
        self._forget(len(group.owners) - len(keep))
        return self._subset(group, np.asarray(keep, dtype=np.int64)) if keep else None

    # ---------------------------------------------------------------------------------- worker thread

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        with self.model.inference_context():  # this thread runs nothing but the model
            self._serve()

    def _serve(self) -> None:
        while True:
            with self.wake:
                task = self._next_task()
                while task is None:
                    if self.stopping and self.queued == 0:
                        return
                    self.wake.wait(timeout=self._wait_time())
                    task = self._next_task()
            run, rows = task
            try:
                run()
            except Exception as error:  # a failed batch fails its requests, never the server
                self._fail(rows, error)

    def _wait_time(self) -> float | None:
        """Seconds until the inbox's oldest text has waited ``max_wait_ms`` (None: wait for a submit)."""
        if not self.inbox:
            return None
        return max(self.inbox[0][2] + self.settings.max_wait_ms / 1000 - time.perf_counter(), 0.0)

    def _next_task(self) -> tuple[Callable[[], None], list[tuple[Job, int]]] | None:
        """What to run next and the rows it holds (called under the lock), or None to wait."""
        now = time.perf_counter()
        wait = self.settings.max_wait_ms / 1000
        full = self.settings.max_batch
        flushing = self.stopping
        for e in range(self.last, 0, -1):  # a deep queue that is full or has waited long enough
            queue = self.queues[e]
            if queue and (flushing or now - queue[0].since >= wait or sum(len(g.owners) for g in queue) >= full):
                return self._take_segment(e)
        if self.inbox and (flushing or len(self.inbox) >= full or now - self.inbox[0][2] >= wait):
            rows = [self.inbox.popleft()[:2] for _ in range(min(full, len(self.inbox)))]
            return (lambda: self._start(rows)), rows
        for e in range(self.last, 0, -1):  # nothing else to do: no reason to keep rows waiting
            if self.queues[e]:
                return self._take_segment(e)
        return None

    def _take_segment(self, e: int) -> tuple[Callable[[], None], list[tuple[Job, int]]]:
        """Pop up to ``max_batch`` rows of queue ``e`` (splitting a group if needed) into one task."""
        queue, room, groups = self.queues[e], self.settings.max_batch, []
        while queue and room:
            group = self._live(queue.popleft())
            if group is None:
                continue
            if len(group.owners) > room:
                keep = np.arange(room)
                rest = np.arange(room, len(group.owners))
                queue.appendleft(self._subset(group, rest))
                group = self._subset(group, keep)
            groups.append(group)
            room -= len(group.owners)
        if not groups:  # every row waiting there belonged to clients that left
            return (lambda: None), []
        return (lambda: self._advance_buckets(e, self._merge(groups))), [owner for g in groups for owner in g.owners]

    def _subset(self, group: Group, rows: np.ndarray) -> Group:
        return Group(self.model.keep_rows(group.state, rows),
                     None if group.policy_state is None else group.policy_state[rows],
                     [group.owners[i] for i in rows.tolist()], group.since)

    def _merge(self, groups: list[Group]) -> Group:
        if len(groups) == 1:
            return groups[0]
        states = [g.policy_state for g in groups]
        return Group(self.model.merge([g.state for g in groups]),
                     None if states[0] is None else np.concatenate(states),
                     [owner for g in groups for owner in g.owners], min(g.since for g in groups))

    def _buckets(self, attention_mask: torch.Tensor | np.ndarray) -> list[np.ndarray]:
        """Rows [n] sorted by length, in runs of ``length_bucket`` rows or ``max_tokens`` padded tokens."""
        return length_runs(attention_mask, self.settings.length_bucket, self.settings.max_tokens)

    def _start(self, rows: list[tuple[Job, int]]) -> None:
        """Tokenise a micro-batch and run it: to the end (request batching) or one segment (segment)."""
        jobs = [job for job, _ in rows]
        texts = [job.texts[i] for job, i in rows]
        pairs = None if jobs[0].pairs is None else [job.pairs[i] for job, i in rows]
        p = self.predictor
        batch = p.tokenizer(texts, pairs, truncation=True, max_length=p.max_length, padding=True,
                            return_tensors="pt")
        tensors = [batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids")]
        for bucket in self._buckets(batch["attention_mask"]):
            bucket = torch.from_numpy(bucket)
            length = used_length(batch["attention_mask"][bucket])
            ids, mask, types = (None if t is None else t[bucket, :length] for t in tensors)
            owners = [rows[i] for i in bucket.tolist()]
            if self.settings.batching == "request":
                self.metrics.batch_rows.labels(str(self.model.exit_layers[-1])).observe(len(owners))
                pred = self.model.predict(ids, mask, types, policy=self.policy)
                self._deliver(owners, pred.labels.numpy(), pred.confidence.numpy(), pred.exit_index.numpy())
            else:
                state, policy_state = self.model.start(ids, mask, types), self.policy.start(len(owners))
                self._advance(0, Group(state, policy_state, owners, time.perf_counter()))

    def _advance_buckets(self, e: int, group: Group) -> None:
        buckets = self._buckets(group.state.attention_mask)
        if len(buckets) == 1:
            self._advance(e, group)
            return
        for bucket in buckets:
            self._advance(e, self._subset(group, bucket))

    def _advance(self, e: int, group: Group) -> None:
        """Run segment ``e`` on a group; rows that leave are answered, the others queue at exit e+1."""
        self.metrics.batch_rows.labels(str(self.model.exit_layers[e])).observe(len(group.owners))
        model = self.model
        state, logits = model.advance(e, group.state, head=self.heads[e])
        if logits is None:
            self._enqueue(e + 1, Group(state, group.policy_state, group.owners, time.perf_counter()))
            return
        step = exit_step(self.policy, e, model.num_exits, logits, self.temperatures[e], group.policy_state)
        going = np.flatnonzero(step.leave)
        self._deliver([group.owners[i] for i in going.tolist()], step.logits[going].argmax(-1),
                      step.probs[going].max(-1), np.full(len(going), e))
        stay = np.flatnonzero(~step.leave)
        if len(stay):
            rest = Group(state, step.state, group.owners, time.perf_counter())
            self._enqueue(e + 1, self._subset(rest, stay) if len(stay) < len(group.owners) else rest)

    def _enqueue(self, e: int, group: Group) -> None:
        with self.wake:
            self.queues[e].append(group)

    def _deliver(self, rows: list[tuple[Job, int]], labels: np.ndarray, confidence: np.ndarray,
                 exit_index: np.ndarray) -> None:
        """Answer rows: their ``labels``, ``confidence`` and ``exit_index`` [rows] (NumPy)."""
        if not rows:
            return
        check_finite(confidence)  # raised here, the batch's requests get a 500 in the error shape
        p, layers_to_exit = self.predictor, self.layers_to_exit
        finished = []
        for (job, i), label, conf, e in zip(rows, labels.tolist(), confidence.tolist(), exit_index.tolist()):
            job.results[i] = {"label": p.id2label[label], "confidence": round(conf, 6),
                              "exit_layer": p.exit_layers[e], "layers_run": layers_to_exit[e]}
            self.metrics.exits.observe(p.exit_layers[e])
            job.remaining -= 1
            if job.remaining == 0:
                finished.append(job)
        self.metrics.texts.inc(len(rows))
        with self.wake:
            self.queued -= len(rows)
            self.metrics.queued.set(self.queued)
        for job in finished:
            job.loop.call_soon_threadsafe(_resolve, job.future, job.results, None)

    def _fail(self, rows: list[tuple[Job, int]], error: Exception) -> None:
        """A model run raised: its requests get the error (their other rows finish unseen)."""
        with self.wake:
            self.queued -= len(rows)
            self.metrics.queued.set(self.queued)
        for job in {id(job): job for job, _ in rows}.values():
            job.loop.call_soon_threadsafe(_resolve, job.future, None, error)


async def answer_unless_client_leaves(request: Request, job: Job, worker: ModelWorker) -> list[dict]:
    """The job's answers; starlette's ClientDisconnect as soon as the client closes the connection, its rows
    cancelled in the worker (a client that sent its body and left is not served for nobody)."""
    left = asyncio.ensure_future(_client_left(request))
    try:
        await asyncio.wait({job.future, left}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        left.cancel()
    if not job.future.done():
        worker.cancel(job)
        job.future.cancel()
        raise ClientDisconnect()
    return job.future.result()


async def _client_left(request: Request) -> None:
    """Returns once the ASGI server reports the client gone (after the body, ``receive`` waits for that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _resolve(future: asyncio.Future, result: Any, error: Exception | None) -> None:
    if future.done():  # the client went away
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def create_app(predictor: Predictor, settings: ServeSettings | None = None, run_name: str = "", workers: int = 1):
    """The FastAPI app: POST /predict, GET /healthz, GET /metrics. The worker lives with the app; ``workers``:
    how many processes serve this socket (`serve`), for /healthz."""
    settings = settings or ServeSettings()
    metrics = Metrics(predictor.exit_layers, settings.max_batch)
    worker = ModelWorker(predictor, settings, metrics)
    point = predictor.operating_point
    operating = None if point is None else {"saved": predictor.operating_point_saved, **point.to_dict()}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        yield
        worker.stop()  # after uvicorn has finished the requests in flight

    app = FastAPI(title="frugalnlp", lifespan=lifespan)
    app.state.worker = worker

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> Response:
        """FastAPI's own errors (unknown path, wrong method) in the one error shape."""
        return JSONResponse({"error": str(error.detail), "field": None}, status_code=error.status_code,
                            headers=error.headers)

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        start = time.perf_counter()
        headers = None
        try:
            texts, pairs = parse_request(await read_body(request, settings), predictor.is_pair, settings)
            loop = asyncio.get_running_loop()
            job = Job(texts, pairs, loop, loop.create_future())
            worker.submit(job)
            results = await answer_unless_client_leaves(request, job, worker)
            status, content = 200, {"predictions": results}
            response = JSONResponse(content)  # refuses NaN and infinity: a 500 below, never invalid JSON
        except RequestError as e:
            status, content = e.status, {"error": e.message, "field": e.field}
            headers = {"connection": "close"} if e.close else None
        except ClientDisconnect:  # nobody is left to answer: the client's doing, not a server error
            status, content = CLIENT_CLOSED, {"error": "the client closed the connection mid-request", "field": None}
        except Exception as e:  # the model failed: say so, keep serving
            status, content = 500, {"error": f"prediction failed: {type(e).__name__}: {e}", "field": None}
        metrics.requests.labels(str(status)).inc()
        metrics.latency.observe(time.perf_counter() - start)
        return response if status == 200 else JSONResponse(content, status_code=status, headers=headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> Response:
        """Anything else that escapes a route: still the one error shape, counted by its real status."""
        metrics.requests.labels("500").inc()
        return JSONResponse({"error": f"internal error: {type(error).__name__}", "field": None}, status_code=500)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "run": run_name, "threshold": predictor.threshold,
                "operating_point": operating, "batching": settings.batching, "workers": workers, "pid": os.getpid(),
                "exit_layers": predictor.exit_layers, "pair": predictor.is_pair}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return app


def bind_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (not yet listening), or FrugalError naming the port when it is taken."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise FrugalError(f"--host {host}: {e.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does; a live listener still blocks it
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise FrugalError(f"--port {port} is already in use on {host}; stop what listens there or choose "
                              "another --port") from None
        raise FrugalError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


def guarded_protocol(idle_timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol, closing a connection whose next request's headers have not all come within
    ``idle_timeout_s``: new connections that send nothing and slow headers, which uvicorn's own keep-alive
    time-out (armed only after a response) never closes."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    except ImportError:  # uvicorn without its [standard] extra
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base

    class GuardedProtocol(Base):
        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            self._arm_idle_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_idle_timer()

        def _arm_idle_timer(self) -> None:
            self.loop.call_later(idle_timeout_s, self._close_if_idle, self.cycle)

        def _close_if_idle(self, cycle) -> None:
            # A new request (headers complete) replaces the cycle; one still being answered is not idle.
            idle = self.cycle is cycle and (cycle is None or cycle.response_complete)
            if idle and not self.transport.is_closing():
                self.transport.close()

    return GuardedProtocol


def serve(run: str, host: str = "127.0.0.1", port: int = 8000, settings: ServeSettings | None = None,
          threshold: float | list[float] | None = None, policy: str | None = None, trust_pickle: bool = False,
          target: OperatingTarget | None = None, ensemble: bool = False, workers: int = 1) -> None:
    """Load ``run`` and serve it until SIGINT/SIGTERM (in-flight requests are finished first).

    The operating point is ``threshold``, or one chosen on dev for ``target`` (`OperatingTarget`), or the
    run's saved one; ``ensemble`` fits an exit ensemble on dev; see `Predictor`. ``workers`` > 1: that many
    uvicorn worker processes share the socket, each with its own model (and ONNX sessions) on its share of
    torch's threads (`worker_app`); the metrics are summed over them.
    """
    settings = settings or ServeSettings()
    Predictor.check_args(threshold, policy, batch_size=settings.max_batch)
    if not (isinstance(workers, int) and workers >= 1):
        raise FrugalError(f"--workers {workers!r} must be a whole number >= 1")
    sock = bind_socket(host, port)  # a taken port fails before the model loads and dev is scored
    try:  # with workers too: a run that cannot be served fails here, in one line, before any worker starts
        predictor = Predictor(run, threshold, policy, batch_size=settings.max_batch, trust_pickle=trust_pickle,
                              target=target, ensemble=ensemble)
    except BaseException:
        sock.close()
        raise
    port = sock.getsockname()[1]
    shown = predictor.threshold if isinstance(predictor.threshold, list) else f"{predictor.threshold:g}"
    threads = max(1, torch.get_num_threads() // workers)
    print(f"serving {run} on http://{host}:{port} ({predictor.policy_name} policy, threshold {shown}, "
          f"{settings.batching} batching, max batch {settings.max_batch}, max wait {settings.max_wait_ms:g} ms"
          + (f", {workers} worker processes of {threads} thread(s)" if workers > 1 else "") + ")", flush=True)
    options = dict(log_level="warning", access_log=False, timeout_keep_alive=settings.idle_timeout_s,
                   limit_concurrency=settings.max_connections)
    if workers == 1:
        # uvicorn handles SIGTERM (stop accepting, finish in-flight requests, stop the worker) and then re-raises
        # it to the handler it found: a no-op one makes that graceful stop exit 0 rather than die by the signal.
        signal.signal(signal.SIGTERM, lambda signum, frame: None)
        config = uvicorn.Config(create_app(predictor, settings, run_name=str(run)),
                                http=guarded_protocol(settings.idle_timeout_s), **options)
        uvicorn.Server(config).run(sockets=[sock])
        return
    del predictor  # each worker loads its own
    from uvicorn.supervisors import Multiprocess

    os.environ[WORKER_ARGS] = json.dumps({
        "run": str(run), "threshold": threshold, "policy": policy, "trust_pickle": trust_pickle, "ensemble": ensemble,
        "target": None if target is None else asdict(target), "settings": asdict(settings), "threads": threads,
        "workers": workers})
    with tempfile.TemporaryDirectory(prefix="frugalnlp-metrics-") as metrics:
        os.environ[MULTIPROCESS_METRICS] = metrics  # read by prometheus_client as each worker imports it
        # uvicorn spawns the workers, which import the app and the protocol by name (a spawned process gets them
        # pickled, and an app holding a model does not pickle); it stops them gracefully on SIGTERM/SIGINT
        config = uvicorn.Config("frugalnlp.serving:worker_app", factory=True, workers=workers,
                                http="frugalnlp.serving:WorkerProtocol", **options)
        Multiprocess(config, sockets=[sock]).run()


WORKER_ARGS = "FRUGALNLP_SERVE_WORKER"  # `serve`'s arguments, as JSON, for its worker processes
MULTIPROCESS_METRICS = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's folder for metrics summed over processes


def worker_app() -> FastAPI:
    """The app of one worker process of `serve` with ``workers`` > 1 (uvicorn's app factory): the run loaded
    with `serve`'s arguments on this worker's share of the threads."""
    args = json.loads(os.environ[WORKER_ARGS])
    torch.set_num_threads(args["threads"])
    settings = ServeSettings(**args["settings"])
    target = None if args["target"] is None else OperatingTarget(**args["target"])
    predictor = Predictor(args["run"], args["threshold"], args["policy"], batch_size=settings.max_batch,
                          trust_pickle=args["trust_pickle"], target=target, ensemble=args["ensemble"])
    return create_app(predictor, settings, run_name=args["run"], workers=args["workers"])


def __getattr__(name: str) -> Any:
    """``WorkerProtocol``: a worker process's HTTP protocol (`guarded_protocol` with `serve`'s idle time-out),
    which uvicorn imports by name in each worker."""
    if name == "WorkerProtocol":
        return guarded_protocol(json.loads(os.environ[WORKER_ARGS])["settings"]["idle_timeout_s"])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
