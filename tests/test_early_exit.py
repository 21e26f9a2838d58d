"""EarlyExitModel and Cascade on a tiny random BERT: gradient routing, batched predict, save/load."""

import pytest
import torch

from frugalnlp import EarlyExitModel
from frugalnlp.curves import replay
from frugalnlp.dev_choice import fixed_exit_thresholds
from frugalnlp.early_exit.cascade import Cascade
from frugalnlp.early_exit.registry import make_policy
from frugalnlp.errors import FrugalError
from frugalnlp.run import load_adaptive

EXITS = [1, 2, 4]


def batch(n=32, seq=12, vocab=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, seq), generator=g)
    lengths = torch.randint(3, seq + 1, (n,), generator=g)
    mask = (torch.arange(seq)[None] < lengths[:, None]).long()
    return ids * mask, mask, torch.randint(0, 3, (n,), generator=g)


def make(tiny_bert, method, **kw):
    torch.manual_seed(1)
    return EarlyExitModel.from_backbone(tiny_bert, exit_layers=EXITS, method=method, num_labels=3, **kw)


def sharpen(models):
    """Give random heads confident, varied outputs so that rows leave at every exit."""
    torch.manual_seed(3)
    with torch.no_grad():
        for model in models:
            for head in model.heads:
                head.dense.weight.normal_(0, 3.0)
                head.classifier.weight.normal_(0, 1.0)


def segment_of(name: str) -> int | None:
    """Which segment (0-based exit) a backbone parameter belongs to; embeddings belong to segment 0."""
    if ".embeddings." in f".{name}":
        return 0
    if ".layer." in name:
        layer = int(name.split(".layer.")[1].split(".")[0]) + 1
        return next(e for e, last in enumerate(EXITS) if layer <= last)
    return None


@pytest.mark.parametrize("exit_k", range(len(EXITS)))
def test_sweet_exit_loss_reaches_only_its_head_and_segment(tiny_bert, exit_k):
    model = make(tiny_bert, "sweet").train()
    ids, mask, labels = batch(8)
    out = model(ids, mask)
    torch.nn.functional.cross_entropy(out.exit_logits[exit_k], labels).backward()
    for name, p in model.named_parameters():
        if name.startswith("heads."):
            own = int(name.split(".")[1]) == exit_k
        else:
            own = segment_of(name.removeprefix("backbone.")) == exit_k
        grad = torch.zeros_like(p) if p.grad is None else p.grad
        if own:
            assert grad.abs().sum() > 0, name
        else:
            assert torch.equal(grad, torch.zeros_like(p)), name


def test_joint_loss_reaches_earlier_segments(tiny_bert):
    model = make(tiny_bert, "joint").train()
    ids, mask, labels = batch(8)
    torch.nn.functional.cross_entropy(model(ids, mask).exit_logits[-1], labels).backward()
    embeddings = model.backbone.embeddings.word_embeddings.weight.grad
    first_layer = model.backbone.encoder.layer[0].output.dense.weight.grad
    assert embeddings.abs().sum() > 0 and first_layer.abs().sum() > 0


def test_forward_without_labels_and_summed_loss(tiny_bert):
    model = make(tiny_bert, "joint").eval()
    ids, mask, labels = batch(4)
    out = model(ids, mask)
    assert out.loss is None and len(out.exit_logits) == 3 and out.exit_logits[0].shape == (4, 3)
    loss = model(ids, mask, labels=labels).loss
    expected = sum(torch.nn.functional.cross_entropy(l, labels) for l in out.exit_logits)
    assert torch.allclose(loss, expected)


