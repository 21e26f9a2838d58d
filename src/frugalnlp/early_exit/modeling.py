"""EarlyExitModel: an HF encoder with a classifier after chosen layers, trained jointly or SWEET-style.

Training runs every exit (``forward``). Inference (``predict``) runs layer by layer and, at each
exit, drops the rows whose policy says leave, so the rest continue as a smaller batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers.utils import ModelOutput

from frugalnlp.assets import resolve_model, verify_checkpoint
from frugalnlp.backbones import Backbone, State, backbone_for
from frugalnlp.defaults import THRESHOLD
from frugalnlp.early_exit.config import RECIPE_FIELDS, EarlyExitConfig, ExitRecipe
from frugalnlp.early_exit.policies import ConfidencePolicy, ExitPolicy
from frugalnlp.early_exit.runner import Prediction, adaptive_predict
from frugalnlp.errors import FrugalError


def check_exit_layers(exit_layers: list[int], num_layers: int) -> list[int]:
    """Validate 1-based exit layers: ascending, unique, within the model, the last one = last layer."""
    layers = [int(x) for x in exit_layers]
    if not layers:
        raise FrugalError("exit layers are empty; give e.g. --exit-layers 1,2,4,6")
    bad = [x for x in layers if not 1 <= x <= num_layers]
    if bad:
        raise FrugalError(f"exit layer(s) {bad} out of range: this model has layers 1..{num_layers}")
    if layers != sorted(set(layers)):
        raise FrugalError(f"exit layers {layers} must be ascending and distinct")
    if layers[-1] != num_layers:
        raise FrugalError(f"exit layers {layers} must end at the last layer ({num_layers}), "
                          "so that every example gets an answer")
    return layers


def exit_loss(exit_logits: list[torch.Tensor], labels: torch.Tensor, weights: list[float], config: EarlyExitConfig,
              teacher_logits: torch.Tensor | None = None) -> torch.Tensor:
    """The exits' training loss: sum_k w_k [(1 - alpha) CE_k + alpha T^2 KL(teacher_T || exit_k,T)].

    exit_logits: one [batch, labels] per exit; labels: [batch]. The teacher is ``teacher_logits``
    ([batch, labels], ``distill="teacher"``) or the model's own last exit, detached (``distill="self"``,
    which the last exit itself does not distil from). Without distillation each term is plain CE.
    """
    if config.distill == "teacher" and teacher_logits is None:
        raise FrugalError("this model distils from a teacher: pass teacher_logits (CLI: --teacher RUN)")
    teacher = None
    if config.distill == "self":
        teacher = exit_logits[-1].detach()
    elif config.distill == "teacher":
        teacher = teacher_logits.detach()
    alpha, t = config.distill_alpha, config.distill_temperature
    total = torch.zeros((), device=labels.device)
    for k, (logits, weight) in enumerate(zip(exit_logits, weights)):
        ce = F.cross_entropy(logits.float(), labels)
        if teacher is None or (config.distill == "self" and k == len(exit_logits) - 1):
            term = ce
        else:
            kl = F.kl_div(F.log_softmax(logits.float() / t, -1), F.log_softmax(teacher.float() / t, -1),
                          reduction="batchmean", log_target=True) * t * t
            term = (1 - alpha) * ce + alpha * kl
        total = total + weight * term
    return total


class ExitHead(nn.Module):
    """One exit's classifier: pool the sequence, dense + tanh (its own pooler), dropout, linear."""

    def __init__(self, hidden_size: int, num_labels: int, pooling: str, dropout: float) -> None:
        super().__init__()
        self.pooling = pooling
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """hidden: [batch, seq, hidden], attention_mask: [batch, seq] -> logits [batch, labels]."""
        if self.pooling == "first":
            pooled = hidden[:, 0]
        else:
            weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return self.classifier(self.dropout(torch.tanh(self.dense(pooled))))


@dataclass
class EarlyExitOutput(ModelOutput):
    """loss: the exits' weighted training loss (when labels are given); exit_logits: one [batch, labels] per exit."""

    loss: torch.Tensor | None = None
    exit_logits: tuple[torch.Tensor, ...] | None = None


