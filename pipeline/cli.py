"""The ``posttrain`` command line."""

from __future__ import annotations

import sys

import typer

from pipeline.models.catalog import ModelError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Synthetic data, SFT and online DPO for MoE chat models.")
models_app = typer.Typer(no_args_is_help=True, help="Embedded default models (built locally, no network).")
app.add_typer(models_app, name="models")


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@models_app.command("prepare")
def models_prepare(
    experts: int = typer.Option(8, help="Routed experts per layer of the upcycled MoE policy."),
    top_k: int = typer.Option(1, help="Routed experts per token."),
    force: bool = typer.Option(False, help="Rebuild even if the cache is current."),
) -> None:
    """Build the embedded models into $POSTTRAIN_HOME/models (default ~/.cache/posttrain/models)."""
    from pipeline.models.catalog import models_dir, prepare_all
    from pipeline.models.upcycle import UpcycleConfig

    typer.echo(f"model cache: {models_dir()}")
    try:
        prepare_all(UpcycleConfig(num_experts=experts, top_k=top_k), force=force, log=typer.echo)
    except (ModelError, ValueError) as exc:
        _fail(str(exc))


@models_app.command("list")
def models_list() -> None:
    """Show the embedded models and whether they are built."""
    from pipeline.models.catalog import list_models

    for row in list_models():
        state = f"{row['size_mb']:8.1f} MB" if row["built"] else "not built"
        typer.echo(f"{row['name']:24s} {state:>12s}  {row['path']}")


@app.command("demo")
def demo(
    model: str = typer.Option("smollm2-moe", help="Model the worker pool serves."),
    max_tokens: int = typer.Option(128, help="Tokens per answer."),
) -> None:
    """Prepare the embedded models and have the MoE policy answer a few prompts through the pool."""
    from pipeline.demo import answer_prompts

    try:
        answer_prompts(model=model, max_tokens=max_tokens, echo=typer.echo)
    except ModelError as exc:
        _fail(str(exc))


# -- the run: run / stage / status / config (pipeline/run/runner.py, pipeline/run/config.py) ------------------

config_app = typer.Typer(no_args_is_help=True, help="Inspect run configs.")
app.add_typer(config_app, name="config")

_SET_HELP = "Override a config field: --set stages.evolve.rounds=2 (value parsed as YAML; repeatable)."


def _load(config: str, overrides: list[str] | None):
    """The validated run config, or exit 2 with one line per problem."""
    from pipeline.run.config import ConfigError, load_config

    try:
        return load_config(config, overrides or [])
    except ConfigError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None


def _run_errors():
    from pipeline.run.artifacts import ArtifactError
    from pipeline.run.runner import RunError
    from pipeline.run.stage import StageError

    return (RunError, StageError, ArtifactError, ModelError)


def _interrupted() -> None:
    typer.secho("interrupted; finished shards are kept: run the same command again to resume", err=True)
    raise typer.Exit(130)


def _fail_run(exc: BaseException) -> None:
    """A stage failed or the run cannot start: exit 1 (2 is for an invalid config)."""
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