@pytest.mark.parametrize("pooling", ["first", "mean"])
@pytest.mark.parametrize("policy", ["confidence", "entropy", "patience"])
def test_batched_predict_equals_one_at_a_time_and_replay(tiny_bert, pooling, policy):
    model = make(tiny_bert, "joint", pooling=pooling).eval()
    sharpen([model])
    ids, mask, _ = batch(32)
    # A threshold at which rows leave at different exits, so that compaction is exercised.
    candidates = (make_policy(policy, float(t), model.num_exits) for t in torch.linspace(0.05, 0.95, 19))
    pol = next(p for p in candidates if len(set(model.predict(ids, mask, policy=p).exit_index.tolist())) > 1)
    together = model.predict(ids, mask, policy=pol)
    for i in range(32):
        n = int(mask[i].sum())
        alone = model.predict(ids[i:i + 1, :n], mask[i:i + 1, :n], policy=pol)
        assert alone.labels.item() == together.labels[i].item()
        assert alone.exit_index.item() == together.exit_index[i].item()
        assert torch.allclose(alone.logits[0], together.logits[i], atol=1e-5)
    exit_index, labels = replay(torch.stack(model.exit_logits(ids, mask)), model.temperatures, pol)
    assert torch.equal(exit_index, together.exit_index) and torch.equal(labels, together.labels)
    assert len(set(together.exit_index.tolist())) > 1, "the test needs rows leaving at different exits"


def test_threshold_one_runs_everything_and_matches_full_forward(tiny_bert):
    model = make(tiny_bert, "sweet").eval()
    ids, mask, _ = batch(16)
    pred = model.predict(ids, mask, threshold=1.0)
    assert (pred.exit_index == 2).all() and (pred.layers_run == 4).all()
    with torch.no_grad():
        full = model(ids, mask).exit_logits[-1]
        hidden = tiny_bert(ids, attention_mask=mask).last_hidden_state
        weights = mask[..., None].float()
        head = model.heads[-1]
        by_hand = head.classifier(torch.tanh(head.dense((hidden * weights).sum(1) / weights.sum(1))))
    assert torch.allclose(pred.logits, full, atol=1e-5)
    assert torch.allclose(full, by_hand, atol=1e-5)  # the backbone is the HF model's own forward


def test_threshold_zero_leaves_at_first_exit(tiny_bert):
    model = make(tiny_bert, "joint").eval()
    ids, mask, _ = batch(16)
    assert (model.predict(ids, mask, threshold=0.0).exit_index == 0).all()


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_threshold_outside_unit_interval_is_refused(tiny_bert, bad):
    model = make(tiny_bert, "joint").eval()
    ids, mask, _ = batch(2)
    with pytest.raises(FrugalError, match="outside \\[0, 1\\]"):
        model.predict(ids, mask, threshold=bad)


def test_exit_layers_validation(tiny_bert):
    for layers, message in [([0, 4], "out of range"), ([1, 5], "out of range"), ([2, 1, 4], "ascending"),
                            ([1, 2], "must end at the last layer")]:
        with pytest.raises(FrugalError, match=message):
            EarlyExitModel.from_backbone(tiny_bert, exit_layers=layers, method="joint")
    with pytest.raises(FrugalError, match="method"):
        EarlyExitModel.from_backbone(tiny_bert, exit_layers=[4], method="magic")


def test_save_and_reload_round_trip(tiny_bert, tmp_path):
    model = make(tiny_bert, "sweet").eval()
    model.temperatures = [0.5, 0.7, 1.3]
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    again = EarlyExitModel.from_pretrained(tmp_path / "m").eval()
    assert again.config.method == "sweet" and again.config.exit_layers == EXITS
    assert again.temperatures == [0.5, 0.7, 1.3]
    ids, mask, _ = batch(8)
    for a, b in zip(model.exit_logits(ids, mask), again.exit_logits(ids, mask)):
        assert torch.equal(a, b)


