"""Exported models: one ONNX graph per segment, run by ONNX Runtime, decided on by the same exit step as torch.

Early exit has data-dependent control flow, so a whole model does not export; its segments do. The
first graph takes the tokens and runs the embeddings, the layers up to exit 1 and exit 1's head; each
later graph takes the hidden state and mask and runs the layers since the previous exit and its head.
The decisions stay in Python between them (`frugalnlp.early_exit.modeling.adaptive_predict`), so an
exported model is one more implementation of the segment interface (`OnnxModel`). A cascade exports one
graph per member.

``frugalnlp export RUN`` writes a run-shaped directory (``RUN/onnx`` by default, ``RUN/onnx-int8`` with
``--quantize int8``): the run's ``config.json``, a ``metrics.json`` scored with the exported graphs, and
``model/`` with the graphs, the model configs, the tokenizer and ``export.json`` (where it came from, the
weights' hash, the check against torch). Every command that takes a run takes an export directory too.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from frugalnlp.defaults import THRESHOLD
from frugalnlp.early_exit.cascade import cascade_layers_to_exit
from frugalnlp.early_exit.config import EarlyExitConfig
from frugalnlp.early_exit.policies import ConfidencePolicy, ExitPolicy
from frugalnlp.errors import FrugalError

EXPORT = "export.json"  # in an export's model/ folder: what makes a folder an exported model
KIND = "frugalnlp-export"
QUANTIZATIONS = ("int8",)
RUNTIMES = ("torch", "onnx")
FP32_TOLERANCE = 1e-4  # max |ONNX - torch| of an fp32 export's exit logits on dev
_FIRST_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_NEXT_INPUTS = ("hidden", "attention_mask")
_OUTPUTS = ("next_hidden", "logits")


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


# ---------------------------------------------------------------------------------------------- writing


class _FirstSegment(nn.Module):
    """(input_ids, attention_mask, token_type_ids) [batch, seq] -> (hidden after exit 1's layers, exit 1's logits)."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        state, logits = self.model.advance(0, self.model.start(input_ids, attention_mask, token_type_ids))
        return state.hidden, logits


class _NextSegment(nn.Module):
    """(hidden [batch, seq, hidden], attention_mask [batch, seq]) -> (hidden after exit k's layers, exit k's logits).

    The family's layer mask and shared position tensors are rebuilt inside (`Backbone.resume`).
    """

    def __init__(self, model, exit_index: int) -> None:
        super().__init__()
        self.model, self.exit_index = model, exit_index

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        state = self.model.adapter.resume(hidden, attention_mask)
        state, logits = self.model.advance(self.exit_index, state)
        return state.hidden, logits


