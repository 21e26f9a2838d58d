"""Running an exported model: `OnnxModel`, one ONNX Runtime session per segment graph, behind the segment
interface (`frugalnlp.early_exit.runner.SegmentRunner`), so batched predict, the server and the evaluation use
it unchanged and decide on it through the same exit step as torch. `frugalnlp.export` writes the graphs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from frugalnlp.defaults import THRESHOLD
from frugalnlp.early_exit.cascade import Cascade, cascade_layers_to_exit
from frugalnlp.early_exit.config import EarlyExitConfig
from frugalnlp.early_exit.modeling import EarlyExitModel
from frugalnlp.early_exit.policies import ConfidencePolicy, ExitPolicy
from frugalnlp.early_exit.runner import Prediction, adaptive_predict
from frugalnlp.errors import FrugalError
from frugalnlp.onnx_sessions import SESSION_OPTIONS, session_options
from frugalnlp.quantization import check_config, note_isa

EXPORT = "export.json"  # in an export's model/ folder: what makes a folder an exported model
KIND = "frugalnlp-export"


class Hidden(NamedTuple):
    """An exported shared-backbone model's state between segments: hidden [batch, seq, hidden], mask [batch, seq]
    (NumPy arrays, as ONNX Runtime takes and gives them)."""

    hidden: np.ndarray
    attention_mask: np.ndarray


class Tokens(NamedTuple):
    """An exported model's state before its first segment (a cascade's between members): [batch, seq] NumPy arrays."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray | None


def require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise FrugalError("ONNX export and --runtime onnx need the 'onnx' extra: pip install -e '.[onnx]' "
                          "(make install has it)") from None


def is_export(folder: str | Path) -> bool:
    """Whether ``folder`` is an exported model (``model/`` of an export directory)."""
    return (Path(folder) / EXPORT).is_file()


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op threads set to ``threads`` in this thread for the block, then restored.

    An export's exit decisions run in NumPy, but what runs around its graphs may still be torch (the tokeniser's
    tensors, padding, the `Prediction`); on more than one thread a torch op wakes torch's OpenMP pool, whose idle
    threads then spin on the cores ONNX Runtime's own pool is working on. On a 2-core CPU that made an int8
    segment 2-3x slower (on 2 to 32 rows, when the decisions were torch ops; `benchmarks/deploy.md`)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def read_manifest(folder: Path) -> dict:
    """An export's ``export.json``, every field that decides an answer checked against the folder: FrugalError in
    one line naming the file and what is wrong (a graph outside the folder, temperatures that are not finite and
    positive, one exit layer or temperature per graph, ...) before any graph loads."""
    path = folder / EXPORT
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise FrugalError(f"{path} cannot be read as JSON ({str(error).splitlines()[0]}); export the run again")
    if not isinstance(manifest, dict) or manifest.get("kind") != KIND:
        raise FrugalError(f"{path} is not a frugalnlp export")

    def bad(what: str) -> FrugalError:
        return FrugalError(f"{path}: {what}; export the run again")

    missing = [k for k in ("precision", "cascade", "graphs", "exit_layers", "temperatures") if k not in manifest]
    if missing:
        raise bad(f"no {', '.join(missing)}")
    graphs, layers, temperatures = manifest["graphs"], manifest["exit_layers"], manifest["temperatures"]
    if not isinstance(graphs, list) or not graphs or not all(isinstance(g, str) and g for g in graphs):
        raise bad("graphs must be a non-empty list of file names")
    if len(set(graphs)) != len(graphs):
        raise bad("a graph is listed twice")
    root = folder.resolve()
    for graph in graphs:
        where = (folder / graph).resolve()
        if Path(graph).is_absolute() or ".." in Path(graph).parts or root not in where.parents:
            raise bad(f"graph {graph!r} is not a file inside the export folder")
        if not where.is_file():
            raise bad(f"graph {graph!r} is missing")
    if manifest["cascade"] not in (True, False) or manifest["precision"] not in ("fp32", "int8"):
        raise bad("cascade must be true or false and precision fp32 or int8")
    if (not isinstance(layers, list) or len(layers) != len(graphs)
            or not all(type(k) is int and k > 0 for k in layers) or layers != sorted(set(layers))):
        raise bad(f"exit_layers must be {len(graphs)} ascending layer numbers, one per graph")
    if (not isinstance(temperatures, list) or len(temperatures) != len(graphs)
            or not all(type(t) in (int, float) and math.isfinite(t) and t > 0 for t in temperatures)):
        raise bad(f"temperatures must be {len(graphs)} finite positive numbers, one per graph")
    wrong = check_config(manifest.get("quantization"))
    if wrong:
        raise bad(wrong)
    options = manifest.get("session_options", SESSION_OPTIONS)
    if not isinstance(options, dict) or set(options) != set(SESSION_OPTIONS) or not all(
            isinstance(v, bool) for v in options.values()):
        raise bad(f"session_options must set {', '.join(SESSION_OPTIONS)} to true or false")
    return manifest


