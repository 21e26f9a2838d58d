"""The real HTTP server (uvicorn in a subprocess) driven with httpx."""

import asyncio
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import torch
import pytest
from conftest import cli_process, run_cli
from prometheus_client.parser import text_string_to_metric_families

from frugalnlp.loadtest import ServerProcess
from frugalnlp.predict import Predictor
from frugalnlp.tasks import load_task


class Server(ServerProcess):
    def __init__(self, run, *args):
        super().__init__(run, *args, threads=1)  # tests run beside other work: no oversubscribed cores

    def metrics(self) -> dict[tuple, float]:
        text = httpx.get(f"{self.url}/metrics").text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}


def post_all(url: str, requests: list[list[str]]) -> list[httpx.Response]:
    """Send every request at once and wait for all the answers."""
    async def send_all():
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            return await asyncio.gather(*(client.post("/predict", json={"texts": r}) for r in requests))

    return asyncio.run(send_all())


@pytest.fixture(scope="module")
def texts():
    return load_task("mr").test.texts[:40]


@pytest.fixture(scope="module")
def threshold(tiny_run, texts):
    """A threshold at which the tiny run's texts leave at more than one exit."""
    confidence = sorted(p["confidence"] for p in Predictor(tiny_run, threshold=0.0)(texts))
    for t in (confidence[len(confidence) // 2], confidence[len(confidence) // 4], 0.55, 0.51):
        predictor = Predictor(tiny_run, threshold=t)
        if len({p["exit_layer"] for p in predictor(texts)}) == 3:
            return t
    return confidence[len(confidence) // 2]


@pytest.mark.parametrize("batching", ["segment", "request"])
def test_concurrent_requests_get_the_answers_of_predict_one_text_at_a_time(tiny_run, texts, threshold, batching):
    single = Predictor(tiny_run, threshold=threshold, batch_size=1)
    expected = [single([t])[0] for t in texts]
    assert len({e["exit_layer"] for e in expected}) > 1
    requests = [texts[i:i + 2] for i in range(0, len(texts), 2)]  # 20 requests
    server = Server(tiny_run, "--threshold", str(threshold), "--batching", batching, "--max-batch", "8",
                    "--max-wait-ms", "50")
    try:
        responses = post_all(server.url, requests)
        assert [r.status_code for r in responses] == [200] * 20
        got = [p for r in responses for p in r.json()["predictions"]]
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            assert (g["label"], g["exit_layer"], g["layers_run"]) == (e["label"], e["exit_layer"], e["layers_run"])
            assert g["confidence"] == pytest.approx(e["confidence"], abs=1e-5)
        metrics = server.metrics()
        assert metrics[("frugalnlp_texts_total", ())] == len(texts)
        assert metrics[("frugalnlp_requests_total", (("code", "200"),))] == 20
        assert metrics[("frugalnlp_exit_layer_count", ())] == len(texts)
        runs = {labels: v for (name, labels), v in metrics.items() if name == "frugalnlp_batch_size_count"}
        rows = {labels: v for (name, labels), v in metrics.items() if name == "frugalnlp_batch_size_sum"}
        assert sum(runs.values()) < len(requests)  # texts of different requests shared model runs
        if batching == "segment":  # every segment saw the rows that reached it, in fewer runs than requests
            reached = sum(1 for e in expected if e["exit_layer"] >= 2)
            assert rows[(("exit_layer", "2"),)] == reached
    finally:
        assert server.stop() == 0


def _spawned_children(pid: int) -> list[int]:
    """Processes that ``pid`` started with multiprocessing's spawn (uvicorn's workers), from /proc."""
    children = []
    for entry in Path("/proc").iterdir():
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid and "spawn_main" in cmdline:
            children.append(int(entry.name))
    return children


def test_worker_processes_share_the_port_answer_as_predict_and_sum_their_metrics(tiny_run, texts, threshold):
    single = Predictor(tiny_run, threshold=threshold, batch_size=1)
    expected = [(e["label"], e["exit_layer"]) for t in texts for e in single([t])]
    server = Server(tiny_run, "--threshold", str(threshold), "--workers", "2", "--max-wait-ms", "20")
    try:
        answers, pids = [], set()
        for i in range(0, len(texts), 2):
            with httpx.Client(base_url=server.url, timeout=60) as client:  # a new connection: any worker may take it
                response = client.post("/predict", json={"texts": texts[i:i + 2]})
                assert response.status_code == 200
                answers += [(p["label"], p["exit_layer"]) for p in response.json()["predictions"]]
                health = client.get("/healthz").json()
                assert health["workers"] == 2
                pids.add(health["pid"])
        assert answers == expected
        workers = _spawned_children(server.process.pid)
        assert len(workers) == 2 and pids <= set(workers)
        metrics = server.metrics()  # whichever worker answers, the counts are every worker's
        assert metrics[("frugalnlp_texts_total", ())] == len(texts)
        assert metrics[("frugalnlp_requests_total", (("code", "200"),))] == len(texts) // 2
        assert metrics[("frugalnlp_queued_texts", ())] == 0
    finally:
        assert server.stop() == 0
    assert not _spawned_children(server.process.pid) and all(not Path(f"/proc/{pid}").exists() for pid in workers)


def test_bad_requests_get_a_4xx_naming_the_field_and_the_server_keeps_answering(tiny_run):
    server = Server(tiny_run, "--max-texts", "4", "--max-chars", "50")
    bad = [
        (b"{not json", 400, "body"),
        (b'{"texts": ["caf\xe9"]}', 400, "body"),  # not UTF-8
        (b"[1, 2]", 422, "body"),
        (b"{}", 422, "texts"),
        (b'{"text": ["a"]}', 422, "text"),
        (b'{"texts": "a film"}', 422, "texts"),
        (b'{"texts": []}', 422, "texts"),
        (b'{"texts": ["fine", 3]}', 422, "texts[1]"),
        (b'{"texts": ["fine", "   "]}', 422, "texts[1]"),
        (b'{"texts": ["\\ud800"]}', 422, "texts[0]"),
        (b'{"texts": ["a", "b", "c", "d", "e"]}', 413, "texts"),
        (b'{"texts": ["' + b"long " * 20 + b'"]}', 413, "texts[0]"),
        (b'{"texts": ["a"], "text_pairs": ["b"]}', 422, "text_pairs"),
        (b"[" * 100_000, 400, "body"),
    ]
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            for body, status, field in bad:
                response = client.post("/predict", content=body)
                assert response.status_code == status, (body[:40], response.text)
                assert response.json()["field"] == field and response.json()["error"]
                good = client.post("/predict", json={"texts": ["a fine film"]})
                assert good.status_code == 200 and good.json()["predictions"][0]["label"] in ("negative", "positive")
            assert client.get("/healthz").json()["status"] == "ok"
        metrics = server.metrics()
        assert sum(v for (name, labels), v in metrics.items()
                   if name == "frugalnlp_requests_total" and labels[0][1].startswith("4")) == len(bad)
        assert not any(name == "frugalnlp_requests_total" and labels[0][1].startswith("5")
                       for name, labels in metrics)
    finally:
        assert server.stop() == 0


def test_sigterm_finishes_the_requests_in_flight(tiny_run, texts):
    # One text per model run, so the request is still running when the signal comes.
    server = Server(tiny_run, "--max-batch", "1", "--max-wait-ms", "0", "--max-texts", "256")
    answer = {}

    def send():
        try:
            answer["response"] = httpx.post(f"{server.url}/predict", json={"texts": (texts * 7)[:256]}, timeout=120)
        except Exception as e:
            answer["response"] = e

    sender = threading.Thread(target=send)
    sender.start()
    deadline = time.monotonic() + 30
    while server.metrics().get(("frugalnlp_texts_total", ()), 0) == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    server.process.send_signal(signal.SIGTERM)
    sender.join(60)
    assert server.process.wait(timeout=60) == 0
    response = answer["response"]
    assert isinstance(response, httpx.Response), repr(response)
    assert response.status_code == 200 and len(response.json()["predictions"]) == 256


def test_predict_on_ray_writes_the_local_jsonl_row_by_row(tiny_run, tmp_path):
    import json

    data = tmp_path / "in.jsonl"
    texts = load_task("mr").test.texts[:600]
    rows = [json.dumps({"text": t}) for t in texts]
    rows[5], rows[9] = '{"text": broken', '{"text": "  "}'
    data.write_text("\n".join(rows) + "\n")
    outputs = {}
    for engine in ("local", "ray"):
        outputs[engine] = tmp_path / f"{engine}.jsonl"
        process = cli_process("predict", tiny_run, "--input", data, "--output", outputs[engine], "--threshold", 0.5,
                              "--engine", engine, *([] if engine == "local" else ["--ray-actors", 2]))
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err
        assert "wrote 598 predictions" in out and "in.jsonl:6: not valid JSON" in err and "in.jsonl:10:" in err
    local = outputs["local"].read_text().splitlines()
    assert len(local) == 598 and outputs["ray"].read_text().splitlines() == local


def test_bench_serve_drives_real_servers_and_compares_each_with_threshold_1(tiny_run, tmp_path, capsys):
    """A smoke run of the load test (its numbers are a benchmark's, not a test's: only their shape is checked)."""
    import json

    from conftest import run_cli

    status, out, err = run_cli(["bench", "--serve", "--quick", "--run", tiny_run, "--seconds", 0.5, "--clients", 4,
                                "--texts", "full,short", "--batchings", "segment", "--json", tmp_path / "serve.json"],
                               capsys)
    assert status == 0, err
    results = json.loads((tmp_path / "serve.json").read_text())
    configs = results["configs"]
    assert [(c["texts"], c["threshold"] == 1.0) for c in configs] == \
        [("full", True), ("full", False), ("short", True), ("short", False)]
    assert all(c["saturated"]["texts_per_second"] > 0 and c["saturated"]["client_cpu_cores"] > 0 for c in configs)
    for name in ("full", "short"):
        offered = {round(c["loads"][0]["offered_texts_per_second"], 6) for c in configs if c["texts"] == name}
        assert len(offered) == 1  # every server of a text set gets the same offered load
        assert results["in_process"][name]["1.0"] > 0
    assert all(c["throughput_vs_threshold_1"] == 1.0 and c["in_process_vs_threshold_1"] == 1.0
               for c in configs if c["threshold"] == 1.0)
    assert "| texts | threshold | ideal speedup | batching | packing | saturated texts/s |" in out


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def _raw(port: int, head: bytes, body: bytes = b"") -> socket.socket:
    """A connection that has sent ``head`` (request line and headers) and the first bytes of a body."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    _send(sock, head + b"\r\n\r\n" + body)
    return sock


def _send(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except (BrokenPipeError, ConnectionResetError):  # the server has answered and closed: it read no further
        pass


def _answer(sock: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:  # the server closed before reading what we sent: its answer came first
        pass
    return data


def _post_head(length: int | None) -> bytes:
    size = b"" if length is None else b"\r\nContent-Length: " + str(length).encode()
    return b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json" + size


def test_a_huge_declared_body_is_refused_before_it_is_read(tiny_run):
    server = Server(tiny_run, "--max-body-bytes", "100000")
    try:
        before = _rss_kib(server.process.pid)
        socks = [_raw(server.port, _post_head(50 * 2**20), b'{"texts": ["') for _ in range(4)]
        for s in socks:  # the rest of the body keeps coming while the server answers
            _send(s, b"x" * 2**20)
        answers = [_answer(s) for s in socks]
        after = _rss_kib(server.process.pid)
        for s in socks:
            s.close()
        assert all(a.startswith(b"HTTP/1.1 413") and b'"field":"body"' in a for a in answers), answers
        assert after - before < 8 * 1024, (before, after)  # KiB: it never held the 4 x 1 MiB it was sent
        # Without Content-Length (chunked), the body is cut off once it passes the limit.
        chunks = (b"x" * 10_000 for _ in range(100))
        response = httpx.post(f"{server.url}/predict", content=chunks, timeout=30)
        assert response.status_code == 413 and response.json()["field"] == "body"
        assert httpx.post(f"{server.url}/predict", json={"texts": ["fine"]}).status_code == 200
    finally:
        assert server.stop() == 0


def test_idle_and_stalled_connections_are_closed_within_their_timeouts(tiny_run):
    server = Server(tiny_run, "--idle-timeout", "1", "--body-timeout", "1")
    try:
        # Each socket waits up to 30 s: an end of stream (b"") or a 408 before then is the server's doing, so no
        # wall-clock bound is asserted (a loaded machine may take seconds to answer 61 sockets).
        idle = [socket.create_connection(("127.0.0.1", server.port), timeout=30) for _ in range(50)]
        stalled = [_raw(server.port, _post_head(100), b'{"texts": ') for _ in range(10)]
        slow_headers = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        slow_headers.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")
        assert all(_answer(s) == b"" for s in idle + [slow_headers])  # closed without a word
        answers = [_answer(s) for s in stalled]
        assert all(a.startswith(b"HTTP/1.1 408") for a in answers), answers[0]
        with httpx.Client(base_url=server.url) as client:  # a keep-alive connection, left idle
            assert client.post("/predict", json={"texts": ["fine"]}).status_code == 200
        for s in idle + stalled + [slow_headers]:
            s.close()
        metrics = server.metrics()
        assert metrics[("frugalnlp_requests_total", (("code", "408"),))] == 10
    finally:
        assert server.stop() == 0


def test_a_client_that_leaves_mid_body_is_counted_as_499_not_a_server_error(tiny_run):
    server = Server(tiny_run)
    try:
        sock = _raw(server.port, _post_head(1000), b'{"texts": ["a')
        time.sleep(0.3)
        sock.close()
        deadline = time.monotonic() + 10
        while ("frugalnlp_requests_total", (("code", "499"),)) not in server.metrics() and time.monotonic() < deadline:
            time.sleep(0.1)
        metrics = server.metrics()
        assert metrics[("frugalnlp_requests_total", (("code", "499"),))] == 1
        assert not any(name == "frugalnlp_requests_total" and labels[0][1].startswith("5") for name, labels in metrics)
    finally:
        assert server.stop() == 0


def test_a_client_that_leaves_after_its_body_is_counted_499_and_its_rows_are_not_computed(tiny_run):
    """The row waits for its batch to fill (up to 10 minutes); its client leaves first: counted 499, and the row
    is dropped from the worker (nothing queued, nothing classified), however slow the machine is."""
    server = Server(tiny_run, "--max-wait-ms", "600000", "--max-batch", "64")
    try:
        body = b'{"texts": ["a fine film"]}'
        sock = _raw(server.port, _post_head(len(body)), body)
        time.sleep(0.3)
        sock.close()
        deadline = time.monotonic() + 60  # well inside the 10 minutes the row would wait
        while ("frugalnlp_requests_total", (("code", "499"),)) not in server.metrics() and time.monotonic() < deadline:
            time.sleep(0.05)
        metrics = server.metrics()
        assert metrics[("frugalnlp_requests_total", (("code", "499"),))] == 1
        # dropped, not merely waiting: the worker holds no text, and none was ever classified
        assert metrics[("frugalnlp_texts_total", ())] == 0 and metrics[("frugalnlp_queued_texts", ())] == 0
        full = {"texts": ["still serving"] * 64}  # a full batch runs at once, without the long wait
        assert httpx.post(f"{server.url}/predict", json=full, timeout=60).status_code == 200
    finally:
        assert server.stop() == 0


def test_non_finite_scores_are_a_500_in_the_error_shape_and_a_one_line_predict_error(tiny_run, tmp_path, capsys):
    """Broken weights (NaN in an exit head) never reach an answer: not as NaN in JSON, not as a 200."""
    import shutil

    from safetensors.torch import load_file, save_file

    from frugalnlp.manifest import write_manifest
    from test_cli_errors import assert_clean_error

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    weights = load_file(run / "model" / "model.safetensors")
    assert any("heads" in k for k in weights)
    weights = {k: v.fill_(float("nan")) if "heads" in k else v for k, v in weights.items()}
    save_file(weights, run / "model" / "model.safetensors", metadata={"format": "pt"})
    write_manifest(run)  # as if written so: the answers' own check must hold
    data = tmp_path / "in.jsonl"
    data.write_text('{"text": "a fine film"}\n')
    status, _, err = run_cli(["predict", run, "--threshold", 0.9, "--input", data, "--output", tmp_path / "o.jsonl"],
                             capsys)
    assert_clean_error(status, err, "not a finite number")
    assert not (tmp_path / "o.jsonl").exists()
    server = Server(run, "--threshold", "0.9")
    try:
        response = httpx.post(f"{server.url}/predict", json={"texts": ["a fine film"]}, timeout=30)
        assert response.status_code == 500 and set(response.json()) == {"error", "field"}
        assert "not a finite number" in response.json()["error"]
        assert server.metrics()[("frugalnlp_requests_total", (("code", "500"),))] == 1
    finally:
        assert server.stop() == 0


def test_every_error_has_the_documented_shape(tiny_run):
    """{"error": ..., "field": ...}, FastAPI's own 404 and 405 too; the README shows the same."""
    server = Server(tiny_run)
    try:
        for response in (httpx.get(f"{server.url}/nope"), httpx.get(f"{server.url}/predict"),
                         httpx.post(f"{server.url}/predict", content=b"{")):
            assert response.status_code in (400, 404, 405)
            assert set(response.json()) == {"error", "field"} and response.json()["error"]
    finally:
        assert server.stop() == 0
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert '{"error": ..., "field": ...}' in readme and '{"detail"' not in readme


@pytest.mark.parametrize("policy", ["confidence", "entropy", "patience", "per-exit", "learned", "confidence+ensemble",
                                    "patience+ensemble", "learned+ensemble"])
def test_every_policy_decides_alike_at_batch_1_batched_in_the_replay_and_in_the_server(tiny_run, texts, policy,
                                                                                      tmp_path):
    """One exit step decides everywhere: per-text decisions are the same on all four paths."""
    import math
    import shutil

    from frugalnlp.curves import collect_exit_logits, replay
    from frugalnlp.early_exit.registry import make_policy
    from frugalnlp.encoding import EncodedSplit, encode_texts
    from frugalnlp.operating import OperatingPoint, run_binding

    policy, _, with_ensemble = policy.partition("+")
    ensemble = Predictor(tiny_run, threshold=1.0, ensemble=True).ensemble if with_ensemble else None
    router = (Predictor(tiny_run, threshold=1.0, policy="learned", ensemble=ensemble if with_ensemble else False).router
              if policy == "learned" else None)
    probe = Predictor(tiny_run, threshold=1.0)
    model, tokenizer = probe.model, probe.tokenizer
    data = EncodedSplit(encode_texts(tokenizer, texts, None, probe.max_length), labels=None)
    logits = collect_exit_logits(model, data, tokenizer, 8)
    probs = [(logits[e] / model.temperatures[e]).softmax(-1) for e in range(model.num_exits)]
    confidence = [p.amax(-1) for p in probs]
    entropy = 1 + (probs[0] * probs[0].log()).sum(-1) / math.log(probs[0].shape[-1])
    if router is not None:  # the router's P(right) at the first exit, on the logits it decides on
        seen = ensemble.apply(logits, model.temperatures) if ensemble is not None else logits / torch.tensor(
            model.temperatures)[:, None, None]
        routed = torch.from_numpy(router.score(0, seen[:1].log_softmax(-1).transpose(0, 1).numpy()))
    def between(values: torch.Tensor, q: float) -> float:
        """A threshold near quantile ``q`` of ``values``, halfway across the nearest gap wider than float noise
        (the tiny model's scores crowd together: a threshold within 1e-6 of a row would flip with batch padding)."""
        ordered = values.flatten().sort().values
        gaps = (ordered[1:] - ordered[:-1] > 1e-4).nonzero().squeeze(1)
        k = int(gaps[(gaps - q * (len(ordered) - 1)).abs().argmin()]) if len(gaps) else len(ordered) // 2
        return float(ordered[k:k + 2].mean())

    candidates = {"confidence": [[between(confidence[0], q)] for q in (0.5, 0.25, 0.75)],
                  "entropy": [[between(entropy, q)] for q in (0.5, 0.25, 0.75)],
                  "patience": [[0.5], [1.0]],
                  "per-exit": [[float(confidence[0].quantile(0.6)), float(confidence[1].quantile(0.4))],
                               [float(confidence[0].quantile(0.4)), float(confidence[1].quantile(0.6))]],
                  "learned": [[between(routed, q)] for q in (0.5, 0.25, 0.75)] if router is not None else None}[policy]

    def exits(value):
        return set(replay(logits, model.temperatures, make_policy(policy, value if len(value) > 1 else value[0],
                                                                  model.num_exits, ensemble, router))[0].tolist())

    value = next((v for v in candidates if len(exits(v)) > 1), candidates[0])
    if policy != "patience":  # the tiny model's answers seldom change between exits: patience may leave as one
        assert len(exits(value)) > 1
    threshold = value if len(value) > 1 else value[0]
    mixed = ensemble if ensemble is not None else False
    one_at_a_time = Predictor(tiny_run, threshold=threshold, policy=policy, batch_size=1, ensemble=mixed, router=router)
    alone = [p for t in texts for p in one_at_a_time([t])]
    decisions = [(p["label"], p["exit_layer"]) for p in alone]
    batched = Predictor(tiny_run, threshold=threshold, policy=policy, batch_size=16, ensemble=mixed,
                        router=router)(texts)
    assert [(p["label"], p["exit_layer"]) for p in batched] == decisions
    exit_index, labels = replay(logits, model.temperatures,
                                make_policy(policy, threshold, model.num_exits, ensemble, router))
    assert [(probe.id2label[int(l)], probe.exit_layers[int(e)]) for l, e in zip(labels, exit_index)] == decisions
    if ensemble is None and router is None:
        server = Server(tiny_run, "--policy", policy, "--threshold", ",".join(map(repr, value)), "--max-batch", "8",
                        "--max-wait-ms", "50")
    else:  # the same fitted ensemble and router reach the server as a saved operating point
        run = tmp_path / "run"
        shutil.copytree(tiny_run, run)
        OperatingPoint(policy=policy, threshold=threshold, chosen_by="test", dev={"accuracy": 0.5},
                       model_sha256=run_binding(run), ensemble=ensemble, router=router).save(run)
        server = Server(run, "--max-batch", "8", "--max-wait-ms", "50")
    try:
        served = [p for r in post_all(server.url, [texts[i:i + 2] for i in range(0, len(texts), 2)])
                  for p in r.json()["predictions"]]
    finally:
        assert server.stop() == 0
    assert [(p["label"], p["exit_layer"]) for p in served] == decisions
