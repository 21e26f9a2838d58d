"""`serve --workers N` against one process: saturated texts/s of real servers on MR test sentences, the deploy
directory's 2x point and the same export at threshold 1, each with 1 worker (all threads) and 2 workers (half the
threads each), one server at a time, rounds rotating the order; medians over rounds. 32 closed-loop clients
send 4 texts per request, on the same cores (their CPU share is reported).

    .venv/bin/python benchmarks/serve_workers.py runs/make-demo/deploy/2x          # ~6 min on 2 cores
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

import httpx

from frugalnlp.atomic import write_json
from frugalnlp.loadtest import ServerProcess, closed_loop
from frugalnlp.run import load_run, load_spec_task
from frugalnlp.timing import describe_machine, machine

ROUNDS, SECONDS, CLIENTS, TEXTS_PER_REQUEST = 2, 10.0, 32, 4


def wait_for_workers(url: str, workers: int, timeout: float = 120.0) -> None:
    """Until ``workers`` distinct processes have answered /healthz (the others may still be loading)."""
    seen, deadline = set(), time.monotonic() + timeout
    while len(seen) < workers and time.monotonic() < deadline:
        with httpx.Client(base_url=url, timeout=10) as client:  # a new connection each time
            seen.add(client.get("/healthz").json()["pid"])
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("deploy", type=Path, help="a deploy directory (an int8 export with its operating point)")
    args = parser.parse_args()
    test = load_spec_task(load_run(args.deploy).spec).test
    texts = test.texts[:512]
    requests = [texts[i:i + TEXTS_PER_REQUEST] for i in range(0, len(texts), TEXTS_PER_REQUEST)]
    configs = {f"{point}, {w} worker{'s' * (w > 1)}": (extra, w) for point, extra in
               (("threshold 1", ["--threshold", "1"]), ("2x point", [])) for w in (1, 2)}
    results: dict[str, list[dict]] = {name: [] for name in configs}
    names = list(configs)
    for r in range(ROUNDS):
        for name in names[r % len(names):] + names[:r % len(names)]:
            extra, workers = configs[name]
            with ServerProcess(args.deploy, *extra, "--workers", str(workers)) as server:
                wait_for_workers(server.url, workers)
                asyncio.run(closed_loop(server.url, requests, CLIENTS, 2.0))  # warm-up
                results[name].append(asyncio.run(closed_loop(server.url, requests, CLIENTS, SECONDS)))
            print(f"round {r}: {name}: {results[name][-1]['texts_per_second']:.0f} texts/s", flush=True)
    rows = {name: {k: statistics.median(s[k] for s in runs) for k in runs[0]} for name, runs in results.items()}
    print(f"\nmachine: {describe_machine(machine())}\n")
    print("| server | texts/s | p50 ms | p99 ms | load client's CPU (cores) | vs threshold 1, 1 worker | vs the best threshold-1 server |")
    print("|---|---|---|---|---|---|---|")
    base = rows["threshold 1, 1 worker"]["texts_per_second"]
    best = max(rows["threshold 1, 1 worker"]["texts_per_second"], rows["threshold 1, 2 workers"]["texts_per_second"])
    for name, row in rows.items():
        print(f"| {name} | {row['texts_per_second']:.0f} | {row['p50_ms']:.0f} | {row['p99_ms']:.0f} | "
              f"{row['client_cpu_cores']:.2f} | {row['texts_per_second'] / base:.2f}x | "
              f"{row['texts_per_second'] / best:.2f}x |")
    target = Path(__file__).with_name("serve-workers.json")
    write_json(target, {"machine": machine(), "deploy": str(args.deploy), "rounds": ROUNDS, "seconds": SECONDS,
                        "clients": CLIENTS, "texts_per_request": TEXTS_PER_REQUEST, "medians": rows,
                        "runs": results})
    print(f"\nJSON: {target}")


if __name__ == "__main__":
    main()
