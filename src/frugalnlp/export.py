"""Exporting models: one ONNX graph per segment, run by ONNX Runtime (`frugalnlp.onnx_model.OnnxModel`),
decided on by the same exit step as torch.

Early exit has data-dependent control flow, so a whole model does not export; its segments do. The
first graph takes the tokens and runs the embeddings, the layers up to exit 1 and exit 1's head; each
later graph takes the hidden state and mask and runs the layers since the previous exit and its head.
The decisions stay in Python between them (`frugalnlp.early_exit.runner.adaptive_predict`), so an
exported model is one more segment runner. A cascade exports one graph per member.

``frugalnlp export RUN`` writes a run-shaped directory (``RUN/onnx`` by default, ``RUN/onnx-int8`` with
``--quantize int8``): the run's ``config.json``, a ``metrics.json`` scored with the exported graphs, and
``model/`` with the graphs, the model configs, the tokenizer and ``export.json`` (where it came from, the
weights' hash, the check against torch). Every command that takes a run takes an export directory too.
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path

import torch
from torch import nn

from frugalnlp.assets import weights_sha256
from frugalnlp.atomic import write_json
from frugalnlp.backbones.base import used_length
from frugalnlp.curves import collect_exit_logits, exit_scores
from frugalnlp.early_exit.calibration import fit_temperatures
from frugalnlp.early_exit.cascade import Cascade
from frugalnlp.encoding import encode_split, unsorted_batches
from frugalnlp.errors import FrugalError
from frugalnlp.onnx_model import EXPORT, KIND, OnnxModel, is_export, require_onnx
from frugalnlp.onnx_sessions import CANDIDATES, ROWS, SESSION_OPTIONS, time_candidates
from frugalnlp.quantization import quantization_config
from frugalnlp.run import load_run, load_spec_task
from frugalnlp.rundir import RunDir

QUANTIZATIONS = ("int8",)
# Opset 23 has attention as one op: the exporter writes scaled_dot_product_attention as `Attention`, which ONNX
# Runtime (>= 1.23) runs fused on the CPU. Measured on MiniLM (benchmarks/deploy.md) against opset 18's
# MatMul/Softmax graph and against onnxscript's ORT fusions (contrib Attention, SkipLayerNormalization, BiasGelu).
OPSET = 23
# Fused ops counted per graph in export.json: a family whose attention is not SDPA (DeBERTa-v2's disentangled,
# MPNet's relative bias) exports it as MatMul/Softmax and counts 0 Attention.
FUSED_OPS = ("Attention", "MultiHeadAttention", "LayerNormalization", "SkipLayerNormalization", "Gelu", "BiasGelu")
FP32_TOLERANCE = 1e-4  # max |ONNX - torch| of an fp32 export's exit logits on dev
_FIRST_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_NEXT_INPUTS = ("hidden", "attention_mask")
_OUTPUTS = ("next_hidden", "logits")


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
                  optimize: bool = True, opset: int = OPSET) -> None:
    """One segment to ONNX with dynamic batch and sequence axes, checked by `onnx.checker`."""
    import onnx

    batch, seq = torch.export.Dim("batch", min=1), torch.export.Dim("seq", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        try:
            torch.onnx.export(module, args, str(path), dynamo=True, opset_version=opset, input_names=list(input_names),
                              output_names=list(_OUTPUTS), dynamic_shapes=tuple({0: batch, 1: seq} for _ in args),
                              external_data=False, verbose=False, report=False, optimize=optimize)
        except Exception as error:  # torch.export names the construct it could not trace
            family = module.model.config.backbone_config.get("model_type")
            summary = str(error).strip().splitlines()
            raise FrugalError(f"the {family} family cannot be exported to ONNX here: torch.onnx.export failed "
                              f"({type(error).__name__}: {summary[-1] if summary else ''}); use --runtime torch") from None
    onnx.checker.check_model(str(path), full_check=True)


def _segment_graphs(model, folder: Path, optimize: bool = True, opset: int = OPSET) -> list[str]:
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
            _export_graph(module, args, inputs, folder / name, optimize, opset)
            hidden = module(*args)[0]
            names.append(name)
    return names


def fused_ops(path: str | Path) -> dict[str, int]:
    """How many of each fused op (`FUSED_OPS`) a graph holds, e.g. one ``Attention`` per layer."""
    import onnx

    ops = [node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node]
    return {op: ops.count(op) for op in FUSED_OPS if op in ops}


def _quantize(folder: Path, graphs: list[str], config: dict) -> None:
    """Dynamic int8 quantization of the graphs' linear layers (`onnxruntime.quantization`), in place, as
    ``config`` (`frugalnlp.quantization.quantization_config`) says for the instruction set it is for.

    Per-channel weight scales, and only matmuls with a weight operand (attention's activation products
    stay fp32): with both, MiniLM's int8 exits stay within half a point of torch's on MR. The fused ONNX
    ``Attention`` op stays fp32 too: the quantizer would take it for ONNX Runtime's own contrib op of that name.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.registry import IntegerOpsRegistry

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic logs a pre-processing hint per graph on the root logger
    try:
        for name in graphs:
            source = folder / name
            target = folder / f".{name}.int8"
            quantize_dynamic(str(source), str(target), weight_type=QuantType[config["weight_type"]],
                             per_channel=config["per_channel"], reduce_range=config["reduce_range"],
                             op_types_to_quantize=[op for op in IntegerOpsRegistry if op != "Attention"],
                             extra_options={"MatMulConstBOnly": True})
            target.replace(source)
    finally:
        root.setLevel(level)


