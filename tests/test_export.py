"""ONNX export: every family's segments match torch's exit logits, `--runtime onnx` decides as torch does
(batch 1, batched, token-budget packing, the real server), int8 keeps its own logits and temperatures."""

import json
import math

import pytest
import torch
from conftest import run_cli
from test_backbones import make_backbone, padded_batch

from frugalnlp import EarlyExitModel
from frugalnlp.early_exit.cascade import Cascade
from frugalnlp.early_exit.registry import make_policy
from frugalnlp.early_exit.runner import length_runs
from frugalnlp.errors import FrugalError
from frugalnlp.export import export_model, export_run, fused_ops
from frugalnlp.manifest import write_manifest
from frugalnlp.onnx_model import OnnxModel
from frugalnlp.onnx_sessions import CANDIDATES
from frugalnlp.predict import Predictor
from frugalnlp.run import runtime_path
from frugalnlp.tasks import load_task

FAMILIES = ["bert", "roberta", "deberta-v2", "mpnet"]
FUSED = {"bert", "roberta"}  # attention through SDPA: one ONNX Attention op per layer (DeBERTa-v2 and MPNet: MatMuls)


def _decisions(prediction):
    return prediction.exit_index.tolist(), prediction.labels.tolist()


def _middle_threshold(model, ids, mask, types):
    """A confidence threshold at which rows leave at different exits, halfway between two rows' confidences
    (a row within float error of a threshold may go either way)."""
    with torch.no_grad():
        logits = model.exit_logits(ids, mask, types)[0] / model.temperatures[0]
    confidence = logits.softmax(-1).amax(-1).sort().values
    middle = len(confidence) // 2
    return float(confidence[middle - 1:middle + 1].mean())


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_exports_segments_that_match_torch_and_decide_alike(family, tmp_path):
    torch.manual_seed(0)
    model = EarlyExitModel.from_backbone(make_backbone(family), exit_layers=[2, 4], num_labels=3).eval()
    manifest = export_model(model, tmp_path, optimize=False)  # the exporter's optimizer only costs time here
    # two layers per segment, each with its attention fused into one op where the family's attention is SDPA
    for graph in ("segment-0.onnx", "segment-1.onnx"):
        assert fused_ops(tmp_path / graph).get("Attention", 0) == (2 if family in FUSED else 0), (family, graph)
        assert manifest["fused_ops"][graph] == fused_ops(tmp_path / graph)
    exported = OnnxModel(tmp_path)
    for n, seq, seed in ((12, 14, 1), (1, 5, 2), (5, 30, 3)):  # batch and length unlike the traced example
        ids, mask, types = padded_batch(n=n, seq=seq, pad=1 if family != "bert" else 0, seed=seed)
        types = None if family == "mpnet" else types
        with torch.no_grad():
            expected = model.exit_logits(ids, mask, types)
        got = exported.exit_logits(ids, mask, types)
        assert len(got) == 2
        for e, (g, x) in enumerate(zip(got, expected)):
            assert (g - x).abs().max() <= 1e-4, (family, e)
    ids, mask, types = padded_batch(n=24, seq=20, pad=1 if family != "bert" else 0, seed=4)
    types = None if family == "mpnet" else types
    threshold = _middle_threshold(model, ids, mask, types)
    for policy_name in ("confidence", "patience"):
        policy = make_policy(policy_name, threshold, 2)
        reference = _decisions(model.predict(ids, mask, types, policy=policy))
        assert len(set(reference[0])) > 1 or policy_name == "patience"
        assert _decisions(exported.predict(ids, mask, types, policy=policy)) == reference
        assert _decisions(exported.predict(ids, mask, types, policy=policy, max_tokens=60)) == reference
        assert _decisions(model.predict(ids, mask, types, policy=policy, max_tokens=60)) == reference


