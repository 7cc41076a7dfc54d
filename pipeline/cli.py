"""The ``posttrain`` command line."""

from __future__ import annotations

import sys

import typer

from pipeline.models import ModelError

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
    from pipeline.models import models_dir, prepare_all
    from pipeline.upcycle import UpcycleConfig

    typer.echo(f"model cache: {models_dir()}")
    try:
        prepare_all(UpcycleConfig(num_experts=experts, top_k=top_k), force=force, log=typer.echo)
    except (ModelError, ValueError) as exc:
        _fail(str(exc))


@models_app.command("list")
def models_list() -> None:
    """Show the embedded models and whether they are built."""
    from pipeline.models import list_models

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


def main() -> None:  # pragma: no cover - console entry point
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    main()
