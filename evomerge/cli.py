"""The command line: parse, load, call one function. Errors become one line and exit code 1."""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path
from typing import Any, Callable

import click

from evomerge import __version__
from evomerge.errors import EvomergeError

log = logging.getLogger("evomerge")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s" if not verbose else "%(asctime)s %(name)s %(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("lm_eval", "lm-eval", "transformers", "datasets", "urllib3", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.ERROR)


def friendly_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn evomerge's errors into one clear line and a non-zero exit; Ctrl-C into exit 130."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except EvomergeError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="evomerge")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging (including lm-eval and transformers).")
def main(verbose: bool) -> None:
    """Evolve model-merge recipes: merge, search, export, sweep, report."""
    _setup_logging(verbose)


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--seed", type=int, default=None, help="Override the recipe's random_seed (DARE/DELLA masks).")
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it exists.")
@friendly_errors
def merge(recipe: Path, out_dir: Path, device: str, seed: int | None, overwrite: bool) -> None:
    """Build the model described by a mergekit-style RECIPE into OUT_DIR."""
    from tqdm import tqdm

    from evomerge.engine import merge_to_dir
    from evomerge.recipe import Recipe

    parsed = Recipe.from_yaml(recipe)
    bar: tqdm | None = None

    def progress(done: int, total: int, name: str) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="tensor", desc="merging", disable=None, leave=False)
        bar.update(1)

    try:
        path = merge_to_dir(parsed, out_dir, device=device, seed=seed, relative_to=recipe.parent,
                            overwrite=overwrite, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    click.echo(f"wrote {path}")
