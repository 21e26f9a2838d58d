import os

import pytest
import torch

# The suite never reaches the hub: hub names must fail fast with a clear message.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow (make test-all)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tiny_bert():
    """A tiny randomly initialised BERT (4 layers, hidden 32) for fast model tests."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(num_hidden_layers=4, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                        vocab_size=120, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return BertModel(config).eval()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A 4-layer, hidden-32 random BERT saved with the embedded model's tokenizer."""
    import shutil

    from transformers import BertConfig, BertModel

    from frugalnlp.assets import resolve_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny") / "bert"
    BertModel(BertConfig(num_hidden_layers=4, hidden_size=32, num_attention_heads=4, intermediate_size=64)) \
        .save_pretrained(path)
    minilm = resolve_model("minilm")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(f"{minilm}/{name}", path / name)
    return path


def run_cli(args, capsys):
    """Run `frugalnlp ARGS` in-process: (exit status, stdout, stderr)."""
    from frugalnlp.cli import main

    status = main([str(a) for a in args])
    out = capsys.readouterr()
    return status, out.out, out.err


@pytest.fixture(scope="session")
def tiny_run(tiny_dir, tmp_path_factory):
    """A finished joint run (exits 1,2,4) of the tiny BERT on 48 MR sentences."""
    from frugalnlp.cli import main

    path = tmp_path_factory.mktemp("runs") / "joint"
    status = main(["train", "--task", "mr", "--model", str(tiny_dir), "--method", "joint", "--exit-layers", "1,2,4",
                   "--train-size", "48", "--epochs", "1", "--max-length", "24", "--output", str(path)])
    assert status == 0
    return path


def cli_process(*args, **kwargs):
    """Start `frugalnlp ARGS` as a real process (offline), stdout and stderr piped."""
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "frugalnlp.cli", *map(str, args)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)