def _export_graph(module: nn.Module, args: tuple[torch.Tensor, ...], input_names: tuple[str, ...], path: Path,
                  optimize: bool = True) -> None:
    """One segment to ONNX with dynamic batch and sequence axes, checked by `onnx.checker`."""
    import onnx

    batch, seq = torch.export.Dim("batch", min=1), torch.export.Dim("seq", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        try:
            torch.onnx.export(module, args, str(path), dynamo=True, input_names=list(input_names),
                              output_names=list(_OUTPUTS), dynamic_shapes=tuple({0: batch, 1: seq} for _ in args),
                              external_data=False, verbose=False, report=False, optimize=optimize)
        except Exception as error:  # torch.export names the construct it could not trace
            family = module.model.config.backbone_config.get("model_type")
            summary = str(error).strip().splitlines()
            raise FrugalError(f"the {family} family cannot be exported to ONNX here: torch.onnx.export failed "
                              f"({type(error).__name__}: {summary[-1] if summary else ''}); use --runtime torch") from None
    onnx.checker.check_model(str(path), full_check=True)


def _segment_graphs(model, folder: Path, optimize: bool = True) -> list[str]:
    """Export each segment of an `EarlyExitModel` into ``folder``; returns the graph file names."""
    model = model.eval()
    ids = torch.tensor([[2, 5, 6, 7, 8, 9, 3, 0], [2, 10, 11, 12, 3, 0, 0, 0]])  # batch 2, seq 8: not 0/1-specialised
    mask = (ids != 0).long()
    tokens = (ids, mask, torch.zeros_like(ids))
    names = []
    with torch.no_grad():
        hidden = None
        for e in range(model.num_exits):
            name = f"segment-{e}.onnx" if model.num_exits > 1 else "segment.onnx"
            if e == 0:
                module, args, inputs = _FirstSegment(model), tokens, _FIRST_INPUTS
            else:
                module, args, inputs = _NextSegment(model, e), (hidden, mask), _NEXT_INPUTS
            _export_graph(module, args, inputs, folder / name, optimize)
            hidden = module(*args)[0]
            names.append(name)
    return names


def _quantize(folder: Path, graphs: list[str]) -> None:
    """Dynamic int8 quantization of the graphs' linear layers (`onnxruntime.quantization`), in place.

    Per-channel weight scales, and only matmuls with a weight operand (attention's activation products
    stay fp32): with both, MiniLM's int8 exits stay within half a point of torch's on MR.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic logs a pre-processing hint per graph on the root logger
    try:
        for name in graphs:
            source = folder / name
            target = folder / f".{name}.int8"
            quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True,
                             extra_options={"MatMulConstBOnly": True})
            target.replace(source)
    finally:
        root.setLevel(level)


def export_model(model, folder: str | Path, quantize: str | None = None, optimize: bool = True) -> dict:
    """Write an `EarlyExitModel`'s segments (a `Cascade`: each member's one graph, in ``layers-K/``) and their
    configs into ``folder``, with ``export.json``; returns that record (`OnnxModel` loads the folder).
    ``optimize=False`` skips the exporter's own graph optimizer (faster; ONNX Runtime still optimizes on load)."""
    from frugalnlp.early_exit.cascade import Cascade

    if quantize is not None and quantize not in QUANTIZATIONS:
        raise FrugalError(f"unknown --quantize '{quantize}'; choose {', '.join(QUANTIZATIONS)}")
    _require_onnx()
    from frugalnlp.rundir import write_json

    folder = Path(folder)
    cascade = isinstance(model, Cascade)
    graphs = []
    for member in model.models if cascade else [model]:
        sub = f"layers-{member.config.exit_layers[-1]}" if cascade else ""
        (folder / sub).mkdir(parents=True, exist_ok=True)
        member.config.save_pretrained(folder / sub)
        names = _segment_graphs(member, folder / sub, optimize)
        if quantize:
            _quantize(folder / sub, names)
        graphs += [str(Path(sub) / n) for n in names]
    manifest = {"kind": KIND, "precision": quantize or "fp32", "cascade": cascade, "graphs": graphs,
                "exit_layers": model.exit_layers, "layers_to_exit": model.layers_to_exit(),
                "temperatures": model.temperatures}
    write_json(folder / EXPORT, manifest)
    return manifest


