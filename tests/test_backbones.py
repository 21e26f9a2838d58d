"""Every supported family on a tiny random config: the adapter's layer loop is the HF model's own
forward, SWEET and joint training steps run, SWEET isolates the shared position tensors, and
batch compaction keeps each family's extras aligned with its rows."""

import pytest
import torch
from transformers import (BertConfig, BertModel, DebertaV2Config, DebertaV2Model, ElectraConfig, ElectraModel,
                          MPNetConfig, MPNetModel, RobertaConfig, RobertaModel, XLMRobertaConfig, XLMRobertaModel)

from frugalnlp import EarlyExitModel
from frugalnlp.backbones import backbone_for

SIZE = dict(num_hidden_layers=4, hidden_size=32, num_attention_heads=4, intermediate_size=64, vocab_size=120,
            max_position_embeddings=80, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
FAMILIES = {
    "bert": lambda: BertModel(BertConfig(**SIZE)),
    "roberta": lambda: RobertaModel(RobertaConfig(**SIZE, pad_token_id=1)),
    "xlm-roberta": lambda: XLMRobertaModel(XLMRobertaConfig(**SIZE, pad_token_id=1)),
    "electra": lambda: ElectraModel(ElectraConfig(**SIZE, embedding_size=16)),
    "deberta-v2": lambda: DebertaV2Model(DebertaV2Config(
        **SIZE, relative_attention=True, position_buckets=16, max_relative_positions=32, pos_att_type=["p2c", "c2p"],
        norm_rel_ebd="layer_norm", conv_kernel_size=3, type_vocab_size=2)),
    "mpnet": lambda: MPNetModel(MPNetConfig(**SIZE, pad_token_id=1)),
}
# Parameters computed once per batch and used by every layer: they belong to the first segment.
SHARED = {"deberta-v2": "encoder.rel_embeddings", "mpnet": "encoder.relative_attention_bias"}


def make_backbone(family):
    torch.manual_seed(0)
    return FAMILIES[family]().eval()


def padded_batch(n=12, seq=14, pad=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, seq + 1, (n,), generator=g)
    mask = (torch.arange(seq)[None] < lengths[:, None]).long()
    ids = torch.randint(5, 120, (n, seq), generator=g)
    ids[mask == 0] = pad
    types = (torch.arange(seq)[None] >= (lengths[:, None] // 2)).long() * mask
    return ids, mask, types


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_loop_equals_hf_forward(family):
    model = make_backbone(family)
    ids, mask, types = padded_batch()
    kwargs = {} if family == "mpnet" else {"token_type_ids": types}
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, **kwargs).last_hidden_state
        adapter = backbone_for(model)
        state = adapter.embed(ids, mask, kwargs.get("token_type_ids"))
        for i in range(adapter.num_layers):
            state = adapter.layer(i, state)
    real = mask.bool()
    assert torch.allclose(state.hidden[real], expected[real], atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["joint", "sweet"])
def test_training_step_and_sweet_isolation(family, method):
    model = EarlyExitModel.from_backbone(make_backbone(family), exit_layers=[1, 2, 4], method=method).train()
    ids, mask, types = padded_batch(8)
    labels = torch.randint(0, 2, (8,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = model(ids, mask, types, labels=labels).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(ids, mask, types).exit_logits[2], labels).backward()
    embeddings = model.backbone.get_input_embeddings().weight.grad
    reached = embeddings is not None and embeddings.abs().sum() > 0
    assert reached == (method == "joint")  # SWEET: the last exit's loss stops at its own segment
    if family in SHARED:
        shared = model.backbone.get_parameter(f"{SHARED[family]}.weight").grad
        assert (shared is not None and shared.abs().sum() > 0) == (method == "joint")


@pytest.mark.parametrize("family", FAMILIES)
def test_compaction_keeps_rows_aligned(family):
    torch.manual_seed(1)
    model = EarlyExitModel.from_backbone(make_backbone(family), exit_layers=[1, 2, 4], method="joint",
                                         num_labels=3).eval()
    with torch.no_grad():
        for head in model.heads:
            head.dense.weight.normal_(0, 3.0)
            head.classifier.weight.normal_(0, 1.0)
    ids, mask, types = padded_batch(16)
    types = None if family == "mpnet" else types
    # A threshold at which rows leave at different exits, so that the batch really shrinks.
    candidates = [float(t) for t in torch.linspace(0.4, 0.95, 12)]
    threshold = next((t for t in candidates
                      if len(set(model.predict(ids, mask, types, threshold=t).exit_index.tolist())) > 1), 0.9)
    together = model.predict(ids, mask, types, threshold=threshold)
    for i in range(16):
        n = int(mask[i].sum())
        alone = model.predict(ids[i:i + 1, :n], mask[i:i + 1, :n], None if types is None else types[i:i + 1, :n],
                              threshold=threshold)
        assert alone.exit_index.item() == together.exit_index[i].item()
        assert torch.allclose(alone.logits[0], together.logits[i], atol=1e-4)
    assert len(set(together.exit_index.tolist())) > 1, "rows must leave at different exits to test compaction"


@pytest.mark.parametrize("family", FAMILIES)
def test_merging_rows_of_two_batches_at_an_exit_keeps_each_rows_outputs(family):
    """Segment-level batching: rows of different batches (different lengths) continue as one batch."""
    model = EarlyExitModel.from_backbone(make_backbone(family), exit_layers=[1, 2, 4], method="joint").eval()
    batches = [padded_batch(5, seq=14, seed=1), padded_batch(3, seq=9, seed=2)]
    if family == "mpnet":
        batches = [(ids, mask, None) for ids, mask, _ in batches]
    with torch.no_grad():
        alone = [model.advance(1, model.advance(0, model.start(*b))[0])[1] for b in batches]
        states = [model.keep_rows(model.advance(0, model.start(*b))[0], torch.tensor(rows))
                  for b, rows in zip(batches, ([0, 2, 4], [1, 2]))]
        _, merged = model.advance(1, model.merge(states))
    assert torch.allclose(merged, torch.cat([alone[0][[0, 2, 4]], alone[1][[1, 2]]]), atol=1e-5)


def test_cascade_merges_rows_of_two_batches(tiny_bert):
    import copy

    from frugalnlp.early_exit.cascade import Cascade

    cascade = Cascade([EarlyExitModel.from_backbone(copy.deepcopy(tiny_bert), num_layers=k).eval() for k in (1, 2)])
    batches = [padded_batch(4, seq=12, seed=3, pad=0), padded_batch(3, seq=7, seed=4, pad=0)]
    with torch.no_grad():
        alone = [cascade.advance(1, cascade.start(*b))[1] for b in batches]
        _, merged = cascade.advance(1, cascade.merge([cascade.keep_rows(cascade.start(*b), torch.tensor([0, 2]))
                                                      for b in batches]))
    assert torch.allclose(merged, torch.cat([alone[0][[0, 2]], alone[1][[0, 2]]]), atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_reload(family, tmp_path):
    # Each family reloads with its own default attention (MPNet has no sdpa, the wrapper has).
    model = EarlyExitModel.from_backbone(make_backbone(family), exit_layers=[2, 4], method="sweet").eval()
    model.save_pretrained(tmp_path / family)
    again = EarlyExitModel.from_pretrained(tmp_path / family).eval()
    ids, mask, types = padded_batch()
    with torch.no_grad():
        for ours, theirs in zip(model.exit_logits(ids, mask, types), again.exit_logits(ids, mask, types)):
            assert torch.allclose(ours, theirs, atol=1e-6)