def test_a_cascade_exports_one_graph_per_member(tmp_path):
    torch.manual_seed(0)
    members = [EarlyExitModel.from_backbone(make_backbone("bert"), num_layers=k, num_labels=2).eval() for k in (1, 2)]
    cascade = Cascade(members)
    manifest = export_model(cascade, tmp_path, optimize=False)
    assert manifest["graphs"] == ["layers-1/segment.onnx", "layers-2/segment.onnx"]
    exported = OnnxModel(tmp_path)
    assert exported.layers_to_exit() == [1, 3] and exported.layers_to_exit([False, True]) == [0, 2]
    ids, mask, types = padded_batch(n=10, seq=12, seed=5)
    with torch.no_grad():
        expected = cascade.exit_logits(ids, mask, types)
    for g, x in zip(exported.exit_logits(ids, mask, types), expected):
        assert (g - x).abs().max() <= 1e-4
    policy = make_policy("confidence", _middle_threshold(cascade, ids, mask, types), 2)
    assert _decisions(exported.predict(ids, mask, types, policy=policy)) == \
        _decisions(cascade.predict(ids, mask, types, policy=policy))


def test_a_family_that_cannot_be_exported_is_refused_naming_why(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("Could not guard on data-dependent expression u0 > 1")

    monkeypatch.setattr(torch.onnx, "export", fail)
    model = EarlyExitModel.from_backbone(make_backbone("mpnet"), exit_layers=[2, 4], num_labels=2).eval()
    with pytest.raises(FrugalError, match=r"mpnet family cannot be exported.*data-dependent.*--runtime torch"):
        export_model(model, tmp_path)


def test_length_runs_pack_sorted_rows_within_the_token_budget():
    lengths = torch.tensor([9, 3, 3, 20, 5, 1, 7, 7, 2, 4])
    mask = (torch.arange(20)[None] < lengths[:, None]).long()
    runs = [torch.from_numpy(r) for r in length_runs(mask, max_tokens=16)]
    order = torch.cat(runs)
    assert sorted(order.tolist()) == list(range(10))
    assert lengths[order].tolist() == sorted(lengths.tolist())
    for run in runs:
        assert len(run) * int(lengths[run].max()) <= 16 or len(run) == 1  # a row over the budget runs alone
    for a, b in zip(runs, runs[1:]):  # greedy: the next row would not have fitted
        assert (len(a) + 1) * int(lengths[b[0]]) > 16
    assert [len(r) for r in length_runs(mask, max_rows=4)] == [4, 4, 2]


@pytest.fixture(scope="module")
def exported_run(tiny_run, tmp_path_factory):
    path = tmp_path_factory.mktemp("exports") / "onnx"
    export_run(tiny_run, output=path)
    return path


@pytest.fixture(scope="module")
def mixed_threshold(tiny_run):
    texts = load_task("mr").test.texts[:40]
    confidence = sorted(p["confidence"] for p in Predictor(tiny_run, threshold=0.0)(texts))
    for t in (confidence[len(confidence) // 2], confidence[len(confidence) // 4], 0.55, 0.51):
        if len({p["exit_layer"] for p in Predictor(tiny_run, threshold=t)(texts)}) > 1:
            return t
    return confidence[len(confidence) // 2]


def test_predict_with_runtime_onnx_gives_the_torch_decisions(tiny_run, exported_run, mixed_threshold, tmp_path, capsys):
    rows = load_task("mr").test.texts[:60]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(f'{{"text": {json.dumps(t)}}}\n' for t in rows))
    outputs = {}
    for name, args in (("torch", []), ("onnx", ["--runtime", "onnx", "--batch-size", "64", "--max-tokens", "300"])):
        run = exported_run if name == "onnx" else tiny_run
        out = tmp_path / f"{name}.jsonl"
        status, _, err = run_cli(["predict", run, "--input", source, "--output", out, "--threshold",
                                  mixed_threshold, *args], capsys)
        assert status == 0, err
        outputs[name] = [json.loads(line) for line in out.read_text().splitlines()]
    assert len({r["exit_layer"] for r in outputs["torch"]}) > 1
    for a, b in zip(outputs["torch"], outputs["onnx"]):
        assert (a["label"], a["exit_layer"]) == (b["label"], b["exit_layer"])
        assert a["confidence"] == pytest.approx(b["confidence"], abs=1e-5)
    status, _, err = run_cli(["predict", exported_run, "--runtime", "torch", "--input", source, "--output",
                              tmp_path / "x.jsonl"], capsys)
    assert status == 2 and "is an ONNX export" in err
    with pytest.raises(FrugalError, match="has no ONNX export: run `frugalnlp export"):
        runtime_path(tmp_path, "onnx")
    assert runtime_path(exported_run, None) == exported_run


def test_an_export_runs_its_segments_with_torch_on_one_thread(exported_run):
    """torch's thread pool is off while an export runs (its idle threads would spin against ONNX Runtime's) and
    is given back after, also when a segment fails."""
    from frugalnlp.onnx_model import torch_threads

    model = OnnxModel(exported_run / "model")
    ids = torch.randint(5, 100, (4, 12))
    seen, advance = [], model.advance
    model.advance = lambda *args, **kwargs: (seen.append(torch.get_num_threads()), advance(*args, **kwargs))[1]
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # as on a 2-core machine, whatever this one has
    try:
        model.predict(ids, torch.ones_like(ids), threshold=1.0)
        model.exit_logits(ids, torch.ones_like(ids))
        assert set(seen) == {1} and len(seen) == 2 * model.num_exits and torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), torch_threads(1):
            raise RuntimeError("a failing segment")
        assert torch.get_num_threads() == 2
    finally:  # a failed assertion must not leave the rest of the suite on 2 threads
        torch.set_num_threads(before)


def test_int8_curve_comes_from_its_own_logits_and_temperatures(tiny_run, exported_run, tmp_path):
    import onnx

    from frugalnlp.curves import replay, split_scores
    from frugalnlp.early_exit.calibration import fit_temperatures
    from frugalnlp.evaluation import evaluate_run
    from frugalnlp.run import load_run

    int8 = tmp_path / "int8"
    record = export_run(tiny_run, output=int8, quantize="int8")
    assert record["precision"] == "int8"
    layers = [b - a for a, b in zip([0, *record["exit_layers"]], record["exit_layers"])]
    for graph, k in zip(record["graphs"], layers):  # attention stays one fused fp32 op; the linear layers are int8
        assert fused_ops(int8 / "model" / graph)["Attention"] == k
        assert "MatMulInteger" in {node.op_type for node in onnx.load(str(int8 / "model" / graph)).graph.node}
    quantized, fp32, torch_run = load_run(int8), load_run(exported_run), load_run(tiny_run)
    dev8, dev32 = split_scores(quantized, "dev"), split_scores(fp32, "dev")
    assert (dev8.exit_logits - dev32.exit_logits).abs().max() > 1e-4  # int8 logits really differ
    assert (dev32.exit_logits - split_scores(torch_run, "dev").exit_logits).abs().max() <= 1e-4
    assert quantized.model.temperatures == pytest.approx(fit_temperatures(dev8.exit_logits, torch.as_tensor(dev8.gold)))
    assert fp32.model.temperatures == torch_run.model.temperatures
    _, result = evaluate_run(int8, thresholds=5)
    test8 = split_scores(quantized, "test")
    for point in result["points"]:
        exits, labels = replay(test8.exit_logits, quantized.model.temperatures,
                               make_policy("confidence", point["threshold"], 3))
        assert point["accuracy"] == pytest.approx(float((labels.numpy() == test8.gold).mean()))


def test_server_with_runtime_onnx_and_max_tokens_answers_as_predict_one_at_a_time(exported_run, mixed_threshold):
    from test_serving import Server, post_all

    texts = load_task("mr").test.texts[:40]
    single = Predictor(exported_run, threshold=mixed_threshold, batch_size=1)
    expected = [single([t])[0] for t in texts]
    assert len({e["exit_layer"] for e in expected}) > 1
    requests = [texts[i:i + 2] for i in range(0, len(texts), 2)]  # 20 requests
    server = Server(exported_run, "--runtime", "onnx", "--threshold", str(mixed_threshold), "--max-tokens", "96",
                    "--max-batch", "16", "--max-wait-ms", "50")
    try:
        responses = post_all(server.url, requests)
        assert [r.status_code for r in responses] == [200] * 20
        got = [p for r in responses for p in r.json()["predictions"]]
        for g, e in zip(got, expected):
            assert (g["label"], g["exit_layer"], g["layers_run"]) == (e["label"], e["exit_layer"], e["layers_run"])
            assert g["confidence"] == pytest.approx(e["confidence"], abs=1e-5)
    finally:
        assert server.stop() == 0


def test_the_real_checkpoint_exports_within_tolerance(tmp_path):
    torch.manual_seed(0)
    model = EarlyExitModel.from_backbone("minilm", exit_layers=[3, 6], num_labels=2).eval()
    manifest = export_model(model, tmp_path)
    assert [ops["Attention"] for ops in manifest["fused_ops"].values()] == [3, 3]  # one per layer, every layer
    exported = OnnxModel(tmp_path)
    ids, mask, types = padded_batch(n=6, seq=40, seed=6)
    ids[ids >= 120] = 100
    with torch.no_grad():
        expected = model.exit_logits(ids, mask, types)
    for g, x in zip(exported.exit_logits(ids, mask, types), expected):
        assert (g - x).abs().max() <= 1e-4


def _edit(manifest: dict, key: str, value) -> dict:
    return {k: v for k, v in manifest.items() if k != key} if value is _DROP else {**manifest, key: value}


_DROP = object()


@pytest.mark.parametrize("key,value,message", [
    ("temperatures", [1.0, 0.0, 1.0], "temperatures must be 3 finite positive numbers"),
    ("temperatures", [1.0, -2.0, 1.0], "temperatures must be"),
    ("temperatures", [1.0, 1.0], "temperatures must be 3"),
    ("temperatures", [1.0, "1", 1.0], "temperatures must be"),
    ("temperatures", _DROP, "no temperatures"),
    ("exit_layers", [1, 2], "exit_layers must be 3 ascending"),
    ("exit_layers", [2, 1, 4], "exit_layers must be 3 ascending"),
    ("exit_layers", [1, 2, 3], "are not the model's"),
    ("graphs", [], "graphs must be a non-empty list"),
    ("graphs", "segment-1.onnx", "graphs must be a non-empty list"),
    ("graphs", ["GRAPH0", "GRAPH0", "GRAPH2"], "listed twice"),
    ("graphs", ["GRAPH1", "GRAPH0", "GRAPH2"], "not in segment order"),
    ("graphs", ["/etc/passwd", "GRAPH1", "GRAPH2"], "not a file inside the export folder"),
    ("graphs", ["../x.onnx", "GRAPH1", "GRAPH2"], "not a file inside the export folder"),
    ("graphs", ["GRAPH0", "GRAPH1", "gone.onnx"], "is missing"),
    ("precision", "int4", "precision fp32 or int8"),
    ("kind", "something", "is not a frugalnlp export"),
])
def test_an_edited_export_json_is_refused_in_one_line_before_any_graph_loads(exported_run, tmp_path, capsys,
                                                                            key, value, message):
    import shutil

    from test_cli_errors import assert_clean_error

    export = tmp_path / "export"
    shutil.copytree(exported_run, export)
    path = export / "model" / "export.json"
    manifest = json.loads(path.read_text())
    graphs = manifest["graphs"]
    if isinstance(value, list):
        value = [graphs[int(v[5:])] if isinstance(v, str) and v.startswith("GRAPH") else v for v in value]
    path.write_text(json.dumps(_edit(manifest, key, value)))
    write_manifest(export)  # as if the manifest were rewritten too: export.json's own checks still hold
    data = tmp_path / "in.jsonl"
    data.write_text('{"text": "a fine film"}\n')
    status, _, err = run_cli(["predict", export, "--threshold", 0.9, "--input", data, "--output", tmp_path / "o.jsonl"],
                             capsys)
    assert_clean_error(status, err, message)
    assert not (tmp_path / "o.jsonl").exists()


def test_a_truncated_graph_is_refused_in_one_line(exported_run, tmp_path, capsys):
    import shutil

    from test_cli_errors import assert_clean_error

    export = tmp_path / "export"
    shutil.copytree(exported_run, export)
    graph = export / "model" / json.loads((export / "model" / "export.json").read_text())["graphs"][1]
    graph.write_bytes(graph.read_bytes()[:200])
    write_manifest(export)  # past the manifest, ONNX Runtime's own refusal is one line too
    data = tmp_path / "in.jsonl"
    data.write_text('{"text": "a fine film"}\n')
    status, _, err = run_cli(["predict", export, "--threshold", 0.9, "--input", data, "--output", tmp_path / "o.jsonl"],
                             capsys)
    assert_clean_error(status, err, "ONNX Runtime cannot load this graph")


def test_int8_is_quantized_for_an_instruction_set_recorded_in_export_json_and_flagged_on_another_cpu(
        tiny_run, tmp_path, capsys, monkeypatch):
    """export.json records the quantization configuration and the session options; an export quantized for an
    instruction set this CPU lacks loads with one line saying its speed or accuracy may not hold."""
    import onnx

    import frugalnlp.quantization as quantization
    from frugalnlp.quantization import detect_isa, quantization_config

    assert detect_isa({"avx2": True, "avx512f": True, "avx512_vnni": False}) == "avx512"
    assert detect_isa({"avx2": True, "avx_vnni": True}) == "avx512_vnni"  # AVX-VNNI: no saturation either
    assert detect_isa({"arm64": True}) == "arm64" and detect_isa({}) == "avx2"
    assert quantization_config("avx2")["reduce_range"] and not quantization_config("avx512_vnni")["reduce_range"]
    status, out, err = run_cli(["export", tiny_run, "--quantize", "int8", "--isa", "avx2", "--output",
                                tmp_path / "avx2"], capsys)
    assert status == 0, err
    assert "int8 for avx2 (chosen by --isa)" in out and "range reduced to 7 bits" in out
    record = json.loads((tmp_path / "avx2" / "model" / "export.json").read_text())
    assert record["quantization"]["isa"] == "avx2" and record["quantization"]["reduce_range"] is True
    assert record["quantization"]["per_channel"] is True and record["quantization"]["weight_type"] == "QInt8"
    timing = record["session_timing"]  # the session options are chosen by timing them on this CPU
    assert record["session_options"] == CANDIDATES[timing["chosen"]] and timing["rows"] == [1, 2, 8, 32]
    assert set(timing["ms_per_pass"]) == set(CANDIDATES)
    assert all(len(ms) == 4 and all(0 < t < math.inf for t in ms) for ms in timing["ms_per_pass"].values())
    log_sums = {name: sum(math.log(t) for t in ms) for name, ms in timing["ms_per_pass"].items()}
    assert timing["chosen"] == min(log_sums, key=log_sums.get) and "chosen: " + timing["chosen"] in out
    graph = onnx.load(str(tmp_path / "avx2" / "model" / record["graphs"][0]))
    assert "MatMulInteger" in {node.op_type for node in graph.graph.node}
    auto = export_run(tiny_run, output=tmp_path / "auto", quantize="int8")
    assert auto["quantization"]["isa"] == detect_isa() and auto["quantization"]["chosen"] == "this CPU's features"
    for flags in (["--quantize", "int8", "--isa", "avx9"], ["--isa", "avx2"]):  # unknown; without int8
        status, _, err = run_cli(["export", tiny_run, "--output", tmp_path / "bad", *flags], capsys)
        assert status == 2 and len(err.strip().splitlines()) == 1 and "--isa" in err
        assert not (tmp_path / "bad").exists()

    data = tmp_path / "in.jsonl"
    data.write_text('{"text": "a fine film"}\n')
    lacking = {"avx2": True, "avx512f": False, "avx512_vnni": False, "avx_vnni": False, "arm64": False}
    monkeypatch.setattr(quantization, "_features", lambda: dict(lacking))
    status, _, err = run_cli(["predict", tmp_path / "auto", "--threshold", 0.9, "--input", data, "--output",
                              tmp_path / "o.jsonl"], capsys)
    noted = [line for line in err.splitlines() if "which this CPU lacks" in line]
    assert status == 0 and (len(noted) == 1 if auto["quantization"]["isa"] != "avx2" else not noted)
    status, _, err = run_cli(["predict", tmp_path / "avx2", "--threshold", 0.9, "--input", data, "--output",
                              tmp_path / "p.jsonl"], capsys)
    assert status == 0 and "which this CPU lacks" not in err  # an avx2 export on an avx2 CPU