def test_wrong_checkpoint_kinds_are_refused(tiny_bert, tmp_path):
    tiny_bert.save_pretrained(tmp_path / "plain")
    with pytest.raises(FrugalError, match="is a 'bert' checkpoint"):
        EarlyExitModel.from_pretrained(tmp_path / "plain")
    (tmp_path / "plain" / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(FrugalError, match="pickle"):
        EarlyExitModel.from_backbone(str(tmp_path / "plain"), method="joint")


def make_cascade(tiny_bert):
    torch.manual_seed(2)
    members = []
    for k in EXITS:
        from transformers import BertModel

        backbone = BertModel(tiny_bert.config)
        backbone.load_state_dict(tiny_bert.state_dict())
        members.append(EarlyExitModel.from_backbone(backbone, method="joint", num_layers=k, num_labels=3).eval())
    return Cascade(members)


def test_cascade_thresholds_and_cost(tiny_bert, tmp_path):
    cascade = make_cascade(tiny_bert)
    sharpen(cascade.models)
    ids, mask, _ = batch(32)
    assert (cascade.predict(ids, mask, threshold=0.0).exit_index == 0).all()
    assert (cascade.predict(ids, mask, threshold=1.0).exit_index == 2).all()
    assert cascade.layers_to_exit() == [1, 3, 7]  # a later model recomputes from the input
    # a model whose exit the policy never uses is skipped: threshold 1 runs the last model alone, and the
    # fixed exit 1 (per-exit thresholds [1, 0]) runs the 2-layer model alone
    assert torch.equal(cascade.predict(ids, mask, threshold=1.0).layers_run, torch.full((32,), 4))
    fixed = cascade.predict(ids, mask, policy=make_policy("per-exit", fixed_exit_thresholds(3, 1), 3))
    assert (fixed.exit_index == 1).all() and (fixed.layers_run == 2).all()
    pred = cascade.predict(ids, mask, threshold=0.5)
    exit_index, labels = replay(torch.stack(cascade.exit_logits(ids, mask)), cascade.temperatures,
                                make_policy("confidence", 0.5, 3))
    assert torch.equal(exit_index, pred.exit_index) and torch.equal(labels, pred.labels)
    assert torch.equal(pred.layers_run, torch.tensor([1, 3, 7])[pred.exit_index])
    calls = []
    for member in cascade.models:  # a skipped model is never called
        member.register_forward_hook(lambda module, args, out: calls.append(module.config.exit_layers[-1]))
    cascade.predict(ids, mask, threshold=1.0)
    assert calls == [4]
    cascade.save_pretrained(tmp_path / "c")
    again = load_adaptive(tmp_path / "c").eval()
    assert isinstance(again, Cascade) and again.temperatures == cascade.temperatures
    assert torch.equal(again.predict(ids, mask, threshold=0.5).labels, pred.labels)


@pytest.mark.parametrize("cascade", [False, True])
def test_an_exit_ensemble_reads_every_exit_even_where_no_row_may_leave(tiny_bert, cascade):
    """At threshold 1 (and at a fixed exit) an ensembled answer still mixes the earlier exits' log-probs, so
    predict must run their heads: its answers equal the replay's on the same logits."""
    from frugalnlp.early_exit.ensemble import fit_exit_ensemble

    model = make_cascade(tiny_bert) if cascade else make(tiny_bert, "joint").eval()
    sharpen(model.models if cascade else [model])
    ids, mask, gold = batch(32)
    logits = torch.stack(model.exit_logits(ids, mask)).detach()
    ensemble = fit_exit_ensemble(logits, model.temperatures, gold.numpy())
    assert ensemble.maps[-1, :, :6].abs().sum() > 0  # the last exit's mix reads the earlier exits
    for threshold in (1.0, fixed_exit_thresholds(3, 1)):
        policy = make_policy("per-exit" if isinstance(threshold, list) else "confidence", threshold, 3, ensemble)
        pred = model.predict(ids, mask, policy=policy)
        exit_index, labels = replay(logits, model.temperatures, policy)
        assert torch.equal(pred.exit_index, exit_index) and torch.equal(pred.labels, labels), threshold


def test_bf16_autocast_decides_on_float_logits_close_to_fp32_and_is_off_by_default(tiny_bert):
    from transformers import BertModel

    torch.manual_seed(0)
    model = EarlyExitModel.from_backbone(BertModel(tiny_bert.config), exit_layers=[2, 4], num_labels=3).eval()
    ids = torch.randint(5, 100, (6, 12))
    mask = torch.ones_like(ids)
    assert model.autocast is None
    with torch.inference_mode():
        fp32 = model.predict(ids, mask, threshold=1.0).logits
        model.autocast = torch.bfloat16
        bf16 = model.predict(ids, mask, threshold=1.0).logits
        model.autocast = None
        again = model.predict(ids, mask, threshold=1.0).logits
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, fp32)  # it ran in bf16
    assert (bf16 - fp32).abs().max() < 0.05 and torch.equal(again, fp32)
