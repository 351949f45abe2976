"""`farsync export RUN_DIR OUT_DIR`: a run's global model as a Hugging Face folder."""

from __future__ import annotations

import typer

from farsync.cli.common import user_errors


def export(
    run_dir: str = typer.Argument(..., help="A run directory with a checkpoint."),
    out_dir: str = typer.Argument(..., help="Folder to write (config.json, model.safetensors, tokenizer): new or empty."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into OUT_DIR even if it holds files."),
) -> None:
    """Write θ_g of RUN_DIR's latest checkpoint where AutoModelForCausalLM.from_pretrained
    and AutoTokenizer.from_pretrained load it (farsync's Llama as Qwen3, or Llama without
    QK-norm; a model.hf_config run as its own architecture)."""
    from farsync.train.export import export as run_export

    typer.echo(user_errors(lambda: run_export(run_dir, out_dir, overwrite=overwrite,
                                              log=lambda m: typer.echo(m, err=True))))


def register(app: typer.Typer) -> None:
    app.command("export")(export)
