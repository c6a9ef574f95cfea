"""The ``omnimoe`` command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from omnimoe.config import ConfigError, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help="omnimoe: multimodal models from frozen unimodal ones with Mixture-of-Experts.")
moe_app = typer.Typer(no_args_is_help=True, help="The sparse-MoE engine.")
app.add_typer(moe_app, name="moe")


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(2)


@moe_app.command("example")
def moe_example(
    out: Path = typer.Option(Path("runs/moe-example"), help="Output folder (results.json, plots, saved layer)."),
    config: Optional[Path] = typer.Option(None, help="YAML recipe (see configs/moe_example.yaml)."),
    set_: List[str] = typer.Option([], "--set", help="Dotted override, e.g. --set num_experts=16 (repeatable)."),
    quick: bool = typer.Option(False, help="A few seconds: few steps, small test set (for CI)."),
) -> None:
    """Train a dense MLP and an MoE at equal active FLOPs on a clustered task; upcycle; save and reload."""
    from omnimoe.demos.moe_engine import EngineDemoConfig, format_table, run_engine_demo

    overrides = (["steps=40", "upcycle_steps=20", "test_tokens=512"] if quick else []) + list(set_)
    try:
        cfg = load_config(EngineDemoConfig, config, overrides)
    except ConfigError as exc:
        _fail(str(exc))
    result = run_engine_demo(cfg, out)
    typer.echo(format_table(result))
    typer.echo(f"\nresults: {out / 'results.json'}; plots: " + ", ".join(str(out / p) for p in result["plots"]))


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Output folder."),
    quick: bool = typer.Option(False, help="Smoke-test size (seconds)."),
) -> None:
    """The main end-to-end demo. (Until the Alt-MoE demo lands, the MoE engine example.)"""
    moe_example(out=out, config=None, set_=[], quick=quick)


@app.command()
def info(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Versions and what this machine can run (bf16 speed-up, grouped_mm, threads)."""
    import torch

    from omnimoe import __version__
    from omnimoe.moe.experts import grouped_mm_supported

    data = {
        "omnimoe": __version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "grouped_mm_cpu_bf16": grouped_mm_supported(torch.bfloat16, torch.device("cpu"), 64),
    }
    if as_json:
        typer.echo(json.dumps(data))
    else:
        for k, v in data.items():
            typer.echo(f"{k:>20}: {v}")


if __name__ == "__main__":
    app()
