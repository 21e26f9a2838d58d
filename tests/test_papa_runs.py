"""`frugalnlp papa` end to end on a tiny random BERT with the real tokenizer and the real MR data, plus its errors."""

import json

import pytest
import torch

from conftest import run_cli
from frugalnlp.errors import FrugalError
from frugalnlp.papa import PapaModel
from frugalnlp.papa.experiment import resolve_heads

COMMON = ["--train-size", 48, "--epochs", 1]


@pytest.fixture(scope="module")
def constants(tiny_dir, tmp_path_factory):
    from frugalnlp.papa.experiment import make_constants

    return make_constants("mr", str(tiny_dir), 20, str(tmp_path_factory.mktemp("papa") / "constants"), train_size=80)


def test_constants_rank_run_and_reload(constants, tmp_path, capsys):
    status, out, err = run_cli(["papa", "rank", "--constants", constants, *COMMON, "--output", tmp_path / "rank"], capsys)
    assert status == 0, err
    ranking = json.loads((tmp_path / "rank" / "ranking.json").read_text())
    assert sorted(map(tuple, ranking["order"])) == [(l, h) for l in range(4) for h in range(4)]
    lambdas = torch.tensor(ranking["gate_logits"])
    assert lambdas.abs().sum() > 0  # the gates trained
    first = [lambdas[l, h] for l, h in ranking["order"]]
    assert first == sorted(first)  # ascending: most constant-leaning first
    assert (tmp_path / "rank" / "ranking.png").stat().st_size > 0

    status, out, err = run_cli(["papa", "run", "--constants", constants, "--ranking", tmp_path / "rank", "--heads", 5,
                                "--setting", "finetune", *COMMON, "--output", tmp_path / "run"], capsys)
    assert status == 0, err
    assert "5 constant heads" in out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["constant_heads"] == ranking["order"][:5] and 0 <= metrics["test"]["accuracy"] <= 1
    model = PapaModel.from_pretrained(tmp_path / "run" / "model")
    assert model.config.constant_heads == sorted(ranking["order"][:5]) and model.config.setting == "finetune"

    status, _, err = run_cli(["papa", "run", "--constants", constants, "--heads", 5, *COMMON,
                              "--output", tmp_path / "run"], capsys)
    assert status == 2 and "already exists" in err  # never overwrites another run

    (tmp_path / "run" / "model" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FrugalError, match="pickle"):
        PapaModel.from_pretrained(tmp_path / "run" / "model")


def test_sweep_table_and_files(constants, tmp_path, capsys):
    status, out, err = run_cli(["papa", "sweep", "--constants", constants, "--heads", "0,half,all", "--seeds", "0,1",
                                *COMMON, "--output", tmp_path / "sweep"], capsys)
    assert status == 0, err
    assert "| constant heads | share | test accuracy | relative drop | test macro-F1 | encoder FLOPs (vs 0) |" in out
    assert "| 16 | 100% |" in out
    summary = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [r["heads"] for r in summary["rows"]] == [0, 8, 16]
    assert summary["rows"][0]["relative_drop"] == 0 and all(len(r["accuracy_per_seed"]) == 2 for r in summary["rows"])
    flops = [r["encoder_flops_share"] for r in summary["rows"]]
    assert flops[0] == 1 and flops[0] > flops[1] > flops[2]  # constant heads really skip their query/key work
    assert (tmp_path / "sweep" / "sweep.png").exists() and (tmp_path / "sweep" / "ranking" / "ranking.json").exists()
    assert summary["ranking"] == str(tmp_path / "sweep" / "ranking")  # where it is now, not the .partial
    assert not list((tmp_path / "sweep").rglob("*.states"))  # the probes' stored encoder states are scratch


def test_resolve_heads():
    assert resolve_heads("0,half,all-but-few,all", 6, 12) == [0, 36, 66, 72]
    assert resolve_heads("all-but-4,3", 2, 4) == [3, 4]
    for bad in ("most", "99", "all-but-x"):
        with pytest.raises(FrugalError):
            resolve_heads(bad, 2, 4)


@pytest.mark.parametrize("args, message", [
    (["run", "--heads", 99], "out of range"),
    (["run", "--heads", 3], "needs --ranking"),
    (["run", "--setting", "frozen"], "unknown setting"),
    (["run", "--heads", 2, "--ranking", "nowhere"], "no head ranking"),
])
def test_papa_errors(constants, tmp_path, capsys, args, message):
    status, _, err = run_cli(["papa", *args, "--constants", constants, "--output", tmp_path / "x"], capsys)
    assert status == 2 and message in err, err


def test_papa_refuses_a_checkpoint_of_another_kind(tiny_dir):
    with pytest.raises(FrugalError, match="not a 'frugalnlp-papa' one; build one"):
        PapaModel.from_pretrained(tiny_dir)


