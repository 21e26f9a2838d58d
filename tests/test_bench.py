"""`frugalnlp bench --quick`: structure and sanity, never absolute times (tiny runs; the embedded model: --run-slow)."""

import json

import pytest

from conftest import run_cli
from frugalnlp.timing import CPU_FEATURES, cpu_features, describe_machine


def check_quick_bench(out, stdout) -> None:
    results = json.loads(out.read_text())
    assert set(results["batch_sizes"]) == {"1", "32"}
    assert results["tokenize_seconds"] > 0
    for row in results["batch_sizes"].values():
        assert row["plain_seconds"] > 0 and row["machinery_seconds"] > 0
        assert row["early_exit"] and row["cascade"]
        for point in row["early_exit"]:
            assert 0 <= point["threshold"] <= 1
            assert point["ideal_speedup"] >= 1.0  # early exit never runs more layers than the full model
            assert point["measured_speedup"] > 0 and point["efficiency"] > 0
            assert abs(point["efficiency"] - point["measured_speedup"] / point["ideal_speedup"]) < 1e-9
        for point in row["cascade"]:
            assert 0 < point["predicted_cost"] and point["measured_cost"] > 0
    assert "plain HF forward" in stdout and "early exit, threshold 1" in stdout
    machine = results["machine"]
    assert set(machine["cpu_features"]) == set(CPU_FEATURES) and machine["versions"]["torch"]
    assert f"machine: {describe_machine(machine)}" in stdout


def test_quick_bench_writes_side_by_side_ratios(tiny_run, tiny_dir, tmp_path, capsys):
    cascade = tmp_path / "mm"
    status, _, err = run_cli(["train", "--task", "mr", "--model", tiny_dir, "--method", "multi-model", "--exit-layers",
                              "1,2,4", "--train-size", "48", "--epochs", "1", "--max-length", "24", "--output", cascade],
                             capsys)
    assert status == 0, err
    out = tmp_path / "bench.json"
    status, stdout, err = run_cli(["bench", "--quick", "--run", tiny_run, "--cascade-run", cascade, "--json", out], capsys)
    assert status == 0, err
    check_quick_bench(out, stdout)


@pytest.mark.slow  # trains a joint and a multi-model run of the embedded MiniLM: a minute on 2 cores
def test_quick_bench_trains_and_times_the_embedded_model(tmp_path, capsys):
    out = tmp_path / "bench.json"
    status, stdout, err = run_cli(["bench", "--quick", "--json", out], capsys)
    assert status == 0, err
    check_quick_bench(out, stdout)


def test_cpu_features_are_read_from_the_cpu_flags():
    cpuinfo = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_vnni amx_tile amx_int8\nprocessor\t: 1\n"
    features = cpu_features(cpuinfo)
    assert features == {"avx2": True, "avx512f": True, "avx512_vnni": True, "avx_vnni": False, "avx512_bf16": False,
                        "amx_bf16": False, "amx_int8": True}
    assert not any(cpu_features("").values())  # nothing readable: nothing claimed
    line = describe_machine({"cpu": "X", "cpus": 2, "cpu_features": features})
    assert line == "X, 2 CPUs; avx2, avx512f, avx512_vnni, amx_int8 (no avx_vnni, avx512_bf16, amx_bf16)"