@app.command("run")
def run_cmd(
    config: str = typer.Argument(..., help="Run config (YAML), e.g. configs/default.yaml."),
    overrides: list[str] = typer.Option(None, "--set", help=_SET_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan (stages to run, resume or skip, and why)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars; only warnings and errors."),
) -> None:
    """Run the stage graph; stages whose fingerprint matches a finished manifest are skipped, and
    interrupted ones resume from their finished shards."""
    from pipeline.run.runner import format_plan, run_graph

    cfg = _load(config, overrides)
    try:
        items = run_graph(cfg, dry_run=dry_run, quiet=quiet)
    except _run_errors() as exc:
        _fail_run(exc)
    except KeyboardInterrupt:
        _interrupted()
    if dry_run:
        typer.echo(f"plan for {cfg.run_dir}:\n{format_plan(items)}")
    elif not quiet:
        _print_locations(cfg.run_dir)


def _print_locations(run_dir) -> None:
    """Where the run's datasets, models and report are (what a user opens next)."""
    from pathlib import Path

    root = Path(run_dir)
    typer.echo(f"\nrun directory: {root.resolve()}   (posttrain status {root})")
    datasets = sorted(p for p in (root / "datasets").glob("*") if p.is_dir())
    if datasets:
        typer.echo("datasets (load with datasets.load_dataset('parquet', data_dir=...)):")
        for d in datasets:
            typer.echo(f"  {d.name:16s} {d}")
    models = sorted(p for p in (root / "models").glob("*") if p.is_dir())
    if models:
        typer.echo("models (transformers / vLLM folders):")
        for m in models:
            typer.echo(f"  {m.name:16s} {m}")
    report = root / "report" / "report.html"
    if report.exists():
        typer.echo(f"report: {report}")


@app.command("stage")
def stage_cmd(
    name: str = typer.Argument(..., help="Stage to run (one of the config's graph)."),
    config: str = typer.Argument(..., help="Run config (YAML)."),
    force: bool = typer.Option(False, "--force", help="Rerun even if its fingerprint matches (starts fresh)."),
    overrides: list[str] = typer.Option(None, "--set", help=_SET_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print what would happen."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars; only warnings and errors."),
) -> None:
    """Run one stage from its upstream outputs on disk; every stage that depends on it is then
    marked stale (the next `posttrain run` reruns them)."""
    from pipeline.run.runner import format_plan, run_stage

    cfg = _load(config, overrides)
    _check_stage_name(name, cfg, config)
    try:
        items, stale = run_stage(cfg, name, force=force, dry_run=dry_run, quiet=quiet)
    except _run_errors() as exc:
        _fail_run(exc)
    except KeyboardInterrupt:
        _interrupted()
    if dry_run:
        typer.echo(f"plan for {cfg.run_dir}:\n{format_plan(items, stale)}")
    elif items[0].action == "skip":
        typer.echo(f"stage {name}: {items[0].reason}; nothing to do (use --force to rerun it)")
    elif stale:
        typer.echo(f"stage {name} done; marked stale: {', '.join(stale)}")


def _check_stage_name(name: str, cfg, config: str) -> None:
    """A NAME that is no stage at all (a typo) is an argument error; a real stage missing from the
    graph is left to the runner, whose fix is "add it to graph"."""
    from difflib import get_close_matches

    from pipeline.run.registry import DEFAULT_GRAPH, plugin_stages

    known = set(DEFAULT_GRAPH) | set(cfg.enabled) | (set(plugin_stages(cfg.plugins)) if cfg.plugins else set())
    if name in known:
        return
    close = get_close_matches(name, list(cfg.enabled), n=1)
    _fail(f"{name!r} is not a stage{f' (did you mean {close[0]!r}?)' if close else ''}; the stages of {config}: "
          f"{', '.join(cfg.enabled) or '(none)'}; fix: posttrain stage {close[0] if close else 'STAGE'} {config}")


@app.command("status")
def status_cmd(run_dir: str = typer.Argument(..., help="Run directory (run_dir of the config).")) -> None:
    """Each stage's state, record counts and time."""
    from rich.console import Console
    from rich.table import Table

    from pipeline.run.runner import RunError, status_rows

    try:
        rows = status_rows(run_dir)
    except RunError as exc:
        from pathlib import Path

        detail = f"{run_dir} is a file, not a run directory" if Path(run_dir).is_file() else str(exc)
        _fail(f"{detail}; fix: pass the run_dir of a run config (the folder `posttrain run CONFIG` writes)")
        return
    if not rows:
        typer.echo(f"{run_dir}: no stage has run yet")
        return
    table = Table(title=f"run {run_dir}", title_justify="left")
    for col in ("stage", "state", "records", "time", "finished", "note"):
        table.add_column(col, overflow="fold")
    colors = {"done": "green", "failed": "red", "interrupted": "yellow", "stale": "yellow", "running": "cyan"}
    for r in rows:
        state = f"[{colors[r['state']]}]{r['state']}[/]" if r["state"] in colors else r["state"]
        table.add_row(r["stage"], state, r["records"], r["time"], r["finished"], r["note"])
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    console.print(table)


@config_app.command("show")
def config_show(
    config: str = typer.Argument(..., help="Run config (YAML)."),
    overrides: list[str] = typer.Option(None, "--set", help=_SET_HELP),
) -> None:
    """Validate a run config and print it resolved (defaults filled in, overrides applied) as YAML."""
    from pipeline.run.config import dump_config

    typer.echo(dump_config(_load(config, overrides)), nl=False)


# -- publication and report (pipeline/reporting/publish.py, pipeline/reporting/report.py) ----------------------------------


@app.command("publish")
def publish_cmd(
    run_dir: str = typer.Argument(..., help="Run directory (run_dir of the config)."),
    repo_id: str = typer.Option(..., "--repo-id", help="Dataset repo on the Hub, ORG/NAME (created if missing)."),
    private: bool = typer.Option(False, "--private", help="Create the repo(s) as private."),
    dry_run: str = typer.Option(None, "--dry-run", metavar="DIR",
                                help="Write exactly what would be uploaded into DIR; upload nothing."),
    model_repo_id: str = typer.Option(None, "--model-repo-id", metavar="ORG/NAME",
                                      help="Also upload the run's final model (dpo_model, else sft_model) there."),
    include_intermediate: bool = typer.Option(False, "--include-intermediate",
                                              help="Also publish seeds, instructions, evolved and answers."),
) -> None:
    """Push the run's datasets to the Hugging Face Hub as one dataset repo with one config per dataset
    (sft, preferences, online_dpo_round_k), with a dataset card made from the run. Uses HF_TOKEN (or
    `hf auth login`) and HF_ENDPOINT; a rerun skips what is already on the Hub."""
    import os
    from pathlib import Path

    from pipeline.reporting.publish import PublishConfig, PublishError, publish

    try:
        cfg = PublishConfig(repo_id=repo_id, private=private, dry_run=Path(dry_run) if dry_run else None,
                            model_repo_id=model_repo_id, include_intermediate=include_intermediate,
                            endpoint=os.environ.get("HF_ENDPOINT") or None)
        publish(run_dir, cfg, echo=typer.echo)
    except PublishError as exc:
        _fail_run(exc)


@app.command("report")
def report_cmd(
    run_dir: str = typer.Argument(..., help="Run directory (run_dir of the config)."),
    out: str = typer.Option(None, "--out", help="HTML file to write (default RUN_DIR/report/report.html)."),
) -> None:
    """Write a self-contained HTML report of the run (plots embedded) and print a short summary."""
    from pipeline.reporting.report import write_report
    from pipeline.reporting.run_stats import RunDirError

    try:
        write_report(run_dir, out, echo=typer.echo)
    except RunDirError as exc:
        _fail(str(exc))


@app.command("eval")
def eval_cmd(
    target: str = typer.Argument(..., metavar="MODEL_OR_RUN_DIR",
                                 help="Embedded model name, model folder, or run directory (its final model: "
                                      "models/dpo_model, else models/sft_model)."),
    benchmark: str = typer.Option("ifeval", help="Benchmark to run (ifeval)."),
    limit: int | None = typer.Option(None, min=1, help="Only the first N prompts (default: all 541)."),
    max_tokens: int | None = typer.Option(None, min=1, help="Longest answer in tokens (default: the eval stage's)."),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as one JSON object (the last line)."),
    out: str = typer.Option(None, "--out", metavar="FILE", help="Also write each prompt's answer and verdicts "
                                                                "there (JSON lines)."),
) -> None:
    """Greedy answers through the vLLM pool, scored by IFEval's instruction checkers: prompt- and
    instruction-level accuracy (strict and loose), truncated fraction and mean answer length."""
    import json
    import time

    from pipeline.engines.pool import EngineStartError
    from pipeline.executor import worker_logs_in
    from pipeline.files import atomic_write_jsonl
    from pipeline.models.catalog import posttrain_home
    from stages.eval import evaluate_model, final_model, load_prompts
    from stages.eval.benchmark import BenchmarkError
    from stages.eval.evaluate import DEFAULT_MAX_TOKENS

    tokens = max_tokens or DEFAULT_MAX_TOKENS
    logs = posttrain_home() / "logs" / f"eval-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        model = final_model(target)
        rows = load_prompts(benchmark, limit)
        with worker_logs_in(logs):  # the engines' output goes to files: stdout keeps the figures only
            scored, summary = evaluate_model(model, rows, max_tokens=tokens, benchmark=benchmark)
    except (BenchmarkError, ModelError, ValueError) as exc:
        _fail(str(exc))
    except EngineStartError as exc:
        _fail_run(exc)
    if out:
        atomic_write_jsonl(out, scored)
    if as_json:
        typer.echo(json.dumps(summary))
        return
    typer.echo(f"{benchmark} on {model}: {summary['n']} prompts, answers up to {tokens} tokens (greedy)")
    typer.echo(f"  prompt-level       strict {summary['prompt_strict']:.3f}   loose {summary['prompt_loose']:.3f}")
    typer.echo(f"  instruction-level  strict {summary['instruction_strict']:.3f}   "
               f"loose {summary['instruction_loose']:.3f}")
    typer.echo(f"  truncated {summary['truncated_fraction']:.1%} of answers; mean answer {summary['mean_tokens']:.0f} "
               "tokens" + (f"; per-prompt results: {out}" if out else ""))
    typer.echo(f"  engine logs: {logs}")


critic_app = typer.Typer(no_args_is_help=True, help="The critique model of the filter stage.")
app.add_typer(critic_app, name="critic")


@critic_app.command("train")
def critic_train(
    data: str = typer.Argument(..., help="Graded examples: a dataset folder of Parquet shards (e.g. RUN_DIR/datasets/sft "
                                         "of a run graded by a stronger critic), a .parquet or a .jsonl file."),
    out: str = typer.Argument(..., help="Folder for the fine-tuned critic (serve it as a model role)."),
    base_model: str = typer.Option("smollm2-135m-instruct", help="Model to fine-tune (embedded name or folder)."),
    epochs: float = typer.Option(3.0, help="Passes over the examples."),
    max_steps: int | None = typer.Option(None, help="Cap on optimizer steps."),
    backend: str = typer.Option("ray", help="ray (Ray Train job) or local (this process)."),
) -> None:
    """Fine-tune a critique model on graded examples (stages/sft/critic.py, through the SFT trainer)."""
    from pathlib import Path

    import datasets

    from stages.sft.critic import CritiqueDataError, CritiqueTrainConfig, train_critique_model

    path = Path(data)
    if path.is_dir():
        files = sorted(str(p) for p in path.glob("*.parquet"))
        kind = "parquet"
    elif path.suffix in (".parquet", ".jsonl", ".json"):
        files, kind = [str(path)], "parquet" if path.suffix == ".parquet" else "json"
    else:
        files, kind = [], ""
    if not files:
        _fail(f"{path}: no graded examples found; fix: give a folder of .parquet shards, a .parquet or a .jsonl file")
    rows = datasets.load_dataset(kind, data_files=files, split="train").to_list()
    try:
        cfg = CritiqueTrainConfig(base_model=base_model, epochs=epochs, max_steps=max_steps, backend=backend)
        metrics = train_critique_model(rows, cfg, Path(out), Path(out).with_name(Path(out).name + ".work"))
    except (CritiqueDataError, ModelError, ValueError) as exc:
        _fail(str(exc))
    typer.echo(f"critic written to {out}: {metrics['examples']} examples, held-out loss "
               f"{metrics['heldout_nll_before']} -> {metrics['heldout_nll_after']}")


@critic_app.command("known-quality")
def critic_known_quality(
    out: str = typer.Argument(..., help="JSON-lines file for the graded examples (input of `posttrain critic train`)."),
    items: int | None = typer.Option(None, min=1, help="Docstring items (5 answers each); default: every one that "
                                                       "the filter's calibration set does not use."),
    seed: int = typer.Option(1, help="Which items and corruptions."),
) -> None:
    """Graded examples of known quality (critique/calibration.py: CPython docstrings as references, and truncated,
    wrong-fact, off-topic and constraint-breaking versions of them), on functions the filter's calibration check
    never uses, for fine-tuning a critic whose calibration figure then means something."""
    from collections import Counter

    from critique.calibration import CalibrationConfig, critic_training_set
    from pipeline.files import atomic_write_jsonl

    try:
        rows = critic_training_set(items, CalibrationConfig(), seed)
    except ValueError as exc:
        _fail(str(exc))
    atomic_write_jsonl(out, rows)
    typer.echo(f"{len(rows)} graded examples on {len({r['item'] for r in rows})} functions written to {out}; "
               f"tiers {dict(sorted(Counter(r['tier'] for r in rows).items()))}")


def main() -> None:  # pragma: no cover - console entry point
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    main()