def test_papa_refuses_non_constants_and_other_families(tmp_path, capsys):
    (tmp_path / "c").mkdir()
    status, _, err = run_cli(["papa", "run", "--constants", tmp_path / "c", "--output", tmp_path / "x"], capsys)
    assert status == 2 and "papa constants" in err
    from transformers import DebertaV2Config, DebertaV2Model

    DebertaV2Model(DebertaV2Config(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64)) \
        .save_pretrained(tmp_path / "deberta")
    status, _, err = run_cli(["papa", "constants", "--model", tmp_path / "deberta", "--output", tmp_path / "y"], capsys)
    assert status == 2 and "no constant-head attention" in err and "mpnet" in err


def test_mpnet_sweep_end_to_end(tiny_dir, tmp_path, capsys):
    """MPNet goes through the same commands as BERT: constants, ranking, runs with constant heads, FLOPs."""
    import shutil

    from transformers import MPNetConfig, MPNetModel

    torch.manual_seed(0)
    path = tmp_path / "mpnet"
    MPNetModel(MPNetConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64)) \
        .save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(tiny_dir / name, path / name)
    status, out, err = run_cli(["papa", "sweep", "--model", path, "--max-length", 16, "--heads", "0,half,all",
                                "--seeds", "0", "--constants-train-size", 80, *COMMON, "--output", tmp_path / "sweep"], capsys)
    assert status == 0, err
    summary = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [r["heads"] for r in summary["rows"]] == [0, 4, 8]
    flops = [r["encoder_flops_share"] for r in summary["rows"]]
    assert flops[0] == 1 and flops[0] > flops[1] > flops[2]


def test_constants_and_runs_from_user_files(tiny_dir, tmp_path, capsys):
    rows = ["text,label"] + [f"{'good fine' if i % 2 else 'bad dull'} film number {i},{i % 2}" for i in range(80)]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    status, _, err = run_cli(["papa", "constants", "--model", tiny_dir, "--train-file", tmp_path / "train.csv",
                              "--max-length", 16, "--output", tmp_path / "c"], capsys)
    assert status == 0, err
    metadata = json.loads((tmp_path / "c" / "constants.json").read_text())
    assert metadata["task"] == "train" and metadata["source"]["train_file"] == str(tmp_path / "train.csv")
    status, out, err = run_cli(["papa", "run", "--constants", tmp_path / "c", "--heads", 0, "--epochs", 1,
                                "--output", tmp_path / "run"], capsys)
    assert status == 0, err
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["test"]["examples"] == 8


def test_bench_papa_times_every_configuration_and_predicts_from_flops(tiny_dir, tmp_path, capsys):
    status, out, err = run_cli(["bench", "--papa", "--quick", "--model", tiny_dir, "--json", tmp_path / "b.json"],
                               capsys)
    assert status == 0, err
    results = json.loads((tmp_path / "b.json").read_text())
    assert [(r["length"], r["batch"]) for r in results["rows"]] == [(32, 1), (32, 8)]
    for row in results["rows"]:
        c = {c["name"]: c for c in row["configurations"]}
        assert list(c) == ["HF sdpa", "HF eager", "PAPA 0 constant", "PAPA 8 constant", "PAPA 16 constant"]
        # CPU sdpa is counted like eager attention, and PAPA with no constant head is the plain model
        flops = [c[name]["flops"] for name in ("HF sdpa", "HF eager", "PAPA 0 constant")]
        assert max(flops) / min(flops) < 1.01, flops
        predicted = [c[f"PAPA {n} constant"]["predicted_speedup"] for n in (0, 8, 16)]
        assert predicted[0] == 1 < predicted[1] < predicted[2]
        assert all(x["ms"] > 0 and x["measured_speedup"] > 0 for x in c.values())
    assert "| 32 | 8 | PAPA 16 constant |" in out