def export_model(model, folder: str | Path, quantize: str | None = None, optimize: bool = True,
                 opset: int = OPSET, isa: str | None = None) -> dict:
    """Write an `EarlyExitModel`'s segments (a `Cascade`: each member's one graph, in ``layers-K/``) and their
    configs into ``folder``, with ``export.json``; returns that record (`OnnxModel` loads the folder).
    ``optimize=False`` skips the exporter's own graph optimizer (faster; ONNX Runtime still optimizes on load);
    ``opset`` below 23 writes attention as MatMul/Softmax (benchmarks/export_variants.py compares them).
    ``isa``: the instruction set int8 is quantized for (`frugalnlp.quantization`; default this CPU's)."""
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise FrugalError(f"unknown --quantize '{quantize}'; choose {', '.join(QUANTIZATIONS)}")
    config = quantization_config(isa) if quantize else None
    require_onnx()
    folder = Path(folder)
    cascade = isinstance(model, Cascade)
    graphs = []
    for member in model.models if cascade else [model]:
        sub = f"layers-{member.config.exit_layers[-1]}" if cascade else ""
        (folder / sub).mkdir(parents=True, exist_ok=True)
        member.config.save_pretrained(folder / sub)
        names = _segment_graphs(member, folder / sub, optimize, opset)
        if quantize:
            _quantize(folder / sub, names, config)
        graphs += [str(Path(sub) / n) for n in names]
    manifest = {"kind": KIND, "precision": quantize or "fp32", "opset": opset, "cascade": cascade, "graphs": graphs,
                "quantization": config, "session_options": dict(SESSION_OPTIONS),
                "fused_ops": {graph: fused_ops(folder / graph) for graph in graphs},
                "exit_layers": model.exit_layers, "layers_to_exit": model.layers_to_exit(),
                "temperatures": model.temperatures}
    write_json(folder / EXPORT, manifest)
    return manifest