def export_run(run: str | Path, output: str | Path | None = None, quantize: str | None = None,
               overwrite: bool = False) -> dict:
    """Export a finished run's segments to ONNX (`export_model`, `OnnxModel` runs them); returns the record.

    fp32 graphs are checked against the torch model's exit logits on the run's dev split (max abs
    difference recorded; FrugalError above `FP32_TOLERANCE`) and keep its temperatures; ``quantize="int8"``
    quantizes the linear layers dynamically and fits the int8 exits' own temperatures on dev, since
    their logits differ. The output (default ``RUN/onnx`` or ``RUN/onnx-int8``) is written as
    ``OUTPUT.partial`` and published when complete.
    """
    from frugalnlp.assets import weights_sha256
    from frugalnlp.early_exit.calibration import fit_temperatures
    from frugalnlp.encoding import encode_split
    from frugalnlp.evaluation import collect_exit_logits, exit_scores
    from frugalnlp.rundir import RunDir, write_json
    from frugalnlp.run import load_run, load_spec_task

    if quantize is not None and quantize not in QUANTIZATIONS:
        raise FrugalError(f"unknown --quantize '{quantize}'; choose {', '.join(QUANTIZATIONS)}")
    _require_onnx()
    trained = load_run(run)
    if isinstance(trained.model, OnnxModel):
        raise FrugalError(f"{run} is already an ONNX export; export the run it came from "
                          f"({trained.model.manifest.get('run')})")
    output = Path(output) if output is not None else Path(run) / ("onnx" if quantize is None else f"onnx-{quantize}")
    out = RunDir(output, overwrite=overwrite)
    task = load_spec_task(trained.spec)
    data = {name: encode_split(task.split(name), trained.tokenizer, trained.spec.max_length) for name in ("dev", "test")}
    path = out.open(spec={"run": str(run), "quantize": quantize})
    folder = path / "model"
    model = trained.model
    manifest = export_model(model, folder, quantize)
    trained.tokenizer.save_pretrained(folder)
    exported = OnnxModel(folder)
    logits = {name: collect_exit_logits(exported, data[name], trained.tokenizer, trained.spec.eval_batch_size)
              for name in ("dev", "test")}
    reference = collect_exit_logits(model, data["dev"], trained.tokenizer, trained.spec.eval_batch_size)
    diff = (logits["dev"] - reference).abs().amax(dim=(1, 2)).tolist()
    if quantize is None and max(diff) > FP32_TOLERANCE:
        raise FrugalError(f"the exported graphs' exit logits differ from torch's by up to {max(diff):.2e} on dev "
                          f"(tolerance {FP32_TOLERANCE:g}); the export is left in {path} for inspection")
    if quantize:
        manifest["temperatures"] = fit_temperatures(logits["dev"], torch.as_tensor(task.dev.labels))
    manifest.update(run=str(Path(run).resolve()), run_sha256=weights_sha256(Path(run) / "model", recursive=True),
                    check={"split": "dev", "examples": len(task.dev), "max_abs_diff_vs_torch": diff})
    write_json(folder / EXPORT, manifest)
    write_json(path / "config.json",
               dict(trained.config, exported_from={k: manifest[k] for k in ("run", "run_sha256", "precision")}))
    metrics = {name: {"examples": len(task.split(name)),
                      "exits": exit_scores(exported, logits[name], task.split(name).labels)} for name in ("dev", "test")}
    for name in ("dev", "test"):
        metrics[name].update({k: metrics[name]["exits"][-1][k] for k in ("accuracy", "macro_f1")})
    metrics.update(temperatures=manifest["temperatures"], precision=manifest["precision"], check=manifest["check"])
    write_json(path / "metrics.json", metrics)
    final = out.commit()
    return {"output": str(final), **manifest}


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise FrugalError("ONNX export and --runtime onnx need the 'onnx' extra: pip install -e '.[onnx]' "
                          "(make install has it)") from None


# ---------------------------------------------------------------------------------------------- running


def is_export(folder: str | Path) -> bool:
    """Whether ``folder`` is an exported model (``model/`` of an export directory)."""
    return (Path(folder) / EXPORT).is_file()


def runtime_path(run: str | Path, runtime: str | None) -> Path:
    """The directory to load for ``runtime``: ``run`` itself, or for ``onnx`` on a torch run its ``RUN/onnx``
    export. An export directory is ONNX whatever the flag; ``--runtime torch`` on one is refused."""
    run = Path(run)
    if runtime is not None and runtime not in RUNTIMES:
        raise FrugalError(f"unknown --runtime '{runtime}'; choose one of {', '.join(RUNTIMES)}")
    exported = is_export(run / "model")
    if runtime == "torch" and exported:
        came_from = json.loads((run / "model" / EXPORT).read_text()).get("run")
        raise FrugalError(f"{run} is an ONNX export; for --runtime torch give the run it came from ({came_from})")
    if runtime == "onnx" and not exported:
        if is_export(run / "onnx" / "model"):
            return run / "onnx"
        raise FrugalError(f"{run} has no ONNX export: run `frugalnlp export {run}` (writes {run / 'onnx'}), "
                          "or give an export directory")
    return run


_POOL: list[int] = []  # the process's one ONNX Runtime thread pool size, once created


def _shared_thread_pool(threads: int) -> bool:
    """Whether sessions can use one global thread pool of ``threads`` threads (torch's, so that the runtimes
    compare on equal terms). ONNX Runtime creates it with its environment, once per process: a later call
    with another size gets per-session pools."""
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

    if not _POOL:
        try:
            ort_state.set_global_thread_pool_sizes(threads, 1)
            _POOL.append(threads)
        except Exception:  # the environment exists already (a session was made elsewhere in this process)
            _POOL.append(0)
    return _POOL[0] == threads


