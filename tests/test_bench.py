"""`frugalnlp bench --quick` on the real embedded model: structure and sanity, never absolute times."""

import json

from conftest import run_cli


def test_quick_bench_writes_side_by_side_ratios(tmp_path, capsys):
    out = tmp_path / "bench.json"
    status, stdout, err = run_cli(["bench", "--quick", "--json", out], capsys)
    assert status == 0, err
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
