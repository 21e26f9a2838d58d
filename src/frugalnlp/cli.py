"""The `frugalnlp` command: parse arguments, call the library, print. Bad input exits 2 with one line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

from frugalnlp.defaults import (DEMO_MAX_LENGTH, DEMO_METHODS, DEMO_POLICIES, DEMO_TRAIN_SIZE, MAX_LENGTH, PAPA_LENGTH,
                                THRESHOLD)
from frugalnlp.early_exit.config import ExitRecipe
from frugalnlp.errors import FrugalError, check_positive

if TYPE_CHECKING:
    from frugalnlp.dev_choice import OperatingTarget


class _Parser(argparse.ArgumentParser):
    """Argument errors as one line with exit status 2, like every other bad input."""

    def error(self, message: str):
        print(f"frugalnlp: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'")
    if not values:
        raise argparse.ArgumentTypeError("expected comma-separated integers, got nothing")
    return values


def _static_layers(text: str) -> list[int] | str:
    """``all`` (every depth of the encoder), or comma-separated depths."""
    return "all" if text.strip() == "all" else _int_list(text)


def _threshold(text: str) -> float | list[float]:
    """``0.9``, or one threshold per early exit (``--policy per-exit``): ``0.8,0.9,0.95``."""
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1] or comma-separated numbers, got '{text}'")
    return values[0] if len(values) == 1 else values


def _float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got '{text}'")


def _str_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _add_task_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--task", default=None, help="mr, imdb, bbc, boolq, or hf:NAME[:CONFIG] (default: mr)")
    g.add_argument("--train-file", help="your own CSV/TSV/JSONL training file (dev/test carved from it if not given)")
    g.add_argument("--dev-file")
    g.add_argument("--test-file")
    g.add_argument("--text-column", default="text")
    g.add_argument("--text-pair-column", default=None)
    g.add_argument("--label-column", default="label")


def _add_train_args(p: argparse.ArgumentParser, one_run: bool = True) -> None:
    """Data, model and recipe flags; ``one_run`` adds those of a single run (method, seed, checkpoints)."""
    _add_task_args(p)
    p.add_argument("--model", default="minilm", help="alias (minilm, mpnet), local directory or hub name")
    if one_run:
        from frugalnlp.methods import METHODS

        p.add_argument("--method", default="plain", help=", ".join(METHODS))
    p.add_argument("--exit-layers", type=_int_list, default=None, help="1-based, e.g. 1,2,4,6 (ends at the last layer)")
    if one_run:
        p.add_argument("--num-layers", type=int, default=None,
                       help="plain: keep only the first K layers (a static model for the frontier)")
    p.add_argument("--pooling", default="mean", help="exit heads read the first token or the masked mean (default)")
    _add_recipe_args(p)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=MAX_LENGTH)
    p.add_argument("--train-size", type=int, default=None, help="stratified subset of N training examples")
    if one_run:
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--save-steps", type=int, default=None, help="checkpoint every N steps (default: every epoch)")


def _operating_target(args: argparse.Namespace) -> OperatingTarget | None:
    """The command's operating target, validated here once (None: none asked for)."""
    from frugalnlp.dev_choice import OperatingTarget

    if args.target_speedup is None and args.max_drop is None and args.risk is None:
        return None
    return OperatingTarget(speedup=args.target_speedup, max_drop=args.max_drop, risk=args.risk,
                           policy=args.policy or "confidence", cost=getattr(args, "cost", "layers"),
                           cost_batch_size=getattr(args, "cost_batch_size", 32))


def _add_operating_args(p: argparse.ArgumentParser, threshold: bool = False) -> None:
    """The exit policy and how its operating point is given or chosen; ``threshold``: commands that deploy
    one (predict, serve), whose default is the run's saved operating point."""
    from frugalnlp.early_exit.registry import POLICY_NAMES

    names = ", ".join(POLICY_NAMES)
    if threshold:
        p.add_argument("--policy", default=None, help=f"{names} (default: the run's saved operating point's, "
                                                      "else confidence)")
    else:
        p.add_argument("--policy", default="confidence", help=names)
    g = p.add_mutually_exclusive_group()
    if threshold:
        g.add_argument("--threshold", type=_threshold, default=None,
                       help=f"confidence needed to leave early (default {THRESHOLD}); --policy per-exit: "
                            "one per early exit, e.g. 0.8,0.9,0.95")
    g.add_argument("--target-speedup", type=float, default=None,
                   help="choose the threshold on dev: best dev accuracy at this speedup (layers) or more")
    g.add_argument("--max-drop", type=float, default=None,
                   help="choose the threshold on dev: fastest within this accuracy drop of the last exit (e.g. 0.01); "
                        "a point estimate on dev unless --risk certifies it")
    p.add_argument("--ensemble", action="store_true",
                   help="decide on an exit ensemble fitted on dev: exit k mixes the log-probabilities of exits 1..k")
    p.add_argument("--risk", type=float, default=None,
                   help="with --max-drop E: certify it (Learn-then-Test): with probability at least 1 - RISK the "
                        "drop against the last exit is at most E on data exchangeable with dev (e.g. 0.1)")
    p.add_argument("--runtime", default=None,
                   help="torch, or onnx: the run's ONNX export (`frugalnlp export RUN`; an export directory is "
                        "ONNX anyway)")


