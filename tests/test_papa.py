"""PAPA: constant attention matrices, constant heads in the model, the fixed layout, save/reload."""

import pytest
import torch
from transformers import (BertConfig, BertModel, DebertaV2Config, DebertaV2Model, MPNetConfig, MPNetModel,
                          RobertaConfig, RobertaModel)

from frugalnlp.backbones import backbone_for
from frugalnlp.encoding import encode_fixed_layout, load_tokenizer
from frugalnlp.errors import FrugalError
from frugalnlp.papa import PapaModel, compute_constant_attention
from frugalnlp.papa.attention import NoHeads

SIZE = dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, intermediate_size=64, vocab_size=30522,
            max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
N = 16


@pytest.fixture(scope="module")
def tokenizer():
    from frugalnlp.assets import resolve_model

    return load_tokenizer(resolve_model("minilm"))


# model class, config class, position id of slot 0 in the layout (RoBERTa-style: padding id + 1)
FAMILIES = {"bert": (BertModel, BertConfig, 0), "mpnet": (MPNetModel, MPNetConfig, 2)}


def tiny(cls=BertModel, config=BertConfig, **extra):
    if isinstance(cls, str):
        cls, config, _ = FAMILIES[cls]
    torch.manual_seed(0)
    return cls(config(**SIZE, **extra)).eval()


def layout_batches(tokenizer, texts, pairs, batch_size=3, position_offset=0, family=None):
    if family is not None:
        position_offset = FAMILIES[family][2]
    features = encode_fixed_layout(tokenizer, texts, pairs, N, position_offset)
    tensors = {k: torch.tensor(v) for k, v in features.items()}
    return [{k: v[i:i + batch_size] for k, v in tensors.items()} for i in range(0, len(texts), batch_size)]


TEXTS = ["a gorgeous film", "dull", "the plot never quite gets going, and the cast looks bored throughout the film",
         "one of the year's best", "flat", "it is neither good nor bad, merely long"]