def choose_session_options(model: OnnxModel, batch: dict[str, torch.Tensor]) -> dict:
    """The session options ``model``'s graphs run fastest with on this CPU (`frugalnlp.onnx_sessions`): each
    candidate timed on the first 1, 2, 8 and 32 rows of ``batch`` (tokens [rows, seq], each cut to the columns its
    rows use); the chosen one has the least geometric mean time over the row counts (they weigh alike: thin calls
    are what rows going on past an exit make). Returns export.json's record: ``chosen``, ``options``, ``rows``,
    ``threads``, ``ms_per_pass`` {candidate: ms of one pass through every graph, per row count}."""
    rows = [n for n in ROWS if n <= len(batch["input_ids"])]
    feeds = []
    for n in rows:
        length = used_length(batch["attention_mask"][:n])
        feeds.append(model.feeds(*(None if t is None else t[:n, :length]
                                   for t in (batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids")))))
    threads = torch.get_num_threads()
    ms = time_candidates([model.folder / g for g in model.manifest["graphs"]], feeds, threads)
    chosen = min(ms, key=lambda name: sum(math.log(t) for t in ms[name]))
    return {"chosen": chosen, "options": CANDIDATES[chosen], "rows": rows, "threads": threads,
            "ms_per_pass": ms}


def export_run(run: str | Path, output: str | Path | None = None, quantize: str | None = None,
               overwrite: bool = False, isa: str | None = None) -> dict:
    """Export a finished run's segments to ONNX (`export_model`, `OnnxModel` runs them); returns the record.

    fp32 graphs are checked against the torch model's exit logits on the run's dev split (max abs
    difference recorded; FrugalError above `FP32_TOLERANCE`) and keep its temperatures; ``quantize="int8"``
    quantizes the linear layers dynamically and fits the int8 exits' own temperatures on dev, since
    their logits differ; ``isa`` is the instruction set it is quantized for (default this CPU's,
    `frugalnlp.quantization`). The output (default ``RUN/onnx`` or ``RUN/onnx-int8``) is written as
    ``OUTPUT.partial`` and published when complete.
    """
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise FrugalError(f"unknown --quantize '{quantize}'; choose {', '.join(QUANTIZATIONS)}")
    if isa is not None and quantize is None:
        raise FrugalError("--isa goes with --quantize int8 (an fp32 export is the same for every CPU)")
    quantization_config(isa)  # an unknown --isa fails before the run loads
    require_onnx()
    trained = load_run(run)
    if isinstance(trained.model, OnnxModel):
        raise FrugalError(f"{run} is already an ONNX export; export the run it came from "
                          f"({trained.model.manifest.get('run')})")
    output = Path(output) if output is not None else Path(run) / ("onnx" if quantize is None else f"onnx-{quantize}")
    out = RunDir(output, overwrite=overwrite, kind="export", inputs=[run])
    task = load_spec_task(trained.spec)
    data = {name: encode_split(task.split(name), trained.tokenizer, trained.spec.max_length) for name in ("dev", "test")}
    path = out.open(spec={"run": str(run), "quantize": quantize, "isa": isa})
    folder = path / "model"
    model = trained.model
    manifest = export_model(model, folder, quantize, isa=isa)
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
    timing = choose_session_options(exported, unsorted_batches(data["dev"], trained.tokenizer, 32)[0])
    manifest.update(session_options=timing["options"], session_timing=timing)
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


def export_dir(run: str | Path, quantize: str | None, folder: str | Path | None = None, progress=print) -> str:
    """The run's ONNX export of that precision: its own ``RUN/onnx`` (``RUN/onnx-int8``) when there is one, else
    a new export written there (``folder`` None) or under ``folder`` (a scratch directory: benchmarks export what
    they time)."""
    own = Path(run) / ("onnx" if quantize is None else f"onnx-{quantize}")
    if is_export(own / "model"):
        return str(own)
    progress(f"exporting {run} ({'ONNX fp32' if quantize is None else f'ONNX {quantize}'})")
    output = own if folder is None else Path(folder) / f"{Path(run).name}-{own.name}"
    return export_run(run, output=output, quantize=quantize)["output"]