class EarlyExitModel(PreTrainedModel):
    """An encoder with one `ExitHead` after each of ``config.exit_layers``.

    Build one from a pretrained encoder with `from_backbone`; reload a saved one with `from_pretrained`.
    """

    config_class = EarlyExitConfig
    base_model_prefix = "backbone"
    main_input_name = "input_ids"
    # Inference (``advance``) under torch.autocast in this dtype, e.g. torch.bfloat16 on a CPU with AVX-512 BF16
    # or AMX (benchmarks/deploy.md: 1.6x at batch 32, 0.2 point on MR); None: the weights' own precision.
    autocast: torch.dtype | None = None
    supports_gradient_checkpointing = False
    _supports_sdpa = True
    _supports_attention_backend = True

    def __init__(self, config: EarlyExitConfig, backbone: PreTrainedModel | None = None) -> None:
        super().__init__(config)
        config.validate_recipe()
        if backbone is None:
            backbone_config = AutoConfig.for_model(**config.backbone_config)
            # The family's own default attention: not every family supports the wrapper's (MPNet has no sdpa).
            backbone = AutoModel.from_config(backbone_config)
        self.backbone = backbone
        adapter = backbone_for(backbone)
        adapter.strip_pooler()
        config.exit_layers = check_exit_layers(config.exit_layers, adapter.num_layers)
        if config.temperatures is None:
            config.temperatures = [1.0] * len(config.exit_layers)
        self.heads = nn.ModuleList(
            ExitHead(adapter.hidden_size, config.num_labels, config.pooling, config.classifier_dropout)
            for _ in config.exit_layers)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            std = self.config.backbone_config.get("initializer_range", 0.02)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            nn.init.zeros_(module.bias)

    @property
    def adapter(self) -> Backbone:
        return backbone_for(self.backbone)

    @property
    def num_exits(self) -> int:
        return len(self.config.exit_layers)

    @property
    def exit_layers(self) -> list[int]:
        """1-based layer after which each exit sits."""
        return list(self.config.exit_layers)

    @property
    def cost_model(self) -> EarlyExitModel:
        """Itself: its own layers and heads are what it costs (`frugalnlp.cost.FlopCost`)."""
        return self

    def layers_to_exit(self, heads: Sequence[bool] | None = None) -> list[int]:
        """Layers an example has run when it leaves at each exit (the backbone runs every layer, whichever
        ``heads`` run: see `frugalnlp.early_exit.policies.heads_run`)."""
        return self.exit_layers

    @property
    def temperatures(self) -> list[float]:
        return list(self.config.temperatures)

    @temperatures.setter
    def temperatures(self, values: list[float]) -> None:
        self.config.temperatures = [float(t) for t in values]

    def exit_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """Every exit's logits on the whole batch: one [batch, labels] per exit."""
        return self(input_ids, attention_mask, token_type_ids).exit_logits

    def inference_context(self) -> nullcontext:
        """Segments run as they are (the `SegmentRunner` interface; an ONNX export needs more)."""
        return nullcontext()

    # ------------------------------------------------------------------------------------------ building

    @classmethod
    def from_backbone(cls, backbone: str | PreTrainedModel, exit_layers: list[int] | None = None,
                      method: str = "joint", num_labels: int = 2, pooling: str = "mean",
                      num_layers: int | None = None, id2label: dict[int, str] | None = None,
                      classifier_dropout: float = 0.1, attn_implementation: str | None = None,
                      trust_pickle: bool = False, recipe: ExitRecipe | None = None,
                      **recipe_fields: float | str | None) -> EarlyExitModel:
        """Wrap a pretrained encoder (alias, hub name, path or instance) with fresh exit heads.

        ``num_layers`` truncates the encoder first (Multi-Model's shallow models); ``exit_layers``
        defaults to the last layer alone (a plain classifier). A local directory holding pickle
        weights is refused unless ``trust_pickle``. The training recipe is an `ExitRecipe`
        (``recipe``, or its fields as keywords: ``boundary_grad=0.5``), saved with the model.
        """
        unknown = sorted(set(recipe_fields) - set(RECIPE_FIELDS))
        if unknown:
            raise TypeError(f"from_backbone() got unexpected keyword argument(s) {', '.join(unknown)}")
        recipe = replace(recipe or ExitRecipe(), **recipe_fields)
        if isinstance(backbone, str):
            path = resolve_model(backbone)
            verify_checkpoint(path, trust_pickle=trust_pickle)
            backbone = AutoModel.from_pretrained(path, attn_implementation=attn_implementation,
                                                 use_safetensors=None if trust_pickle else True)
        if not isinstance(backbone, PreTrainedModel):
            raise FrugalError(f"backbone must be a model name, path or PreTrainedModel, not {type(backbone).__name__}")
        adapter = backbone_for(backbone)
        if num_layers is not None:
            if not 1 <= num_layers <= adapter.num_layers:
                raise FrugalError(f"cannot keep {num_layers} layers of a {adapter.num_layers}-layer model")
            adapter.truncate(num_layers)
        adapter.strip_pooler()
        exit_layers = exit_layers or [adapter.num_layers]
        config = EarlyExitConfig(
            backbone_config=backbone.config.to_dict(), exit_layers=exit_layers, method=method, pooling=pooling,
            classifier_dropout=classifier_dropout, num_labels=num_labels, **asdict(recipe),
            id2label=id2label or {i: str(i) for i in range(num_labels)})
        config._attn_implementation = backbone.config._attn_implementation
        return cls(config, backbone=backbone)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, trust_pickle: bool = False, **kwargs):
        """Reload a saved model; refuses checkpoints of another kind and pickle files (unless trusted)."""
        path = str(pretrained_model_name_or_path)
        verify_checkpoint(path, model_type=EarlyExitConfig.model_type, trust_pickle=trust_pickle)
        kwargs.setdefault("use_safetensors", None if trust_pickle else True)  # never fall back to a pickle
        return super().from_pretrained(path, *args, **kwargs)

    # ------------------------------------------------------------------------------------------ training

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                teacher_logits: torch.Tensor | None = None, **kwargs) -> EarlyExitOutput:
        """Run every exit. input_ids: [batch, seq]; labels: [batch]; teacher_logits: [batch, labels] (optional).

        After each exit the gradient flowing back into the layers below is multiplied by
        ``config.boundary_grad``: under SWEET (0) exit k's loss reaches only its head and the layers
        since exit k-1 (exit 1: also the embeddings); under joint (1) it reaches everything below.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        adapter = self.adapter
        state = adapter.embed(input_ids, attention_mask, token_type_ids)
        exit_logits = []
        done = 0
        for exit_layer, head in zip(self.config.exit_layers, self.heads):
            for index in range(done, exit_layer):
                state = adapter.layer(index, state)
            done = exit_layer
            exit_logits.append(head(state.hidden, state.attention_mask))
            state = state.boundary(self.config.boundary_grad)
        loss = None
        if labels is not None:
            loss = exit_loss(exit_logits, labels, self.exit_loss_weights(), self.config, teacher_logits)
        return EarlyExitOutput(loss=loss, exit_logits=tuple(exit_logits))

    def exit_loss_weights(self) -> list[float]:
        """Each exit's loss weight: all 1 (uniform), or proportional to its layer and summing to the exit count."""
        if self.config.exit_weights == "depth":
            layers = self.exit_layers
            return [len(layers) * k / sum(layers) for k in layers]
        return [1.0] * self.num_exits

    # ------------------------------------------------------------------------------------------ inference

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              token_type_ids: torch.Tensor | None = None) -> State:
        """The state before the first segment: the embedded batch ([batch, seq] ids)."""
        return self.adapter.embed(input_ids, attention_mask, token_type_ids)

    def advance(self, exit_index: int, state: State, head: bool = True) -> tuple[State, torch.Tensor | None]:
        """Run segment ``exit_index``: the layers since the previous exit, then (if ``head``) its exit.

        Returns the state after the segment and the exit's raw logits [rows, labels] (`exit_step` scales
        them), or None without ``head``: a policy that cannot leave there need not pay for the head.
        """
        adapter = self.adapter
        exit_layers = self.config.exit_layers
        with torch.autocast(self.device.type, self.autocast) if self.autocast is not None else nullcontext():
            for index in range(exit_layers[exit_index - 1] if exit_index else 0, exit_layers[exit_index]):
                state = adapter.layer(index, state)
            if not head:
                return state, None
            logits = self.heads[exit_index](state.hidden, state.attention_mask).float()
        return state, logits

    def keep_rows(self, state: State, rows: torch.Tensor | np.ndarray) -> State:
        """Only ``rows`` ([k] positions) of the batch, with the padding no kept row needs cut."""
        return self.adapter.select(state, rows)

    def merge(self, states: list[State]) -> State:
        """One batch of the rows of several states that stand at the same exit (segment-level batching)."""
        return self.adapter.merge(states)

    @torch.inference_mode()
    def predict(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, threshold: float = THRESHOLD,
                policy: ExitPolicy | None = None, max_tokens: int | None = None) -> Prediction:
        """Adaptive inference over a batch, running only the layers each example needs.

        At each exit the rows that the policy (default: calibrated max-probability >= ``threshold``)
        lets go leave; the others continue as a smaller, possibly shorter batch (`adaptive_predict`;
        ``max_tokens``: in runs of at most that many padded tokens).
        """
        return adaptive_predict(self, input_ids, attention_mask, token_type_ids,
                                policy or ConfidencePolicy(threshold), max_tokens)