PAIRS = ["is it good", "yes", "no it is not", "maybe later today", "why would anyone watch this", "ok"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pairs", [None, PAIRS], ids=["single", "pair"])
def test_constant_attention_matches_an_independent_average(tokenizer, pairs, family):
    model = tiny(family)
    implementation = model.config._attn_implementation
    batches = layout_batches(tokenizer, TEXTS, pairs, family=family)
    constant = compute_constant_attention(model, batches)
    assert constant.shape == (3, 4, N, N)

    eager = tiny(family, attn_implementation="eager")
    total, count = torch.zeros(3, 4, N, N, dtype=torch.float64), torch.zeros(N, N, dtype=torch.float64)
    for batch in batches:
        for row in range(len(batch["input_ids"])):
            example = {k: v[row:row + 1] for k, v in batch.items()}
            with torch.no_grad():
                attentions = eager(**example, output_attentions=True).attentions
            real = example["attention_mask"][0].bool()
            for i in range(N):
                for j in range(N):
                    if real[i] and real[j]:
                        count[i, j] += 1
                        for layer, a in enumerate(attentions):
                            total[layer, :, i, j] += a[0, :, i, j].double()
    expected = torch.where(count > 0, total / count.clamp_min(1), 0.0)
    assert (count == 0).any() == (pairs is not None)  # pairs leave cells no example fills: they must be 0
    assert torch.allclose(constant.double(), expected, atol=1e-6)
    assert model.config._attn_implementation == implementation  # restored


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("heads", ["all", "some"])
def test_constant_heads_with_an_inputs_own_attention_reproduce_it(tokenizer, heads, family):
    encoder = tiny(family, attn_implementation="eager")
    batch = layout_batches(tokenizer, TEXTS[2:3], PAIRS[2:3], batch_size=1, family=family)[0]
    with torch.no_grad():
        reference = encoder(**batch, output_attentions=True, output_hidden_states=True)
    own = torch.stack([a[0] for a in reference.attentions])  # [layers, heads, n, n]
    chosen = [[l, h] for l in range(3) for h in range(4)]
    if heads == "some":  # real and constant heads side by side, one layer all constant, one all real
        chosen = [[0, 0], [0, 2], [1, 0], [1, 1], [1, 2], [1, 3]]
    papa = PapaModel.from_encoder(tiny(family), own, constant_heads=chosen).eval()
    assert papa.config.position_offset == FAMILIES[family][2]
    with torch.no_grad():
        out = papa.backbone(**batch, output_hidden_states=True)
    real = batch["attention_mask"][0].bool()
    for ours, theirs in zip(out.hidden_states, reference.hidden_states):
        assert torch.allclose(ours[0, real], theirs[0, real], atol=1e-5)
    if heads == "all":  # no query/key weights at all
        names = backbone_for(papa.backbone).query_key
        assert all(isinstance(getattr(m, name), NoHeads) for m in papa.constant_modules() for name in names)


def test_constant_heads_save_reload_identical_logits_without_query_key(tokenizer, tmp_path):
    batches = layout_batches(tokenizer, TEXTS, PAIRS)
    constant = compute_constant_attention(tiny(), batches)
    heads = [[0, 1], [0, 3], [2, 0], [2, 1], [2, 2], [2, 3]]
    torch.manual_seed(1)
    papa = PapaModel.from_encoder(tiny(), constant, constant_heads=heads, num_labels=3).eval()
    papa.save_pretrained(tmp_path / "papa")
    assert not list((tmp_path / "papa").glob("*.bin"))
    again = PapaModel.from_pretrained(tmp_path / "papa").eval()
    assert again.config.constant_heads == heads and again.config.length == N
    with torch.no_grad():
        for batch in batches:
            assert torch.equal(papa(**batch).logits, again(**batch).logits)
    state = again.state_dict()
    size = SIZE["hidden_size"] // SIZE["num_attention_heads"]
    assert state["backbone.encoder.layer.0.attention.self.query.weight"].shape == (2 * size, SIZE["hidden_size"])
    assert state["backbone.encoder.layer.1.attention.self.key.weight"].shape == (4 * size, SIZE["hidden_size"])
    assert not any(k.startswith("backbone.encoder.layer.2.attention.self.query") for k in state)
    assert state["backbone.encoder.layer.0.attention.self.papa.constant"].shape == (2, N, N)
    assert torch.equal(state["backbone.encoder.layer.0.attention.self.papa.constant"], constant[0, [1, 3]])


def test_mpnet_constant_heads_save_reload_without_query_key_keeping_the_position_bias(tokenizer, tmp_path):
    batches = layout_batches(tokenizer, TEXTS, PAIRS, family="mpnet")
    constant = compute_constant_attention(tiny("mpnet"), batches)
    heads = [[0, 1], [0, 3], [2, 0], [2, 1], [2, 2], [2, 3]]
    torch.manual_seed(1)
    papa = PapaModel.from_encoder(tiny("mpnet"), constant, constant_heads=heads, num_labels=3).eval()
    papa.save_pretrained(tmp_path / "papa")
    again = PapaModel.from_pretrained(tmp_path / "papa").eval()
    assert again.config.constant_heads == heads and again.config.position_offset == 2
    with torch.no_grad():
        for batch in batches:
            # Same weights and buffers bit for bit (below); on some CPUs the reloaded model's layers still
            # differ in the last bit (1e-7), so the logits are held to float32 rounding, not bit equality.
            torch.testing.assert_close(papa(**batch).logits, again(**batch).logits, rtol=0, atol=1e-6)
    state = again.state_dict()
    assert all(torch.equal(value, papa.state_dict()[name]) for name, value in state.items())
    size = SIZE["hidden_size"] // SIZE["num_attention_heads"]
    assert state["backbone.encoder.layer.0.attention.attn.q.weight"].shape == (2 * size, SIZE["hidden_size"])
    assert state["backbone.encoder.layer.0.attention.attn.k.weight"].shape == (2 * size, SIZE["hidden_size"])
    assert state["backbone.encoder.layer.1.attention.attn.k.weight"].shape == (4 * size, SIZE["hidden_size"])
    assert state["backbone.encoder.layer.0.attention.attn.v.weight"].shape == (4 * size, SIZE["hidden_size"])
    assert not any(k.startswith("backbone.encoder.layer.2.attention.attn.q") for k in state)
    assert torch.equal(state["backbone.encoder.layer.0.attention.attn.papa.constant"], constant[0, [1, 3]])
    # layers 0 and 1 still have live heads, whose scores read the relative position bias
    assert torch.equal(state["backbone.encoder.relative_attention_bias.weight"],
                       tiny("mpnet").state_dict()["encoder.relative_attention_bias.weight"])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("heads", ["none", "some", "all", "gated"])
def test_fast_constant_path_matches_the_probability_path(tokenizer, family, heads):
    # Constants from three examples only, so that longer inputs meet rows with no mass on their real keys
    # (the uniform fallback) and pairs meet cells no example filled.
    constant = compute_constant_attention(tiny(family), layout_batches(tokenizer, TEXTS[:2], PAIRS[:2], family=family))
    # "some": heads interleaved (layer 0), constant before live (layer 1), live before constant (layer 2)
    chosen = {"none": [], "some": [[0, 0], [0, 2], [1, 0], [1, 1], [2, 2], [2, 3]],
              "all": [[l, h] for l in range(3) for h in range(4)], "gated": []}[heads]
    papa = PapaModel.from_encoder(tiny(family), constant, constant_heads=chosen, gated=heads == "gated").eval()
    if heads == "gated":
        torch.manual_seed(2)
        for module in papa.constant_modules():
            module.papa.gates.data.normal_()
    for pairs in (None, PAIRS):
        for batch in layout_batches(tokenizer, TEXTS, pairs, family=family):
            with torch.no_grad():
                fast, slow = papa(**batch), papa(**batch, output_attentions=True)
                assert all(a.shape == (len(batch["input_ids"]), 4, N, N) for a in slow.attentions)
                assert torch.allclose(fast.logits, slow.logits, atol=1e-5)
                hidden = {}
                for probabilities in (False, True):
                    for module in papa.constant_modules():
                        module.papa.return_probabilities = probabilities
                    hidden[probabilities] = papa.backbone(**batch).last_hidden_state
                assert torch.allclose(hidden[False], hidden[True], atol=1e-5)


def test_constant_heads_change_the_output_and_partial_replacement_keeps_real_heads(tokenizer):
    batches = layout_batches(tokenizer, TEXTS, None)
    constant = compute_constant_attention(tiny(), batches)
    plain = PapaModel.from_encoder(tiny(), constant, constant_heads=[]).eval()
    one = PapaModel.from_encoder(tiny(), constant, constant_heads=[[1, 2]]).eval()
    reference = tiny()
    with torch.no_grad():
        batch = batches[0]
        expected = reference(**batch).last_hidden_state
        assert torch.allclose(plain.backbone(**batch).last_hidden_state, expected, atol=1e-5)
        assert not torch.allclose(one.backbone(**batch).last_hidden_state, expected, atol=1e-3)


def test_pair_layout_token_types_and_positions(tokenizer):
    features = encode_fixed_layout(tokenizer, ["is the sky blue"], ["yes it is"], 12)
    tokens = tokenizer.convert_ids_to_tokens(features["input_ids"][0])
    assert tokens == ["[CLS]", "is", "the", "sky", "blue", "[SEP]", "yes", "it", "is", "[SEP]", "[PAD]", "[PAD]"]
    assert features["token_type_ids"][0] == [0] * 6 + [1] * 4 + [0] * 2
    assert features["attention_mask"][0] == [1] * 10 + [0] * 2
    assert features["position_ids"][0] == list(range(12))

    short = encode_fixed_layout(tokenizer, ["hi"], ["a much longer second text that will not fit"], 12)
    tokens = tokenizer.convert_ids_to_tokens(short["input_ids"][0])
    assert tokens[:3] == ["[CLS]", "hi", "[SEP]"] and tokens[3:6] == ["[PAD]"] * 3
    assert tokens[6:] == ["a", "much", "longer", "second", "text", "[SEP]"]  # second text starts at n/2, truncated
    assert short["token_type_ids"][0] == [0] * 6 + [1] * 6

    single = encode_fixed_layout(tokenizer, ["one two three four five six seven eight nine ten"], None, 8)
    assert tokenizer.convert_ids_to_tokens(single["input_ids"][0]) == \
        ["[CLS]", "one", "two", "three", "four", "five", "six", "[SEP]"]  # a single text uses all n slots

    # RoBERTa-style positions count from pad_token_id + 1 at every slot, padding included.
    roberta = tiny(RobertaModel, RobertaConfig, pad_token_id=1)
    papa = PapaModel.from_encoder(roberta, torch.zeros(3, 4, N, N))
    assert papa.config.position_offset == 2
    batch = layout_batches(tokenizer, ["hi"], ["there you go"], position_offset=2)[0]
    assert batch["position_ids"][0].tolist() == list(range(2, 2 + N))


def test_papa_refuses_other_families_and_bad_heads():
    with pytest.raises(FrugalError, match="deberta-v2's backbone adapter has no constant-head attention"):
        PapaModel.from_encoder(tiny(DebertaV2Model, DebertaV2Config), torch.zeros(3, 4, N, N))
    with pytest.raises(FrugalError, match="out of range"):
        PapaModel.from_encoder(tiny(), torch.zeros(3, 4, N, N), constant_heads=[[3, 0]])
    with pytest.raises(FrugalError, match="the model has 3 x 4"):
        PapaModel.from_encoder(tiny(), torch.zeros(2, 4, N, N))


def test_probe_handles_a_batch_of_one_and_trains_only_probe_and_gates(tokenizer):
    batch = layout_batches(tokenizer, TEXTS[:1], None, batch_size=1)[0]
    papa = PapaModel.from_encoder(tiny(), torch.rand(3, 4, N, N), gated=True).train()
    out = papa(**batch, labels=torch.tensor([1]))
    assert out.logits.shape == (1, 2)
    out.loss.backward()
    trainable = {n for n, p in papa.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in papa.named_parameters() if n.startswith("probe.") or n.endswith("papa.gates")}
    gates = [m.papa.gates for m in papa.constant_modules()]
    assert all(g.grad is not None and g.grad.abs().sum() > 0 for g in gates)
    assert papa.gate_logits().shape == (3, 4)


@pytest.mark.slow
def test_real_mpnet_constant_heads_with_an_inputs_own_attention_reproduce_it():
    """all-mpnet-base-v2 (`make mpnet`): the real checkpoint through the same check as the tiny configs."""
    from transformers import AutoModel

    from frugalnlp.assets import resolve_model
    from frugalnlp.papa.modeling import layout_position_offset

    try:
        path = resolve_model("mpnet")
    except FrugalError as e:
        pytest.skip(str(e))
    encoder = AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    offset = layout_position_offset(encoder)
    features = encode_fixed_layout(load_tokenizer(path), TEXTS[2:3], None, 32, offset)
    batch = {k: torch.tensor(v) for k, v in features.items()}
    with torch.no_grad():
        reference = encoder(**batch, output_attentions=True, output_hidden_states=True)
    own = torch.stack([a[0] for a in reference.attentions])  # [12, 12, 32, 32]
    real = batch["attention_mask"][0].bool()
    for chosen in ([[l, h] for l in range(12) for h in range(12)], [[l, h] for l in range(12) for h in range(0, 12, 2)]):
        papa = PapaModel.from_encoder(AutoModel.from_pretrained(path), own, constant_heads=chosen).eval()
        with torch.no_grad():
            out = papa.backbone(**batch, output_hidden_states=True)
        for ours, theirs in zip(out.hidden_states, reference.hidden_states):
            assert torch.allclose(ours[0, real], theirs[0, real], atol=1e-4)
