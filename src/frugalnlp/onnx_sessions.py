"""How an export's ONNX Runtime sessions run, and timing the ways they may run on this CPU.

Session options (`SESSION_OPTIONS`' keys) say whether an export's segment sessions share one thread pool or each
have their own, and whether idle pool threads spin. Which is faster depends on the CPU and on how thin the calls
are (rows going on past an exit run in thin batches), so `frugalnlp.export` times every candidate on the CPU it
exports on (`time_candidates`) and records the choice in export.json. ONNX Runtime makes its shared pool once per
process, before any session, and then refuses sessions with pools of their own, so each kind is timed in a fresh
process: this file run as a script, which imports nothing of frugalnlp (nor torch) and starts in a fraction of a
second. It times each graph on the inputs it is given, so it needs no knowledge of segments.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# What an export's sessions do without a recorded choice (exports before the timing): one pool for every segment's
# session, idle threads sleeping (the server's event loop and tokeniser share these cores).
SESSION_OPTIONS = {"shared_thread_pool": True, "allow_spinning": False}
CANDIDATES = {"shared pool": {"shared_thread_pool": True, "allow_spinning": False},
              "per-session pools": {"shared_thread_pool": False, "allow_spinning": False},
              "per-session pools, spinning": {"shared_thread_pool": False, "allow_spinning": True}}
ROWS = (1, 2, 8, 32)

_POOL: list[int] = []  # the size of this process's shared ONNX Runtime pool once decided (0: none)


def session_options(options: dict, threads: int):
    """ONNX Runtime's ``SessionOptions`` for ``options`` on ``threads`` threads, as this process allows: the first
    export loaded decides whether the process has a shared pool (ONNX Runtime makes it with its environment, once),
    and once it has one every session must use it."""
    import onnxruntime as ort
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

    if not _POOL:
        pooled = 0
        if options["shared_thread_pool"]:
            try:
                ort_state.set_global_thread_pool_sizes(threads, 1)
                pooled = threads
            except Exception:  # the environment exists already (a session was made elsewhere in this process)
                pass
        _POOL.append(pooled)
    made = ort.SessionOptions()
    if _POOL[0]:
        made.use_per_session_threads = False
    else:
        made.intra_op_num_threads = threads
        made.inter_op_num_threads = 1
    made.add_session_config_entry("session.intra_op.allow_spinning", "1" if options["allow_spinning"] else "0")
    return made


def time_candidates(graphs: list[Path], feeds: list[list[dict[str, np.ndarray]]], threads: int, calls: int = 15,
                    rounds: int = 2) -> dict[str, list[float]]:
    """Median ms of one pass through every graph (the sum of each graph's median call) for each of `CANDIDATES`,
    per row count: ``feeds[k][g]`` is graph ``g``'s input on the k-th row count. The shared pool and the
    per-session pools are timed in two fresh processes (this file as a script), the candidates of one process
    taking turns for ``rounds`` rounds of ``calls`` calls (3 more to warm up)."""
    from safetensors.numpy import save_file

    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        inputs = Path(scratch) / "feeds.safetensors"
        save_file({f"{k}.{g}.{name}": np.ascontiguousarray(a) for k, per_graph in enumerate(feeds)
                   for g, feed in enumerate(per_graph) for name, a in feed.items()}, str(inputs))
        for shared in (True, False):
            spec = {"graphs": [str(g) for g in graphs], "feeds": str(inputs), "counts": len(feeds), "threads": threads,
                    "calls": calls, "rounds": rounds,
                    "candidates": {n: o for n, o in CANDIDATES.items() if o["shared_thread_pool"] == shared}}
            done = subprocess.run([sys.executable, "-I", __file__], input=json.dumps(spec), capture_output=True, text=True,
                                  timeout=600)
            if done.returncode != 0:
                raise RuntimeError(f"timing the session options failed: {done.stderr.strip()[-500:]}")
            results.update(json.loads(done.stdout))
    return results


def _time_here(spec: dict) -> dict[str, list[float]]:
    """In this (fresh) process: `time_candidates`' timing of ``spec``'s candidates."""
    import onnxruntime as ort
    from safetensors.numpy import load_file

    arrays = load_file(spec["feeds"])
    feeds = [[{} for _ in spec["graphs"]] for _ in range(spec["counts"])]
    for key, a in arrays.items():
        k, g, name = key.split(".", 2)
        feeds[int(k)][int(g)][name] = a
    seconds: dict[str, list[list[list[float]]]] = {}
    for _ in range(spec["rounds"]):
        for name, options in spec["candidates"].items():
            made = session_options(options, spec["threads"])
            sessions = [ort.InferenceSession(g, made, providers=["CPUExecutionProvider"]) for g in spec["graphs"]]
            per_count = seconds.setdefault(name, [[[] for _ in sessions] for _ in feeds])
            for k, per_graph in enumerate(feeds):
                for g, (session, feed) in enumerate(zip(sessions, per_graph)):
                    for i in range(spec["calls"] + 3):
                        start = time.perf_counter()
                        session.run(None, feed)
                        if i >= 3:
                            per_count[k][g].append(time.perf_counter() - start)
            del sessions  # their pools' threads go before the next candidate's are timed
    return {name: [1000 * sum(statistics.median(t) for t in per_graph) for per_graph in per_count]
            for name, per_count in seconds.items()}


if __name__ == "__main__":
    print(json.dumps(_time_here(json.loads(sys.stdin.read()))))
