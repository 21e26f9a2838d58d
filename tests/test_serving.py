"""The real HTTP server (uvicorn in a subprocess) driven with httpx."""

import asyncio
import signal
import socket
import threading
import time

import httpx
import pytest
import torch
from conftest import cli_process
from prometheus_client.parser import text_string_to_metric_families

from frugalnlp.predict import Predictor
from frugalnlp.tasks import load_task


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`frugalnlp serve RUN ...` on a free port, up once /healthz answers."""

    def __init__(self, run, *args):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = cli_process("serve", run, "--port", self.port, *args)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.process.communicate()
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        raise AssertionError("the server did not come up")

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=30)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics").text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture(scope="module")
def texts():
    return load_task("mr").test.texts[:40]


@pytest.fixture(scope="module")
def threshold(tiny_run, texts):
    """A threshold at which the tiny run's texts leave at more than one exit."""
    torch.set_num_threads(1)
    predictor = Predictor(tiny_run, threshold=1.0)
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
    server = Server(tiny_run, "--threshold", threshold, "--batching", batching, "--max-batch", 8,
                    "--max-wait-ms", 50)
    try:
        async def send_all():
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
                return await asyncio.gather(*(client.post("/predict", json={"texts": r}) for r in requests))

        responses = asyncio.run(send_all())
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


def test_bad_requests_get_a_4xx_naming_the_field_and_the_server_keeps_answering(tiny_run):
    server = Server(tiny_run, "--max-texts", 4, "--max-chars", 50)
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
    server = Server(tiny_run, "--max-batch", 1, "--max-wait-ms", 0, "--max-texts", 256)
    answer = {}

    def send():
        answer["response"] = httpx.post(f"{server.url}/predict", json={"texts": (texts * 7)[:256]}, timeout=60)

    sender = threading.Thread(target=send)
    sender.start()
    deadline = time.monotonic() + 30
    while server.metrics().get(("frugalnlp_texts_total", ()), 0) == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    server.process.send_signal(signal.SIGTERM)
    sender.join(60)
    assert server.process.wait(timeout=60) == 0
    response = answer["response"]
    assert response.status_code == 200 and len(response.json()["predictions"]) == 256
