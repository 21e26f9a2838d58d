"""PAPA models: chosen attention heads use a constant matrix instead of softmax(QK^T).

Works on every family with a route to `frugalnlp.papa.attention` in `frugalnlp.papa.families`
(BERT, RoBERTa, XLM-RoBERTa, ELECTRA, MPNet). Each self-attention module
gets a `ConstantHeads` child holding its constant matrices (and, for ranking, one gate per head).
Constant heads lose their query and key rows, so they cost nothing to score. `PapaModel` wraps the
encoder with a `Probe` classifier and saves everything (constant heads, matrices, layout) with
``save_pretrained``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

from frugalnlp.assets import resolve_model, verify_checkpoint, weights_sha256
from frugalnlp.backbones import backbone_for
from frugalnlp.cost import count_flops
from frugalnlp.errors import FrugalError
from frugalnlp.papa.attention import ConstantHeads, drop_query_key
from frugalnlp.papa.families import check_family, use_constant_heads

SETTINGS = ("probe", "finetune")
ADDED_WEIGHTS = "papa.safetensors"  # what a probe-setting model saves instead of a copy of its frozen encoder


class Probe(nn.Module):
    """The PAPA probe: for each of ``num_states`` layer outputs (embeddings included) a learned weight per
    position (softmax over the real tokens), the weighted sums concatenated, then dense-tanh-dense.

    states: [batch, num_states, seq, hidden], attention_mask: [batch, seq] -> logits [batch, num_labels].
    """

    def __init__(self, num_states: int, length: int, hidden: int, num_labels: int, dropout: float) -> None:
        super().__init__()
        self.position_scores = nn.Parameter(torch.zeros(num_states, length))  # uniform over real tokens at first
        self.dropout = nn.Dropout(dropout)
        self.dense = nn.Linear(num_states * hidden, hidden)
        self.out = nn.Linear(hidden, num_labels)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.position_scores)
        self.dense.reset_parameters()
        self.out.reset_parameters()

    def forward(self, states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        batch, num_states, seq, hidden = states.shape
        scores = self.position_scores[:, :seq].expand(batch, num_states, seq)
        scores = scores.masked_fill(~attention_mask.bool()[:, None, :], torch.finfo(scores.dtype).min)
        pooled = torch.einsum("bst,bsth->bsh", scores.softmax(-1).to(states.dtype), states)
        return self.out(self.dropout(torch.tanh(self.dense(self.dropout(pooled.reshape(batch, -1))))))


class PapaConfig(PretrainedConfig):
    """Configuration of a `PapaModel`.

    Args:
        backbone_config: the encoder's own config, as a dict (``model_type`` included).
        length: n, the fixed-layout length the constant matrices and probe are built for.
        constant_heads: ``[layer, head]`` pairs (0-based) that use their constant matrix. A list of pairs,
            not a dict: JSON would turn integer keys into strings.
        gated: every head mixes real and constant attention through a learned gate (head ranking).
        setting: ``"probe"`` (encoder frozen; only the probe and gates train) or ``"finetune"`` (all trains).
        position_offset: position id of slot 0 in the layout (RoBERTa-style models: pad_token_id + 1).
        classifier_dropout: dropout inside the probe.
        encoder, encoder_sha256: the encoder it was built on (an alias or a directory, as given) and the sha256
            of its safetensors files. With both, a probe-setting model saves only what PAPA adds and
            reloading rebuilds the rest from that encoder, refusing one whose weights differ.
    """

    model_type = "frugalnlp-papa"

    def __init__(self, backbone_config: dict | None = None, length: int = 64,
                 constant_heads: list[list[int]] | None = None, gated: bool = False, setting: str = "probe",
                 position_offset: int = 0, classifier_dropout: float = 0.1, encoder: str | None = None,
                 encoder_sha256: str | None = None, **kwargs) -> None:
        self.backbone_config = backbone_config
        self.encoder = encoder
        self.encoder_sha256 = encoder_sha256
        self.length = length
        self.constant_heads = sorted([int(l), int(h)] for l, h in (constant_heads or []))
        self.gated = gated
        self.setting = setting
        self.position_offset = position_offset
        self.classifier_dropout = classifier_dropout
        super().__init__(**kwargs)


class PapaModel(PreTrainedModel):
    """A BERT-family encoder with PAPA constant heads and a `Probe` classifier.

    Build one from a pretrained encoder and its constant matrices with `from_encoder`; reload a saved
    one with `from_pretrained`. Inputs are in the fixed layout (`frugalnlp.encoding.encode_fixed_layout`).
    """

    config_class = PapaConfig
    base_model_prefix = "backbone"
    main_input_name = "input_ids"
    _supports_attention_backend = True

    def __init__(self, config: PapaConfig, backbone: PreTrainedModel | None = None) -> None:
        super().__init__(config)
        if config.setting not in SETTINGS:
            raise FrugalError(f"PAPA setting {config.setting!r} is not one of {', '.join(SETTINGS)}")
        check_family(backbone.config.model_type if backbone is not None else config.backbone_config.get("model_type"))
        if backbone is None:
            backbone = AutoModel.from_config(AutoConfig.for_model(**config.backbone_config))
        adapter = backbone_for(backbone)
        use_constant_heads(adapter)
        adapter.strip_pooler()  # the probe reads every layer; a pooler would be dead weight
        self.backbone = backbone
        layers = adapter.layers
        num_heads = backbone.config.num_attention_heads
        for l, h in config.constant_heads:
            if not (0 <= l < len(layers) and 0 <= h < num_heads):
                raise FrugalError(f"constant head (layer {l}, head {h}) is out of range: the model has "
                                  f"{len(layers)} layers of {num_heads} heads (0-based)")
        hidden = backbone.config.hidden_size
        self.probe = Probe(len(layers) + 1, config.length, hidden, config.num_labels, config.classifier_dropout)
        self.post_init()
        # After post_init: transformers initialises modules it has not loaded, and the live query/key rows
        # copied here from the pretrained projections must stay as they are.
        for index in range(len(layers)):
            heads = list(range(num_heads)) if config.gated else [h for l, h in config.constant_heads if l == index]
            drop_query_key(adapter.self_attention(index), ConstantHeads(num_heads, config.length, heads, config.gated),
                           adapter.query_key)
        self._freeze()  # after the injection, so that new gates are trainable in the probe setting

    def _init_weights(self, module: nn.Module) -> None:
        # Only what PAPA adds (when a checkpoint lacks it): the encoder keeps its pretrained weights.
        if isinstance(module, Probe):
            module.reset_parameters()
        elif isinstance(module, ConstantHeads) and module.gates is not None:
            nn.init.zeros_(module.gates)

    def _freeze(self) -> None:
        frozen = self.config.setting == "probe"
        for name, parameter in self.backbone.named_parameters():
            parameter.requires_grad = not frozen or name.endswith("papa.gates")

    def train(self, mode: bool = True) -> PapaModel:
        super().train(mode)
        if self.config.setting == "probe":
            self.backbone.eval()  # a frozen encoder has no dropout
        return self

    @classmethod
    def from_encoder(cls, encoder: str | PreTrainedModel, constant_attention: torch.Tensor,
                     constant_heads: list[list[int]] | None = None, gated: bool = False, setting: str = "probe",
                     num_labels: int = 2, position_offset: int | None = None, trust_pickle: bool = False,
                     **config_kwargs) -> PapaModel:
        """A PAPA model on a pretrained encoder (an alias, a path, a hub name, or a loaded HF model).

        constant_attention: [layers, heads, n, n] from `compute_constant_attention`.
        """
        source = None
        if isinstance(encoder, str):
            path = resolve_model(encoder)
            verify_checkpoint(path, trust_pickle=trust_pickle)
            source = dict(encoder=encoder, encoder_sha256=weights_sha256(path))
            encoder = AutoModel.from_pretrained(path, use_safetensors=None if trust_pickle else True)
        layers, heads, length, _ = constant_attention.shape
        if (layers, heads) != (encoder.config.num_hidden_layers, encoder.config.num_attention_heads):
            raise FrugalError(f"constant attention is for {layers} layers x {heads} heads, the model has "
                              f"{encoder.config.num_hidden_layers} x {encoder.config.num_attention_heads}")
        if position_offset is None:
            position_offset = layout_position_offset(encoder)
        config = PapaConfig(backbone_config=encoder.config.to_dict(), length=length, constant_heads=constant_heads,
                            gated=gated, setting=setting, position_offset=position_offset, num_labels=num_labels,
                            **(source or {}), **config_kwargs)
        model = cls(config, backbone=encoder)
        model.set_constant_attention(constant_attention)
        return model

    @property
    def saves_added_only(self) -> bool:
        """Whether `save_pretrained` writes only what PAPA adds: a frozen encoder that is on disk with a hash."""
        return self.config.setting == "probe" and self.config.encoder_sha256 is not None

    def save_pretrained(self, save_directory: str | Path, **kwargs) -> None:
        """Save the model. A frozen encoder (probe setting) built from a directory or alias is not copied: only
        the probe, gates and constant matrices (``papa.safetensors``) and the config, which names the encoder
        and its sha256. Otherwise the whole model, as HF saves it."""
        if not self.saves_added_only:
            return super().save_pretrained(save_directory, **kwargs)
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(directory)
        added = {name: t.detach().cpu().contiguous() for name, t in self.state_dict().items() if _added(name)}
        save_file(added, str(directory / ADDED_WEIGHTS), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, trust_pickle: bool = False, **kwargs) -> PapaModel:
        """Reload a saved PAPA model; refuses checkpoints of another kind and pickle files (unless trusted).

        A model saved without its frozen encoder is rebuilt on that encoder, refused if its weights changed.
        """
        path = str(pretrained_model_name_or_path)
        verify_checkpoint(path, model_type=PapaConfig.model_type, trust_pickle=trust_pickle)
        if (Path(path) / ADDED_WEIGHTS).is_file():
            return cls._rebuild(Path(path), trust_pickle)
        kwargs.setdefault("use_safetensors", None if trust_pickle else True)  # never fall back to a pickle
        return super().from_pretrained(path, *args, **kwargs)

    @classmethod
    def _rebuild(cls, path: Path, trust_pickle: bool) -> PapaModel:
        config = PapaConfig.from_pretrained(path)
        encoder_path = resolve_model(config.encoder)
        digest = weights_sha256(encoder_path)
        if digest != config.encoder_sha256:
            raise FrugalError(f"{path} was trained on encoder '{config.encoder}' with weights of sha256 "
                              f"{config.encoder_sha256[:16]}, but {encoder_path} now holds "
                              f"{'no safetensors' if digest is None else digest[:16]}; restore that encoder "
                              "or train the run again")
        verify_checkpoint(encoder_path, trust_pickle=trust_pickle)
        encoder = AutoModel.from_pretrained(encoder_path, use_safetensors=None if trust_pickle else True)
        model = cls(config, backbone=encoder)
        added = load_file(str(path / ADDED_WEIGHTS))
        result = model.load_state_dict(added, strict=False)
        absent = {name for name in model.state_dict() if _added(name)} - set(added)
        if result.unexpected_keys or absent:
            raise FrugalError(f"{path / ADDED_WEIGHTS} does not match its config (unexpected "
                              f"{sorted(result.unexpected_keys)[:3]}, missing {sorted(absent)[:3]})")
        return model.eval()

    def constant_modules(self) -> list[nn.Module]:
        """Each layer's self-attention module (the one holding ``papa``)."""
        adapter = backbone_for(self.backbone)
        return [adapter.self_attention(index) for index in range(adapter.num_layers)]

    def set_constant_attention(self, constant_attention: torch.Tensor) -> None:
        """Load each layer's constant matrices from a [layers, heads, n, n] tensor."""
        with torch.no_grad():
            for index, module in enumerate(self.constant_modules()):
                module.papa.constant.copy_(constant_attention[index, module.papa.heads])

    def parameter_groups(self, lr: float, gate_lr: float) -> list[dict]:
        """Trainable parameters for an optimizer: the gates (one scalar per head) at their own learning rate."""
        gates = [p for n, p in self.named_parameters() if p.requires_grad and n.endswith("papa.gates")]
        rest = [p for n, p in self.named_parameters() if p.requires_grad and not n.endswith("papa.gates")]
        return [{"params": rest, "lr": lr}] + ([{"params": gates, "lr": gate_lr}] if gates else [])

    def gate_logits(self) -> torch.Tensor:
        """lambda of every head: [layers, heads] (a gated model only)."""
        if not self.config.gated:
            raise FrugalError("this PAPA model has no gates; build it with gated=True to rank heads")
        return torch.stack([m.papa.gates.detach() for m in self.constant_modules()])

    @torch.inference_mode()
    def encoder_flops(self) -> int:
        """FLOPs of one encoder forward on one example filling all n slots (constant heads score nothing)."""
        ids = torch.ones(1, self.config.length, dtype=torch.long, device=self.device)
        return count_flops(lambda: self.backbone(input_ids=ids, attention_mask=torch.ones_like(ids)))

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None,
               position_ids: torch.Tensor | None = None, output_attentions: bool = False
               ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """The encoder's part of `forward`: inputs [batch, seq] in the fixed layout -> hidden states
        [batch, layers + 1, seq, hidden] (embeddings first) and, if asked, the attentions."""
        if position_ids is None:
            position_ids = (torch.arange(input_ids.shape[1], device=input_ids.device)
                            + self.config.position_offset).expand_as(input_ids)
        encoder_grad = self.training and (self.config.setting == "finetune" or self.config.gated)
        for module in self.constant_modules():
            module.papa.return_probabilities = output_attentions
        with torch.set_grad_enabled(encoder_grad or (torch.is_grad_enabled() and not self.training)):
            encoded = self.backbone(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                                    position_ids=position_ids, output_hidden_states=True,
                                    output_attentions=output_attentions)
        return torch.stack(encoded.hidden_states, 1), encoded.attentions

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                output_attentions: bool = False, hidden_states: torch.Tensor | None = None) -> SequenceClassifierOutput:
        """input_ids, attention_mask, token_type_ids, position_ids: [batch, seq] in the fixed layout (seq <= n);
        labels: [batch] or None. Returns logits [batch, num_labels] (and the loss with labels).

        hidden_states: [batch, layers + 1, seq, hidden], what `encode` returns for these inputs (e.g. from
        `frugalnlp.papa.frozen_states`); given, the encoder is skipped. Only a frozen encoder (probe setting,
        no gates) may be skipped: its states never change.
        """
        attentions = None
        if hidden_states is None:
            hidden_states, attentions = self.encode(input_ids, attention_mask, token_type_ids, position_ids,
                                                    output_attentions)
        elif self.config.setting != "probe" or self.config.gated:
            raise FrugalError("precomputed hidden states need a frozen encoder (probe setting, no gates)")
        logits = self.probe(hidden_states.to(self.probe.dense.weight.dtype), attention_mask)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits, attentions=attentions)


def _added(name: str) -> bool:
    """A state-dict entry that PAPA adds to the encoder: the probe, gates and constant matrices."""
    return name.startswith("probe.") or ".papa." in name


def layout_position_offset(encoder: PreTrainedModel) -> int:
    """Position id of slot 0: RoBERTa-style embeddings count from ``padding_idx + 1``."""
    padding_idx = getattr(encoder.embeddings, "padding_idx", None)
    return padding_idx + 1 if padding_idx is not None else 0