class OnnxModel:
    """An exported early-exit model or cascade on ONNX Runtime, with `EarlyExitModel`'s segment interface
    (``start``/``advance``/``keep_rows``/``merge``), so batched predict, the server and the evaluation
    use it unchanged; only the segment runner differs. CPU only.
    """

    def __init__(self, folder: str | Path, threads: int | None = None) -> None:
        _require_onnx()
        import onnxruntime as ort

        self.folder = Path(folder)
        self.manifest = json.loads((self.folder / EXPORT).read_text())
        if self.manifest.get("kind") != KIND:
            raise FrugalError(f"{self.folder / EXPORT} is not a frugalnlp export")
        self.cascade = bool(self.manifest["cascade"])
        deepest = Path(self.manifest["graphs"][-1]).parent if self.cascade else Path()
        self.config = EarlyExitConfig.from_pretrained(self.folder / deepest)
        self.exit_layers = list(self.manifest["exit_layers"])
        self.temperatures = list(self.manifest["temperatures"])
        options = ort.SessionOptions()
        if _shared_thread_pool(threads or torch.get_num_threads()):
            # one pool for every segment's session: per-session pools would wait on (or spin against) each other
            options.use_per_session_threads = False
        else:
            options.intra_op_num_threads = threads or torch.get_num_threads()
            options.inter_op_num_threads = 1
        # idle threads sleep rather than spin: the server's event loop and tokeniser share these cores
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.sessions = [ort.InferenceSession(str(self.folder / g), options, providers=["CPUExecutionProvider"])
                         for g in self.manifest["graphs"]]
        self._inputs = [{i.name for i in s.get_inputs()} for s in self.sessions]
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

    def architecture(self):
        """The torch model this export's configs describe, randomly initialised: what FLOPs are counted on."""
        from frugalnlp.early_exit.cascade import Cascade
        from frugalnlp.early_exit.modeling import EarlyExitModel

        if self.cascade:
            return Cascade([EarlyExitModel(EarlyExitConfig.from_pretrained(self.folder / Path(g).parent)).eval()
                            for g in self.manifest["graphs"]])
        return EarlyExitModel(self.config).eval()

    def _run(self, exit_index: int, **inputs: np.ndarray | None) -> tuple[np.ndarray, torch.Tensor]:
        wanted = self._inputs[exit_index]
        if "token_type_ids" in wanted and inputs.get("token_type_ids") is None:
            inputs["token_type_ids"] = np.zeros_like(inputs["input_ids"])
        feed = {k: np.ascontiguousarray(v) for k, v in inputs.items() if k in wanted}
        hidden, logits = self.sessions[exit_index].run(None, feed)
        return hidden, torch.from_numpy(logits).float()

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              token_type_ids: torch.Tensor | None = None) -> Tokens:
        """The state before the first segment: the tokens ([batch, seq] each).

        The state stays in NumPy between the graphs: torch ops on it would wake torch's own thread pool
        to compete with ONNX Runtime's for the same cores."""
        return Tokens(*(None if t is None else t.cpu().numpy() for t in (input_ids, attention_mask, token_type_ids)))

    def advance(self, exit_index: int, state: Tokens | Hidden,
                head: bool = True) -> tuple[Tokens | Hidden, torch.Tensor | None]:
        """Run segment ``exit_index`` (a cascade: member ``exit_index``, skipped without ``head``); returns the
        state after it and the exit's raw logits [rows, labels], or None without ``head``."""
        if self.cascade:
            if not head:
                return state, None
            return state, self._run(exit_index, **state._asdict())[1]
        if exit_index == 0:
            hidden, logits = self._run(0, **state._asdict())
        else:
            hidden, logits = self._run(exit_index, hidden=state.hidden, attention_mask=state.attention_mask)
        # the graph's head runs regardless; a policy that cannot leave here must not see its logits
        return Hidden(hidden, state.attention_mask), logits if head else None

    def keep_rows(self, state: Tokens | Hidden, rows: torch.Tensor) -> Tokens | Hidden:
        """Only ``rows`` ([k] positions) of the batch, cut to the columns they use."""
        rows = rows.cpu().numpy()
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
        state, logits = self.start(input_ids, attention_mask, token_type_ids), []
        for e in range(self.num_exits):
            state, out = self.advance(e, state)
            logits.append(out)
        return tuple(logits)

    def predict(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, threshold: float = THRESHOLD,
                policy: ExitPolicy | None = None, max_tokens: int | None = None):
        """Adaptive inference over a batch, as `EarlyExitModel.predict`."""
        from frugalnlp.early_exit.modeling import adaptive_predict

        return adaptive_predict(self, input_ids, attention_mask, token_type_ids, policy or ConfidencePolicy(threshold),
                                max_tokens)