def _add_cost_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cost", default="layers",
                   help="what target speedups are in: layers (the paper's measure), or time: each segment timed on "
                        "the run's runtime (--runtime) at 1 to --cost-batch-size rows and the split replayed in "
                        "batches, so 2x is twice the plain model's measured texts/s")
    p.add_argument("--cost-batch-size", type=int, default=32,
                   help="--cost time: the batch size texts are served in (segments are timed up to it)")


def _run_path(args: argparse.Namespace) -> str | None:
    """The directory the command loads: ``args.run``, or its ONNX export under ``--runtime onnx`` (``--runtime
    torch`` on an export is refused)."""
    from frugalnlp.run import runtime_path

    return args.run if args.run is None or args.runtime is None else str(runtime_path(args.run, args.runtime))


def _deployed_path(args: argparse.Namespace) -> str | None:
    """`_run_path` for predict and serve, which deploy a saved operating point unless told otherwise: a run whose
    point its ONNX export lacks is refused under ``--runtime onnx`` (the export decides on its own logits), never
    answered at the default threshold without a word. A deploy directory measured on a CPU with other features
    than this one is run with one line saying its speed may not hold."""
    from frugalnlp.operating import OPERATING_POINT

    from frugalnlp.deploy import machine_note

    path = _run_path(args)
    note = None if path is None else machine_note(path)
    if note:
        print(note, file=sys.stderr)
    told = (args.threshold is not None or args.target_speedup is not None or args.max_drop is not None
            or args.ensemble)
    if (not told and path is not None and Path(path) != Path(args.run) and (Path(args.run) / OPERATING_POINT).exists()
            and not (Path(path) / OPERATING_POINT).exists()):
        raise FrugalError(f"{args.run} has a saved operating point but its export {path} has none (an export decides "
                          f"on its own logits): run `frugalnlp calibrate {path}` with the flags that calibrated "
                          f"{args.run}, or give --threshold")
    return path


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    from frugalnlp.methods import METHODS

    takers = ", ".join(name for name, method in METHODS.items() if method.recipe_fields)
    g = p.add_argument_group(f"exit recipe ({takers})")
    for f in fields(ExitRecipe):
        g.add_argument(ExitRecipe.flag(f.name), type=f.metadata["type"], default=f.default, help=f.metadata["help"])
    g.add_argument("--teacher", default=None, help="a finished run (same task and tokenizer) whose last exit the exits, "
                                                   "or a plain or multi-model run's models, learn from")


def _recipe(args: argparse.Namespace) -> ExitRecipe:
    return ExitRecipe(**{f.name: getattr(args, f.name) for f in fields(ExitRecipe)})


def _spec(args: argparse.Namespace, output: str):
    from frugalnlp.run import RunSpec

    task = args.task if args.task or args.train_file else "mr"
    one_run = {k: getattr(args, k) for k in ("method", "seed", "save_steps", "num_layers") if hasattr(args, k)}
    return RunSpec(output=output, task=task, model=args.model, exit_layers=args.exit_layers,
                   pooling=args.pooling, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                   max_length=args.max_length, train_size=args.train_size,
                   train_file=args.train_file, dev_file=args.dev_file, test_file=args.test_file,
                   columns=_columns(args), recipe=_recipe(args), teacher=args.teacher, **one_run)


def _columns(args: argparse.Namespace):
    from frugalnlp.tasks import Columns

    return Columns(text=args.text_column, label=args.label_column, text_pair=args.text_pair_column)


def cmd_tasks(args: argparse.Namespace) -> None:
    from frugalnlp.tasks import task_summaries

    summaries = task_summaries()
    if args.json:
        print(json.dumps(summaries, indent=2))
        return
    print(f"{'task':<7} {'kind':<7} {'train':>6} {'dev':>6} {'test':>6} {'total':>6}  labels / source")
    for s in summaries:
        if not s["available"]:
            print(f"{s['name']:<7} unavailable: its data package is missing; install it with `{s['install']}` "
                  f"({s['description']})")
            continue
        sizes = s["sizes"]
        print(f"{s['name']:<7} {'pair' if s['pair'] else 'single':<7} {sizes['train']:>6} {sizes['dev']:>6} "
              f"{sizes['test']:>6} {s['total']:>6}  {', '.join(s['labels'])} / {s['source']}")