def test_probes_on_precomputed_states_train_and_score_as_with_the_encoder(constants, tmp_path):
    """The sweep's shortcut: a probe trained on the frozen encoder's stored states is the probe trained through
    the encoder (same seed, same data order), and one store serves every seed's training subset."""
    from dataclasses import replace

    from frugalnlp.papa.experiment import PapaSpec, frozen_states, rank_heads, run_papa

    rank = rank_heads(PapaSpec(output=str(tmp_path / "rank"), constants=constants, train_size=48, epochs=1))
    spec = PapaSpec(output=str(tmp_path / "live"), constants=constants, ranking=str(rank), heads=5, train_size=48,
                    epochs=2, seed=1)
    live = json.loads((run_papa(spec) / "metrics.json").read_text())
    states = frozen_states(spec, [0, 1], tmp_path / "states", dtype=torch.float32)
    assert 48 < len(states["train"].row) <= 96 and states["train"].states.shape[1:] == (5, 20, 32)  # 4 layers + embeddings
    stored = json.loads((run_papa(replace(spec, output=str(tmp_path / "stored")), states=states) / "metrics.json").read_text())
    for split in ("dev", "test"):
        assert stored[split] == live[split]
    assert stored["training"]["train_loss"] == pytest.approx(live["training"]["train_loss"], abs=1e-5)
    probes = [PapaModel.from_pretrained(tmp_path / name / "model").probe.state_dict() for name in ("live", "stored")]
    for name, weight in probes[0].items():
        torch.testing.assert_close(probes[1][name], weight, atol=1e-5, rtol=1e-5)

    half = frozen_states(spec, [0], tmp_path / "half")  # float16, the sweep's default: close to the encoder's
    example = half["dev"].states[0].float()
    torch.testing.assert_close(example, states["dev"].states[states["dev"].row[next(iter(half["dev"].row))]],
                               atol=2e-2, rtol=1e-2)
    with pytest.raises(ValueError, match="other constant heads"):
        run_papa(replace(spec, output=str(tmp_path / "other"), heads=3), states=states)
    finetune = PapaModel.from_pretrained(tmp_path / "live" / "model")
    finetune.config.setting = "finetune"
    with pytest.raises(FrugalError, match="frozen encoder"):
        finetune(input_ids=torch.ones(1, 20, dtype=torch.long), attention_mask=torch.ones(1, 20, dtype=torch.long),
                 hidden_states=states["dev"].states[:1])


def test_compare_puts_models_side_by_side_and_says_whether_the_better_lost_more(tmp_path, capsys):
    def sweep(model, accuracies, f1=(0.6, 0.5, 0.4)):
        rows = [{"heads": h, "share": share, "accuracy_mean": a, "accuracy_std": 0.01, "macro_f1_mean": f, "macro_f1_std": 0.01}
                for h, share, a, f in zip((0, 6, 12), (0, 0.5, 1.0), accuracies, f1)]
        path = tmp_path / model
        path.mkdir()
        (path / "sweep.json").write_text(json.dumps({"kind": "frugalnlp-papa-sweep", "task": "mr", "model": model,
                                                     "setting": "probe", "length": 16, "train_size": 48,
                                                     "seeds": [0, 1], "rows": rows}))
        return path

    small, large = sweep("small", (0.80, 0.76, 0.72)), sweep("large", (0.90, 0.90, 0.72))
    status, out, err = run_cli(["papa", "compare", small, large, "--output", tmp_path / "cmp"], capsys)
    assert status == 0, err
    assert "| mr | probe | small | 0.800 ± 0.010 | 0.600 | 5.0% | 10.0% | 16.7% | 33.3% |" in out
    assert "| mr | probe | large | 0.900 ± 0.010 | 0.600 | 0.0% | 20.0% |" in out
    assert "the better model, large, lost more with all heads constant: **yes**" in out
    comparison = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert comparison["verdicts"] == [{"task": "mr", "setting": "probe", "best_model": "large",
                                       "most_drop_model": "large", "better_lost_more": True, "baselines_differ": True}]
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 0

    robust = sweep("robust", (0.95, 0.95, 0.94))
    status, out, err = run_cli(["papa", "compare", small, large, robust, "--output", tmp_path / "cmp2"], capsys)
    assert status == 0 and "**no (large lost more)**" in out
    tied = sweep("tied", (0.905, 0.90, 0.85))  # 0.005 apart, inside 0.01 + 0.01 of seed spread
    status, out, err = run_cli(["papa", "compare", large, tied, "--output", tmp_path / "cmp4"], capsys)
    assert status == 0 and "the better model, tied, lost more with all heads constant: **no (large lost more)** (but the " \
        "baselines are within their seeds' spread" in out

    (tmp_path / "other.json").write_text(json.dumps({"kind": "frugalnlp-papa-ranking"}))
    status, _, err = run_cli(["papa", "compare", tmp_path / "other.json", "--output", tmp_path / "cmp3"], capsys)
    assert status == 2 and "not a `frugalnlp papa sweep` summary" in err and not (tmp_path / "cmp3").exists()
    status, _, err = run_cli(["papa", "compare", small, "--output", tmp_path / "cmp"], capsys)
    assert status == 2 and "already exists" in err


def test_all_heads_constant_needs_no_ranking(constants, tmp_path, capsys):
    status, out, err = run_cli(["papa", "sweep", "--constants", constants, "--heads", "0,all", *COMMON,
                                "--output", tmp_path / "sweep"], capsys)
    assert status == 0, err
    assert not (tmp_path / "sweep" / "ranking").exists()  # every head is constant, whatever their order
    model = PapaModel.from_pretrained(tmp_path / "sweep" / "heads-16" / "seed-0" / "model")
    assert model.config.constant_heads == [[l, h] for l in range(4) for h in range(4)]