def _session(ort, graph: Path, options):
    """ONNX Runtime's session on one graph; its refusals (external data outside the folder, an unknown op, a
    truncated file) as one line naming the graph."""
    try:
        return ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own exception types, not exported under one base
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise FrugalError(f"{graph}: ONNX Runtime cannot load this graph ({first[:200]}); export the run again")


class OnnxModel:
    """An exported early-exit model or cascade on ONNX Runtime, with `EarlyExitModel`'s segment interface
    (``start``/``advance``/``keep_rows``/``merge``), so batched predict, the server and the evaluation
    use it unchanged; only the segment runner differs. CPU only.
    """

    def __init__(self, folder: str | Path, threads: int | None = None) -> None:
        """``threads``: ONNX Runtime's intra-op threads (default torch's, so that the runtimes compare on equal
        terms); the sessions run with export.json's session options (`frugalnlp.onnx_sessions`)."""
        require_onnx()
        import onnxruntime as ort

        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        self.cascade = bool(self.manifest["cascade"])
        deepest = Path(self.manifest["graphs"][-1]).parent if self.cascade else Path()
        self.config = EarlyExitConfig.from_pretrained(self.folder / deepest)
        self.exit_layers = list(self.manifest["exit_layers"])
        if not self.cascade and self.exit_layers != list(self.config.exit_layers):
            raise FrugalError(f"{self.folder / EXPORT}: exit_layers {self.exit_layers} are not the model's "
                              f"{self.config.exit_layers}; export the run again")
        self.temperatures = list(self.manifest["temperatures"])
        note_isa(self.manifest.get("quantization"), str(self.folder))
        recorded = self.manifest.get("session_options", SESSION_OPTIONS)  # exports before the timing: the default
        options = session_options(recorded, threads or torch.get_num_threads())
        self.sessions = [_session(ort, self.folder / g, options) for g in self.manifest["graphs"]]
        self._inputs = [{i.name for i in s.get_inputs()} for s in self.sessions]
        # a segment after the first resumes from a hidden state; a cascade's members each start from the tokens
        starts = [self.cascade or k == 0 for k in range(len(self.sessions))]
        if [("input_ids" in names) for names in self._inputs] != starts:
            raise FrugalError(f"{self.folder / EXPORT}: the graphs are not in segment order (the first takes the "
                              "tokens, each later one the previous segment's hidden state); export the run again")
        self.device = torch.device("cpu")
        self._pad = self.config.backbone_config.get("pad_token_id") or 0

    @property
    def num_exits(self) -> int:
        return len(self.sessions)

    def layers_to_exit(self, heads: Sequence[bool] | None = None) -> list[int]:
        """Layers an example has run when it leaves at each exit, as for the torch model (`EarlyExitModel` /
        `Cascade`'s ``layers_to_exit``)."""
        return cascade_layers_to_exit(self.exit_layers, heads) if self.cascade else self.exit_layers

    @property
    def precision(self) -> str:
        return self.manifest["precision"]

    def eval(self) -> OnnxModel:
        return self

    def to(self, device) -> OnnxModel:
        if torch.device(device).type != "cpu":
            raise FrugalError("an ONNX export runs on the CPU (onnxruntime's CPU provider); use --runtime torch on a GPU")
        return self

    @property
    def cost_model(self) -> EarlyExitModel:
        """The torch architecture's (first) model, randomly initialised: an export costs what it does."""
        return self.architecture().cost_model

    def architecture(self) -> EarlyExitModel | Cascade:
        """The torch model this export's configs describe, randomly initialised."""
        if self.cascade:
            return Cascade([EarlyExitModel(EarlyExitConfig.from_pretrained(self.folder / Path(g).parent)).eval()
                            for g in self.manifest["graphs"]])
        return EarlyExitModel(self.config).eval()

    def _feed(self, exit_index: int, state: Tokens | Hidden) -> dict[str, np.ndarray]:
        """What graph ``exit_index`` takes from ``state``: the tokens (the first graph, a cascade's every member)
        or the hidden state and its mask."""
        inputs = state._asdict() if isinstance(state, Tokens) else {"hidden": state.hidden,
                                                                      "attention_mask": state.attention_mask}
        wanted = self._inputs[exit_index]
        if "token_type_ids" in wanted and inputs.get("token_type_ids") is None:
            inputs["token_type_ids"] = np.zeros_like(inputs["input_ids"])
        return {k: np.ascontiguousarray(v) for k, v in inputs.items() if k in wanted}

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              token_type_ids: torch.Tensor | None = None) -> Tokens:
        """The state before the first segment: the tokens ([batch, seq] each).

        The state stays in NumPy between the graphs: torch ops on it would wake torch's own thread pool
        to compete with ONNX Runtime's for the same cores."""
        return Tokens(*(None if t is None else t.cpu().numpy() for t in (input_ids, attention_mask, token_type_ids)))

    def advance(self, exit_index: int, state: Tokens | Hidden,
                head: bool = True) -> tuple[Tokens | Hidden, np.ndarray | None]:
        """Run segment ``exit_index`` (a cascade: member ``exit_index``, skipped without ``head``); returns the
        state after it and the exit's raw logits [rows, labels] as ONNX Runtime gives them (NumPy: the exit
        decisions take them as they are), or None without ``head``."""
        if self.cascade and not head:
            return state, None
        hidden, logits = self.sessions[exit_index].run(None, self._feed(exit_index, state))
        if self.cascade:
            return state, logits
        # the graph's head runs regardless; a policy that cannot leave here must not see its logits
        return Hidden(hidden, state.attention_mask), logits if head else None

    def feeds(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              token_type_ids: torch.Tensor | None = None) -> list[dict[str, np.ndarray]]:
        """What each graph is fed on this batch ([batch, seq] tokens in): what `frugalnlp.onnx_sessions` times."""
        state, fed = self.start(input_ids, attention_mask, token_type_ids), []
        for e in range(self.num_exits):
            fed.append(self._feed(e, state))
            state, _ = self.advance(e, state)
        return fed

    def keep_rows(self, state: Tokens | Hidden, rows: np.ndarray | torch.Tensor) -> Tokens | Hidden:
        """Only ``rows`` ([k] positions) of the batch, cut to the columns they use."""
        rows = np.asarray(rows)
        mask = state.attention_mask[rows]
        length = int(np.flatnonzero(mask.any(0)).max()) + 1 if mask.any() else mask.shape[1]
        return type(state)(*(None if t is None else t[rows, :length] for t in state))

    def merge(self, parts: list[Tokens | Hidden]) -> Tokens | Hidden:
        """One batch of several batches' rows at the same exit, right-padded to the longest (masked)."""
        length = max(p.attention_mask.shape[1] for p in parts)

        def pad(t: np.ndarray, value: int) -> np.ndarray:
            return np.pad(t, [(0, 0), (0, length - t.shape[1])] + [(0, 0)] * (t.ndim - 2), constant_values=value)

        fill = {"input_ids": self._pad}
        return type(parts[0])(*(None if parts[0][i] is None else
                                np.concatenate([pad(p[i], fill.get(name, 0)) for p in parts])
                                for i, name in enumerate(parts[0]._fields)))

    def exit_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """Every exit's logits on the whole batch: one [batch, labels] per exit."""
        with self.inference_context():
            state, logits = self.start(input_ids, attention_mask, token_type_ids), []
            for e in range(self.num_exits):
                state, out = self.advance(e, state)
                logits.append(torch.from_numpy(out).float())
        return tuple(logits)

    def inference_context(self) -> AbstractContextManager:
        """torch on one thread (`torch_threads`): its thread pool would spin against ONNX Runtime's."""
        return torch_threads(1)

    def predict(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, threshold: float = THRESHOLD,
                policy: ExitPolicy | None = None, max_tokens: int | None = None) -> Prediction:
        """Adaptive inference over a batch, as `EarlyExitModel.predict`."""
        return adaptive_predict(self, input_ids, attention_mask, token_type_ids, policy or ConfidencePolicy(threshold),
                                max_tokens)