def cmd_train(args: argparse.Namespace) -> None:
    from accelerate import PartialState

    from frugalnlp.training import train_run

    path = train_run(_spec(args, args.output), overwrite=args.overwrite, resume=args.resume)
    if not PartialState().is_main_process:  # under torchrun the main process reports
        return
    metrics = json.loads((path / "metrics.json").read_text())
    for split in ("dev", "test"):
        exits = ", ".join(f"L{e['layer']} {e['accuracy']:.3f}" for e in metrics[split]["exits"])
        print(f"{split}: accuracy {metrics[split]['accuracy']:.4f}  macro-F1 {metrics[split]['macro_f1']:.4f}"
              f"  (exits: {exits})")
    print(f"wrote {path}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from frugalnlp.evaluation import evaluate_run
    from frugalnlp.report import format_comparison

    path, result = evaluate_run(_run_path(args), split=args.split, thresholds=args.thresholds, policy=args.policy,
                                output=args.output, overwrite=args.overwrite, static=args.static,
                                target=_operating_target(args), ensemble=args.ensemble)
    print(f"{'threshold':>9} {'accuracy':>8} {'macro-F1':>8} {'layers':>7} {'speedup':>7} {'FLOPs':>6}")
    for p in result["points"]:
        print(f"{p['threshold']:>9.2f} {p['accuracy']:>8.4f} {p['macro_f1']:>8.4f} {p['layers_share']:>7.3f} "
              f"{p['speedup_layers']:>6.2f}x {p['flops_share']:>6.3f}")
    print()
    print(format_comparison({result["method"]: result["comparison"]}))
    if result["ensemble"]:
        exits = ", ".join(f"L{e['layer']} {e['accuracy']:.3f}" for e in result["ensemble"]["fixed_exits"])
        print(f"\nensembled exits (fitted on dev), every example at one exit: {exits}")
    point = result["operating_point"]
    if point:
        chosen = point[args.split]
        print(f"\noperating point chosen on dev: threshold {_thresholds_text(point['threshold'])} (dev: accuracy "
              f"{point['dev']['accuracy']:.4f} at {point['dev']['speedup_layers']:.2f}x); {args.split}: accuracy "
              f"{chosen['accuracy']:.4f} at {chosen['speedup_layers']:.2f}x, drop "
              f"{100 * point[args.split + '_drop']:+.1f} points against the last exit")
        if point["certified"] is not None:
            print(_certificate_line(point["certificate"]))
    print(f"wrote {path}")


def _thresholds_text(threshold: float | list[float]) -> str:
    return ",".join(f"{t:.4f}" for t in threshold) if isinstance(threshold, list) else f"{threshold:.4f}"


def _certificate_line(certificate: dict) -> str:
    e, d = certificate["epsilon"], certificate["delta"]
    if not certificate["certified"]:
        return (f"no threshold certified at drop <= {e:g} with risk {d:g} ({certificate['calibration_examples']} "
                "calibration examples): the model runs to its last exit")
    return (f"certified (Learn-then-Test, {certificate['calibration_examples']} calibration examples): with "
            f"probability >= {1 - d:g}, the drop against the last exit is at most {e:g} on data like dev")


def cmd_calibrate(args: argparse.Namespace) -> None:
    from frugalnlp.operating import OPERATING_POINT, calibrate_run

    run = _run_path(args)
    target = _operating_target(args)
    if target is None:
        raise FrugalError("give exactly one of --target-speedup and --max-drop")
    point = calibrate_run(run, target, ensemble=args.ensemble, overwrite=args.overwrite)
    print(f"{point.policy} threshold {point.threshold} ({point.chosen_by}): dev accuracy {point.dev['accuracy']:.4f} "
          f"at {point.speedup_text()}")
    if point.certificate is not None:
        print(_certificate_line(point.certificate))
    print(f"wrote {run}/{OPERATING_POINT}; predict and serve use it unless given --threshold or a choice on dev")


def cmd_analyze_gradients(args: argparse.Namespace) -> None:
    from frugalnlp.gradients import analyze_run

    path, result = analyze_run(args.run, num_batches=args.batches, output=args.output, overwrite=args.overwrite)
    pairs = [f"L{result['exit_layers'][i]}·L{result['exit_layers'][j]}" for i, j in result["pairs"]]
    print("layer  " + " ".join(f"{p:>8}" for p in pairs))
    for k, row in enumerate(result["cosine"], start=1):
        print(f"{k:>5}  " + " ".join(f"{'':>8}" if v is None else f"{v:>8.3f}" for v in row))
    print(f"wrote {path}")


def cmd_bench(args: argparse.Namespace) -> None:
    from frugalnlp.atomic import write_json

    if args.json:  # refuse before minutes of timing
        from frugalnlp.rundir import check_output_file

        check_output_file(args.json, args.overwrite, flag="--json")
    progress = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    if args.serve + args.papa > 1:
        raise FrugalError("bench: give one of --serve and --papa")
    if args.runtime is not None and not args.serve:
        raise FrugalError("bench: --runtime goes with --serve")
    if args.serve:
        try:
            from frugalnlp.loadtest import QUICK_LOAD, LoadSettings, format_serve_bench, run_serve_bench
        except ImportError as e:
            raise FrugalError(f"bench --serve needs the 'serve' extra ({e.name} is missing): "
                              "pip install -e '.[serve]' (make install has it)") from None
        base = QUICK_LOAD if args.quick else LoadSettings()
        settings = replace(base, **{k: v for k, v in (("clients", args.clients), ("seconds", args.seconds),
                                                       ("texts_per_request", args.texts_per_request),
                                                       ("repeats", args.repeats),
                                                       ("length_bucket", args.length_bucket),
                                                       ("text_sets", args.texts and tuple(args.texts)),
                                                       ("max_tokens", args.max_tokens and tuple(
                                                           None if t == 0 else t for t in args.max_tokens)),
                                                       ("batchings", args.batchings and tuple(args.batchings)))
                                if v is not None})
        for flag, value in (("--clients", settings.clients), ("--texts-per-request", settings.texts_per_request),
                            ("--repeats", settings.repeats), ("--length-bucket", settings.length_bucket)):
            if value < 1:
                raise FrugalError(f"{flag} {value} must be at least 1")
        check_positive(settings.seconds, "--seconds")
        results = run_serve_bench(run=_run_path(args), settings=settings, progress=progress)
        print(format_serve_bench(results))
    elif args.papa:
        from frugalnlp.papa.bench import QUICK_PAPA, PapaBenchSettings, format_papa_bench, run_papa_bench

        settings = replace(QUICK_PAPA if args.quick else PapaBenchSettings(), model=args.model or "minilm")
        ranking = None
        if args.ranking:
            from frugalnlp.papa.experiment import load_ranking

            ranking = load_ranking(args.ranking)
        results = run_papa_bench(settings, ranking=ranking, progress=progress)
        print(format_papa_bench(results))
    else:
        from frugalnlp.bench import format_bench, run_bench

        results = run_bench(run=args.run, cascade_run=args.cascade_run, quick=args.quick, progress=progress)
        print(format_bench(results))
    if args.json:
        write_json(args.json, results)
        print(f"wrote {args.json}")


def cmd_predict(args: argparse.Namespace) -> None:
    from frugalnlp.predict import ENGINES, Predictor, check_prediction_paths, predict_file
    from frugalnlp.tasks import Columns

    check_prediction_paths(args.input, args.output, args.overwrite)  # before minutes of loading and choosing
    if args.engine not in ENGINES:
        raise FrugalError(f"unknown --engine '{args.engine}'; choose one of {', '.join(ENGINES)}")
    if args.ray_actors is not None and args.ray_actors < 1:
        raise FrugalError(f"--ray-actors {args.ray_actors} must be at least 1")
    check_positive(args.ray_cpus_per_actor, "--ray-cpus-per-actor")
    if not os.path.isfile(args.input):
        raise FrugalError(f"{args.input}: no such file")
    target = _operating_target(args)
    predictor = Predictor(_deployed_path(args), threshold=args.threshold, policy=args.policy, batch_size=args.batch_size,
                          max_tokens=args.max_tokens, trust_pickle=args.trust_pickle, target=target,
                          ensemble=args.ensemble)
    point = predictor.operating_point
    if point and predictor.operating_point_saved:
        print(f"the run's saved operating point: {point.policy} threshold {point.threshold} ({point.chosen_by}; "
              f"dev accuracy {point.dev['accuracy']:.4f} at {point.speedup_text()})", file=sys.stderr)
    elif point:
        print(f"threshold {_thresholds_text(point.threshold)} chosen on dev: accuracy {point.dev['accuracy']:.4f} at "
              f"{point.speedup_text()}" + (f" ({point.policy}: {point.chosen_by})"
                                                       if point.policy != (args.policy or "confidence") else ""),
              file=sys.stderr)
    if point and point.certified is not None:
        print(_certificate_line(point.certificate), file=sys.stderr)
    columns = Columns(text=args.text_column, text_pair=args.text_pair_column)
    written, bad = predict_file(predictor, args.input, args.output, columns, overwrite=args.overwrite,
                                progress=True, engine=args.engine, ray_actors=args.ray_actors,
                                ray_cpus_per_actor=args.ray_cpus_per_actor, strict=args.strict)
    for line, problem in bad:
        print(f"frugalnlp: warning: {args.input}:{line}: {problem}; row skipped", file=sys.stderr)
    if point is None and args.threshold is None:  # said once the file is done: an error stays one line
        print(f"no saved operating point: answered at {predictor.args['policy']} threshold {THRESHOLD} (choose one "
              "on dev with --target-speedup or --max-drop, or save one with `frugalnlp calibrate`)", file=sys.stderr)
    print(f"wrote {written} predictions to {args.output}; {len(bad)} bad row(s) skipped")


def cmd_serve(args: argparse.Namespace) -> None:
    try:
        from frugalnlp.serving import ServeSettings, serve
    except ImportError as e:
        raise FrugalError(f"serving needs the 'serve' extra ({e.name} is missing): pip install -e '.[serve]' "
                          "(make install has it)") from None

    settings = ServeSettings(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, batching=args.batching,
                             length_bucket=args.length_bucket, max_tokens=args.max_tokens, max_texts=args.max_texts,
                             max_chars=args.max_chars,
                             max_body_bytes=args.max_body_bytes, body_timeout_s=args.body_timeout,
                             idle_timeout_s=args.idle_timeout, max_connections=args.max_connections)
    if not 0 <= args.port <= 65535:
        raise FrugalError(f"--port {args.port} is not a TCP port (0-65535)")
    target = _operating_target(args)  # checked before the port is taken and the model loads
    serve(_deployed_path(args), host=args.host, port=args.port, settings=settings, threshold=args.threshold,
          policy=args.policy, trust_pickle=args.trust_pickle, target=target, ensemble=args.ensemble,
          workers=args.workers)


def cmd_export(args: argparse.Namespace) -> None:
    from frugalnlp.export import export_run

    record = export_run(args.run, output=args.output, quantize=args.quantize, overwrite=args.overwrite,
                        isa=args.isa)
    diffs = ", ".join(f"{d:.1e}" for d in record["check"]["max_abs_diff_vs_torch"])
    print(f"exported {len(record['graphs'])} {record['precision']} graph(s) to {record['output']}; max |ONNX - torch| "
          f"exit logits on dev ({record['check']['examples']} examples), per exit: {diffs}")
    for graph, ops in record["fused_ops"].items():
        print(f"  {graph}: " + (", ".join(f"{n} {op}" for op, n in ops.items()) or "no fused op"))
    if record["quantization"]:
        q = record["quantization"]
        print(f"int8 for {q['isa']} (chosen by {q['chosen']}): {q['weight_type']} weights per channel"
              + (", range reduced to 7 bits" if q["reduce_range"] else ""))
    timing = record["session_timing"]
    print(f"session options timed on this CPU (ms per pass through every graph, on {', '.join(map(str, timing['rows']))} "
          f"rows): " + "; ".join(f"{name} {' / '.join(f'{t:.1f}' for t in ms)}" for name, ms in timing["ms_per_pass"].items())
          + f"; chosen: {timing['chosen']}")
    print(f"use it with --runtime onnx (or give {record['output']} as the run)")


def cmd_frontier(args: argparse.Namespace) -> None:
    from frugalnlp.atomic import write_bytes, write_json
    from frugalnlp.frontier import FrontierSettings, check_settings, format_frontier, plot_frontier, run_frontier
    from frugalnlp.rundir import RunDir

    settings = FrontierSettings(runtime=args.runtime, precision=args.precision,
                                **{k: v for k, v in (("batch_sizes", args.batch_sizes), ("examples", args.examples),
                                                     ("repeats", args.repeats), ("targets", args.targets),
                                                     ("policies", args.policies), ("cost", args.cost),
                                                     ("cost_batch_size", args.cost_batch_size)) if v is not None})
    check_settings(settings)  # before the output is claimed and minutes of timing
    name = f"frontier-{args.runtime}" + (f"-{args.precision}" if args.precision != "fp32" else "")
    out = RunDir(args.output or os.path.join(args.run, name), overwrite=args.overwrite, kind="frontier",
                 inputs=[args.run, *(args.static or [])])
    results = run_frontier(args.run, args.static or [], settings, progress=lambda msg: print(msg, file=sys.stderr))
    table = format_frontier(results)
    out.open()
    write_json(out.path / "frontier.json", results)
    write_bytes(out.path / "frontier.md", (table + "\n").encode())
    plot_frontier(results, out.path / "frontier.png")
    print(table)
    print(f"wrote {out.commit()} (frontier.json, frontier.md, frontier.png)")


def cmd_demo(args: argparse.Namespace) -> None:
    from frugalnlp.demo import DemoSpec, run_demo

    from frugalnlp.frontier import FrontierSettings

    if args.cost not in ("layers", "time"):
        raise FrugalError(f"unknown --cost '{args.cost}'; choose layers or time")
    timed = None
    if args.cost == "time":
        runtime = args.runtime or "onnx"
        timed = FrontierSettings(runtime=runtime, precision=args.precision or ("int8" if runtime == "onnx" else "fp32"),
                                 batch_sizes=(args.cost_batch_size,), policies=tuple(args.policies), cost="time",
                                 cost_batch_size=args.cost_batch_size)
    elif args.runtime is not None or args.precision is not None:
        raise FrugalError("demo: --runtime and --precision go with --cost time (the answer in measured seconds)")
    run_demo(DemoSpec(output=args.output, base=_spec(args, output=""), methods=args.methods, seeds=args.seeds,
                      policies=args.policies, certify=args.certify, risk=args.risk, static_layers=args.static_layers,
                      static_distill=args.static_distill, timed=timed),
             overwrite=args.overwrite, resume=args.resume)


def cmd_papa_constants(args: argparse.Namespace) -> None:
    from frugalnlp.papa.experiment import make_constants

    path = make_constants(None, args.model, args.max_length, args.output, train_size=args.train_size,
                          overwrite=args.overwrite, source=_papa_source(args))
    print(f"wrote {path}")


def _papa_source(args: argparse.Namespace) -> dict:
    from frugalnlp.papa.experiment import task_source

    return task_source(args.task or (None if args.train_file else "mr"), args.train_file, args.dev_file,
                       args.test_file, _columns(args))


def _papa_spec(args: argparse.Namespace, **kwargs):
    from frugalnlp.papa.experiment import PapaSpec

    return PapaSpec(output=args.output, constants=args.constants, epochs=args.epochs, lr=args.lr,
                    gate_lr=args.gate_lr, batch_size=args.batch_size, seed=args.seed, train_size=args.train_size, **kwargs)


def cmd_papa_rank(args: argparse.Namespace) -> None:
    from frugalnlp.papa.experiment import rank_heads

    path = rank_heads(_papa_spec(args), overwrite=args.overwrite, resume=args.resume)
    ranking = json.loads((path / "ranking.json").read_text())
    first = ", ".join(f"L{l}H{h}" for l, h in ranking["order"][:8])
    print(f"most constant-leaning heads: {first}, ...\nwrote {path}")


def cmd_papa_run(args: argparse.Namespace) -> None:
    from frugalnlp.papa.experiment import run_papa

    path = run_papa(_papa_spec(args, ranking=args.ranking, heads=args.heads, setting=args.setting),
                    overwrite=args.overwrite, resume=args.resume)
    metrics = json.loads((path / "metrics.json").read_text())
    print(f"{args.heads} constant heads: dev accuracy {metrics['dev']['accuracy']:.4f}, "
          f"test accuracy {metrics['test']['accuracy']:.4f}\nwrote {path}")


def cmd_papa_sweep(args: argparse.Namespace) -> None:
    from frugalnlp.papa.experiment import SweepSpec, sweep

    spec = SweepSpec(output=args.output, source=_papa_source(args), model=args.model, max_length=args.max_length,
                     heads=args.heads, seeds=args.seeds, setting=args.setting, train_size=args.train_size,
                     epochs=args.epochs, lr=args.lr, gate_lr=args.gate_lr, constants=args.constants,
                     ranking=args.ranking, constants_train_size=args.constants_train_size)
    sweep(spec, overwrite=args.overwrite, resume=args.resume)


def cmd_papa_compare(args: argparse.Namespace) -> None:
    from frugalnlp.papa.experiment import compare_sweeps

    compare_sweeps(args.sweeps, args.output, overwrite=args.overwrite)
    print(f"wrote {args.output}")


def _add_papa_parser(sub) -> None:
    papa = sub.add_parser("papa", help="PAPA: constant attention, head ranking, probing and fine-tuning")
    steps = papa.add_subparsers(dest="papa_command", required=True)

    def recipe(p: argparse.ArgumentParser) -> None:
        p.add_argument("--epochs", type=float, default=3.0)
        p.add_argument("--lr", type=float, default=None, help="default 1e-3 (probe) or 5e-5 (finetune)")
        p.add_argument("--gate-lr", type=float, default=0.05, help="learning rate of the ranking gates")
        p.add_argument("--train-size", type=int, default=None, help="stratified subset of N training examples")
        p.add_argument("--output", required=True)
        p.add_argument("--overwrite", action="store_true")
        p.add_argument("--resume", action="store_true", help="continue an interrupted run")

    p = steps.add_parser("constants", help="average attention over the training split, in the fixed layout")
    _add_task_args(p)
    p.add_argument("--model", default="minilm")
    p.add_argument("--max-length", type=int, default=PAPA_LENGTH, help="n: the layout length (pairs: second text at n/2)")
    p.add_argument("--train-size", type=int, default=None, help="average over a stratified subset of N examples")
    p.add_argument("--output", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_papa_constants)

    for name, func, text in (("rank", cmd_papa_rank, "learn a gate per head and order heads by it (JSON + heatmap)"),
                             ("run", cmd_papa_run, "train with the first N ranked heads constant and score it")):
        p = steps.add_parser(name, help=text)
        p.add_argument("--constants", required=True, help="output of `frugalnlp papa constants`")
        if name == "run":
            p.add_argument("--ranking", default=None, help="output of `frugalnlp papa rank` (needed when N > 0)")
            p.add_argument("--heads", type=int, default=0, help="N: how many ranked heads become constant")
            p.add_argument("--setting", default="probe", help="probe (encoder frozen) or finetune (all trains)")
        p.add_argument("--batch-size", type=int, default=16)
        p.add_argument("--seed", type=int, default=0)
        recipe(p)
        p.set_defaults(func=func)

    p = steps.add_parser("sweep", help="constants, ranking and a run per number of constant heads; table and plot")
    _add_task_args(p)
    p.add_argument("--model", default="minilm")
    p.add_argument("--max-length", type=int, default=PAPA_LENGTH)
    p.add_argument("--heads", default="0,half,all-but-few,all", help="integers, half, all, all-but-few, all-but-K")
    p.add_argument("--seeds", type=_int_list, default=[0])
    p.add_argument("--setting", default="probe", help="probe (encoder frozen) or finetune (all trains)")
    p.add_argument("--constants", default=None, help="reuse constants (default: compute into OUTPUT/constants)")
    p.add_argument("--ranking", default=None, help="reuse a ranking (default: rank into OUTPUT/ranking)")
    p.add_argument("--constants-train-size", type=int, default=None, help="examples to average attention over")
    recipe(p)
    p.set_defaults(func=cmd_papa_sweep)

    p = steps.add_parser("compare", help="sweeps of several models side by side: baselines, relative drops, "
                                         "and whether the better model lost more")
    p.add_argument("sweeps", nargs="+", help="outputs of `frugalnlp papa sweep`")
    p.add_argument("--output", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_papa_compare)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="frugalnlp", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tasks", help="list the packaged tasks and their splits")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_tasks)

    p = sub.add_parser("train", help="fine-tune a classifier (plain, joint, sweet, multi-model)")
    _add_train_args(p)
    p.add_argument("--output", required=True, help="run directory to create")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="speed-accuracy curve of a trained run")
    p.add_argument("run")
    p.add_argument("--split", default="test", choices=["dev", "test"])
    p.add_argument("--thresholds", type=int, default=21, help="number of evenly spaced thresholds in [0, 1]")
    p.add_argument("--static", action="append", default=None, metavar="RUN",
                   help="static frontier from this multi-model run or plain --num-layers run (repeatable; "
                        "default: a multi-model run's own members)")
    _add_operating_args(p)
    p.add_argument("--output", default=None, help="directory to write (default: RUN/eval-SPLIT-POLICY)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("calibrate", help="choose a run's operating point on dev and save it with the run")
    p.add_argument("run")
    _add_operating_args(p)
    _add_cost_args(p)
    p.add_argument("--overwrite", action="store_true", help="replace the run's saved operating point")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("analyze-gradients", help="cosine similarity of different exits' gradients per layer")
    p.add_argument("run")
    p.add_argument("--batches", type=int, default=8, help="training batches of 16 to sum gradients over")
    p.add_argument("--output", default=None, help="directory to write (default: RUN/gradients)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_analyze_gradients)

    p = sub.add_parser("bench", help="wall clock: plain HF forward vs early exit vs cascade, side by side")
    p.add_argument("--run", default=None, help="a joint/sweet run to time (default: train a small one)")
    p.add_argument("--cascade-run", default=None, help="a multi-model run to time (default: train a small one)")
    p.add_argument("--quick", action="store_true", help="fewer examples, batch sizes 1 and 32 (under a minute)")
    p.add_argument("--serve", action="store_true",
                   help="load-test `frugalnlp serve` instead: throughput and p50/p99 latency per threshold and batching")
    p.add_argument("--papa", action="store_true",
                   help="time PAPA instead: plain HF (sdpa, eager) vs 0, half and all heads constant, lengths 64-256")
    p.add_argument("--runtime", default=None, help="--serve: torch, or onnx (the run's export, `frugalnlp export`)")
    p.add_argument("--model", default=None, help="--papa: the encoder (default minilm)")
    p.add_argument("--ranking", default=None, help="--papa: a `papa rank` output choosing the constant heads "
                                                      "(default: spread evenly over the layers)")
    p.add_argument("--clients", type=int, default=None, help="--serve: closed-loop clients at saturation (32)")
    p.add_argument("--seconds", type=float, default=None, help="--serve: seconds per measurement (10)")
    p.add_argument("--texts-per-request", type=int, default=None, help="--serve: texts in each request (4)")
    p.add_argument("--repeats", type=int, default=None, help="--serve: rounds over every configuration (3)")
    p.add_argument("--length-bucket", type=int, default=None, help="--serve: the servers' --length-bucket (16)")
    p.add_argument("--texts", type=_str_list, default=None,
                   help="--serve: text sets, full (MR sentences) and/or short (their first 10 words); default full")
    p.add_argument("--max-tokens", type=_int_list, default=None,
                   help="--serve: servers' --max-tokens to compare, 0 for --length-bucket rows (e.g. 0,1024)")
    p.add_argument("--batchings", type=_str_list, default=None, help="--serve: request,segment (default both)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("predict", help="predict a CSV/TSV/JSONL file with a trained run (adaptive inference)")
    p.add_argument("run")
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True, help="JSONL: line, label, confidence, exit_layer, layers_run")
    _add_operating_args(p, threshold=True)
    p.add_argument("--text-column", default="text")
    p.add_argument("--text-pair-column", default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=None,
                   help="within each --batch-size block, run every segment in length-sorted runs of at most this "
                        "many padded tokens (e.g. --batch-size 256 --max-tokens 2048)")
    p.add_argument("--engine", default="local",
                   help="local, or ray: Ray Data actors over chunks of rows (RAY_ADDRESS names a cluster)")
    p.add_argument("--ray-actors", type=int, default=None, help="actors, each loading the model once "
                   "(default: the cluster's CPUs / --ray-cpus-per-actor)")
    p.add_argument("--ray-cpus-per-actor", type=float, default=1.0)
    p.add_argument("--strict", action="store_true", help="exit 2 at the first bad row, writing nothing")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--trust-pickle", action="store_true", help="allow loading pickle files (only from trusted sources)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("serve", help="serve a run over HTTP (FastAPI): POST /predict, GET /healthz, GET /metrics")
    p.add_argument("run")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    _add_operating_args(p, threshold=True)
    p.add_argument("--batching", default="segment",
                   help="segment: rows going past an exit join other requests' rows there (default); "
                        "request: each micro-batch runs to the end alone")
    p.add_argument("--max-batch", type=int, default=64, help="texts per micro-batch and per segment run")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="longest wait for a batch to fill")
    p.add_argument("--length-bucket", type=int, default=16,
                   help="a run's rows go through the model sorted by length, this many at a time (less padding)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="instead of --length-bucket: at every segment, length-sorted rows in runs of at most this many "
                        "padded tokens (rows x longest), so the rows that go on past an exit fill runs again")
    p.add_argument("--max-texts", type=int, default=256, help="texts per request")
    p.add_argument("--max-chars", type=int, default=20_000, help="characters per text")
    p.add_argument("--max-body-bytes", type=int, default=16 * 2**20,
                   help="request body size, refused on Content-Length before reading (default 16 MiB)")
    p.add_argument("--body-timeout", type=float, default=10.0, help="seconds for a request body to arrive (else 408)")
    p.add_argument("--idle-timeout", type=float, default=5.0,
                   help="seconds a connection may wait without a complete request's headers before it is closed")
    p.add_argument("--max-connections", type=int, default=512, help="open connections at once; past it, 503")
    p.add_argument("--workers", type=int, default=1,
                   help="server processes sharing the port, each with its own model on threads / N; limits such "
                        "as --max-connections hold per process (default 1)")
    p.add_argument("--trust-pickle", action="store_true", help="allow loading pickle files (only from trusted sources)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("export", help="export a run to ONNX, one graph per segment (optionally int8)")
    p.add_argument("run")
    p.add_argument("--output", default=None, help="directory to write (default: RUN/onnx, RUN/onnx-int8)")
    p.add_argument("--quantize", default=None, help="int8: dynamic quantization of the linear layers")
    p.add_argument("--isa", default=None, help="with --quantize int8: the instruction set to quantize for (auto, "
                                               "avx2, avx512, avx512_vnni, arm64; default auto: this CPU's)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("frontier", help="wall clock on one runtime: measured texts/s against test accuracy for the "
                                        "plain model, every static model and the adaptive dev choices")
    p.add_argument("run", help="an early-exit run (or a multi-model run)")
    p.add_argument("--static", action="append", default=None, metavar="RUN",
                   help="static models: a multi-model run (every member) or plain --num-layers runs (repeatable; "
                        "default: a multi-model run's own members)")
    p.add_argument("--runtime", default="onnx", help="torch, or onnx (the runs' exports; exported when missing)")
    p.add_argument("--precision", "--quantize", dest="precision", default="fp32",
                   help="fp32; int8: the runs' int8 exports (--runtime onnx); bf16: torch.autocast (--runtime torch)")
    p.add_argument("--batch-sizes", type=_int_list, default=None, help="default 1,32")
    p.add_argument("--examples", type=int, default=None, help="test texts timed (default 512)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved repeats, medians (default 3)")
    p.add_argument("--targets", type=_float_list, default=None, help="dev-chosen speedups, in --cost (default 1.5,2,3)")
    p.add_argument("--policies", type=_str_list, default=None,
                   help="POLICY or POLICY+ensemble (default confidence,per-exit+ensemble)")
    _add_cost_args(p)
    p.add_argument("--output", default=None, help="directory to write (default: RUN/frontier-RUNTIME[-PRECISION])")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_frontier)

    p = sub.add_parser("demo", help="adaptive methods and recipes against the static frontier and the oracle")
    _add_train_args(p, one_run=False)
    p.add_argument("--methods", type=_str_list, default=list(DEMO_METHODS),
                   help="variants METHOD[:key=value...], e.g. joint,sweet,two-stage,joint:boundary-grad=0.5:distill=self "
                        "(multi-model is always trained: its members are the static frontier)")
    p.add_argument("--seeds", type=_int_list, default=[0])
    p.add_argument("--policies", type=_str_list, default=list(DEMO_POLICIES),
                   help="exit policies, POLICY or POLICY+ensemble, e.g. confidence,per-exit,learned,confidence+ensemble; "
                        f"every (variant, policy) pair is a candidate chosen on dev (default {','.join(DEMO_POLICIES)})")
    p.add_argument("--certify", type=_float_list, default=[],
                   help="max drops to certify per variant (Learn-then-Test, confidence policy), e.g. 0.01,0.02")
    p.add_argument("--risk", type=float, default=0.1, help="the risk δ of --certify")
    p.add_argument("--static-layers", type=_static_layers, default=None,
                   help="depths of the static models beside the multi-model members, e.g. 1,2,3,4,5,6 or all "
                        "(default: all on encoders of up to 6 layers, else the exit depths)")
    p.add_argument("--static-distill", action="store_true",
                   help="also train each static model below full depth distilled from the full model "
                        "(--distill-alpha, --distill-temperature)")
    _add_cost_args(p)
    p.add_argument("--runtime", default=None, help="with --cost time: onnx (default) or torch, what is timed and "
                                                   "deployed")
    p.add_argument("--precision", default=None, help="with --cost time: int8 (default on onnx) or fp32")
    p.set_defaults(train_size=DEMO_TRAIN_SIZE, max_length=DEMO_MAX_LENGTH)
    p.add_argument("--output", default="demo")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--resume", action="store_true", help="continue an interrupted demo, skipping finished runs")
    p.set_defaults(func=cmd_demo)

    _add_papa_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a bad argument already reported in one line
        return e.code if isinstance(e.code, int) else 2
    # Offline by default for hub lookups we did not ask for (telemetry, update checks).
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    from transformers.utils import logging as hf_logging

    from frugalnlp.rundir import abandon_failed_starts

    hf_logging.disable_progress_bar()  # weight loading takes a blink: its bar only buries our one-line messages

    try:
        status = args.func(args)
    except FrugalError as e:
        abandon_failed_starts()
        print(f"frugalnlp: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        abandon_failed_starts()
        print("frugalnlp: interrupted; a training run can be continued with --resume", file=sys.stderr)
        return 130
    except BaseException:
        abandon_failed_starts()
        raise
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
