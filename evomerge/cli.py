"""The command line: parse, load, call one function. Errors become one line and exit code 1."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import click

from evomerge import __version__
from evomerge.cli_mergekit import mergekit_yaml_options, settings
from evomerge.errors import EvomergeError

log = logging.getLogger("evomerge")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s" if not verbose else "%(asctime)s %(name)s %(levelname)s: %(message)s",
        stream=sys.stderr,
        force=True,  # -v after the subcommand reconfigures what the group set up
    )
    for noisy in ("lm_eval", "lm-eval", "transformers", "datasets", "urllib3", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.ERROR)
    if verbose:  # lm-eval's own switch: its logs and bars show, here and in Ray workers (they inherit it)
        os.environ["LMEVAL_LOG_LEVEL"] = "DEBUG"


def _verbose_flag(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        _setup_logging(True)


class _Group(click.Group):
    """Every subcommand also takes ``-v`` (so ``evomerge search x.yml -v`` works as ``evomerge -v search``)."""

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        cmd.params.append(click.Option(["-v", "--verbose"], is_flag=True, expose_value=False,
                                       callback=_verbose_flag, help="Debug logging, including lm-eval's."))
        super().add_command(cmd, name)


def _example(*lines: str) -> str:
    """A help epilog with example command lines (kept as written: click does not rewrap them)."""
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)


def friendly_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn evomerge's errors into one clear line and a non-zero exit; Ctrl-C into exit 130; any
    other exception (a bug) into one line, or its traceback under -v."""

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
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as e:  # a bug: its traceback under -v, else one line that says so
            if logging.getLogger().isEnabledFor(logging.DEBUG):
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            click.echo(f"error: internal error ({type(e).__name__}: {first}); run with -v for the traceback", err=True)
            sys.exit(1)

    return wrapper


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="evomerge")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging (including lm-eval and transformers).")
def main(verbose: bool) -> None:
    """Evolve model-merge recipes: merge, search, export, sweep, report."""
    _setup_logging(verbose)


@main.command(epilog=_example("evomerge moe moe.yml moe_out/"))
@click.argument("config", type=click.Path(path_type=Path))
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it exists.")
@friendly_errors
def moe(config: Path, out_dir: Path, overwrite: bool) -> None:
    """Build a mixture of experts from a mergekit-moe CONFIG into OUT_DIR (experts may be study:NAME[#N])."""
    from evomerge.moe import write_moe
    from evomerge.moe_config import MoEConfig
    from evomerge.moe_studies import study_recipes

    cfg = MoEConfig.load(config)
    click.echo(f"wrote {write_moe(cfg, out_dir, overwrite=overwrite, study_recipe=study_recipes(cfg))}")


@main.command(epilog=_example("evomerge merge recipe.yml merged/ --cuda --out-shard-size 2B"))
@click.argument("recipe", type=click.Path(path_type=Path))
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--device", default=None, help="cpu, cuda, cuda:N or auto (default: cpu, or cuda with --cuda).")
@click.option("--seed", type=int, default=None, help="Same as --random-seed.")
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it exists.")
@mergekit_yaml_options
@friendly_errors
def merge(recipe: Path, out_dir: Path, device: str | None, seed: int | None, overwrite: bool, **mk: Any) -> None:
    """Build the model described by a mergekit RECIPE into OUT_DIR (mergekit-yaml's options work;
    those that change nothing here say why)."""
    from tqdm import tqdm

    from evomerge.engine import merge_to_dir
    from evomerge.files import read_text
    from evomerge.recipe import Recipe

    opts = settings(device, seed, **mk)
    for note in opts.notes:
        click.echo(f"note: {note}", err=True)
    parsed = Recipe.from_yaml(recipe)
    if opts.num_threads is not None:
        import torch

        torch.set_num_threads(opts.num_threads)
    bar: tqdm | None = None

    def progress(done: int, total: int, name: str) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="tensor", desc="merging", disable=None if not opts.quiet else True,
                       leave=False)
        bar.update(1)

    try:
        path = merge_to_dir(parsed, out_dir, device=opts.device, seed=opts.seed, relative_to=recipe.parent,
                            overwrite=overwrite, progress=progress, recipe_yaml=read_text(recipe, "recipe"),
                            copy_tokenizer=opts.copy_tokenizer, write_card=opts.write_card,
                            max_shard_bytes=opts.max_shard_bytes, allow_crimes=opts.allow_crimes)
    finally:
        if bar is not None:
            bar.close()
    click.echo(f"wrote {path}")


@main.command("convert-gguf", epilog=_example("evomerge convert-gguf model.Q8_0.gguf model-hf/"))
@click.argument("gguf_file", type=click.Path(path_type=Path))
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True,
              help="The dequantised weights' dtype.")
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it exists.")
@friendly_errors
def convert_gguf(gguf_file: Path, out_dir: Path, dtype: str, overwrite: bool) -> None:
    """Write a GGUF model as a safetensors folder (dequantised; tokenizer, chat template and
    generation config included) that merge, search and mergekit read."""
    from evomerge.gguf import convert_gguf as convert

    click.echo(f"wrote {convert(gguf_file, out_dir, dtype=dtype, overwrite=overwrite)}")


@contextlib.contextmanager
def _logs_through(console: Any) -> Iterator[None]:
    """Log records go through the rich console while it holds a live progress bar (printed above
    it) instead of straight to stderr (which tears the bar)."""
    from rich.logging import RichHandler

    root = logging.getLogger()
    saved = root.handlers[:]
    handler = RichHandler(console=console, show_time=False, show_level=False, show_path=False,
                          markup=False, highlighter=None)
    handler.setFormatter(saved[0].formatter if saved else logging.Formatter("%(message)s"))
    root.handlers = [handler]
    try:
        yield
    finally:
        root.handlers = saved


def _trial_line(r) -> str:
    if r.state == "FAIL":
        return f"trial {r.number:>4}  FAILED  {r.seconds:6.1f}s  {r.error}"
    tag = f" [{r.baseline}]" if r.baseline else ""
    best = f"best {r.best:.4f} (#{r.best_number})" if r.best is not None else ""
    value = f"~{r.fitness:.4f} pruned" if r.state == "PRUNED" else f"{r.fitness:.4f}"  # pruned: racing's estimate
    return f"trial {r.number:>4}  {value}  {r.seconds:6.1f}s  {best}{tag}  {r.summary}".rstrip()


@main.command(epilog=_example("evomerge search configs/example.yml --trials 50", "evomerge search configs/ja_math.yml --dry-run", "evomerge search evolve.yml   # a mergekit-evolve config"))
@click.argument("config", type=click.Path(path_type=Path))
@click.option("--trials", type=int, default=None, help="Run until this many trials count (default: budget.trials).")
@click.option("--fresh", is_flag=True, help="Delete the existing study of this name and start over.")
@click.option("--fork", is_flag=True, help="If the config changed, start a new study beside the old one.")
@click.option("--storage", default=None, help="Optuna storage URL (default: sqlite:///runs/<study>.db in CONFIG's "
              "folder; a relative sqlite:/// path here is relative to the current folder).")
@click.option("--study", "study_name", default=None, help="Override the config's study name.")
@click.option("--device", default=None, help="Override the config's device.")
@click.option("--stage", "stage", type=click.Choice(["ps", "dfs", "moe"]), default=None,
              help="Run one stage only (default: every stage of the config, in order).")
@click.option("--dry-run", is_flag=True,
              help="Validate CONFIG without weights: print each stage's space, the memory plan and a time estimate.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Trials evaluated at once, each by a Ray worker (default: one per visible GPU for a cuda "
                   "device, else 1; 1 runs in this process).")
@click.option("--ray-address", default=None, help="Join this Ray cluster (host:port of `ray start --head`).")
@click.option("--trial-timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Fail a trial still running after this many seconds and restart its worker.")
@friendly_errors
def search(config: Path, trials: int | None, fresh: bool, fork: bool, storage: str | None,
           study_name: str | None, device: str | None, stage: str | None, dry_run: bool, workers: int | None,
           ray_address: str | None, trial_timeout: float | None) -> None:
    """Search merge recipes for CONFIG; run it again to resume (with any number of workers)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from evomerge.evolve_config import load_search_config
    from evomerge.search import run_search

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cfg = load_search_config(config, storage=_storage_url(storage), study=study_name, device=device, workers=workers,
                            ray_address=ray_address)
    if trial_timeout is not None:
        cfg = cfg.model_copy(update={"budget": cfg.budget.model_copy(update={"timeout_s": trial_timeout})})
    if fresh and fork:
        raise click.UsageError("--fresh and --fork exclude each other")
    if dry_run:
        from evomerge.dryrun import dry_run as plan
        from evomerge.search import validate

        validate(cfg, stages=[stage] if stage else None)
        lines, _ = plan(cfg, stages=[stage] if stage else None)
        click.echo("\n".join(lines))
        return
    console = Console(stderr=True)
    progress = Progress(TextColumn("[bold]search"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[best]}"), TimeElapsedColumn(), TextColumn("eta"),
                        TimeRemainingColumn(), console=console, transient=True)
    task_id = None

    def on_start(info: dict) -> None:
        nonlocal task_id
        verb = "created" if info["created"] else "resuming"
        if task_id is not None:
            progress.stop()
            progress.remove_task(task_id)
        console.print(f"stage {info['stage']}: {verb} study [bold]{info['study']}[/] in {info['storage']} "
                      f"({info['dimensions']} dimensions, {info['done']}/{info['total']} trials done"
                      + (f", {info['workers']} workers)" if info.get("workers", 1) > 1 else ")"))
        progress.start()
        task_id = progress.add_task("search", total=info["total"], completed=info["done"], best="")

    def on_trial(r) -> None:
        progress.console.print(_trial_line(r), soft_wrap=True, highlight=False, markup=False)
        best = f"best {r.best:.4f}" if r.best is not None else ""
        progress.update(task_id, completed=r.done, best=best)

    try:
        with _logs_through(console):
            result = run_search(cfg, fresh=fresh, fork=fork, trials=trials, on_trial=on_trial, on_start=on_start,
                                stages=[stage] if stage else None)
    finally:
        if task_id is not None:
            progress.stop()
    state = "stopped" if result.interrupted else "done"
    best = (f"best trial {result.best_number}: {result.best_fitness:.4f}"
            if result.best_number is not None else "no completed trial")
    click.echo(f"{state}: {result.completed} trials in study {result.study_name}; {best}")
    if result.best_number is not None:
        click.echo(f"export it: evomerge export --study {result.study_name} --storage {result.storage_url} -o best.yml")
    if result.interrupted:  # Ctrl-C: the trials in flight are recorded; scripts see a stop, not a finish
        sys.exit(130)


@main.command(epilog=_example("evomerge convert evolve.yml -o search.yml"))
@click.argument("config", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="The native config to write.")
@friendly_errors
def convert(config: Path, output: Path) -> None:
    """Write a mergekit-evolve CONFIG (genome:, tasks:) as an evomerge search config, with the
    mapping of each field in comments (`evomerge search` reads either)."""
    from evomerge.evolve_config import load_native, native_yaml
    from evomerge.files import write_atomic

    native, lines = load_native(config)
    from evomerge.config import SearchConfig

    SearchConfig.from_dict(native, root=output.resolve().parent, source=str(output))  # it must load as written
    for line in lines:
        click.echo(line)
    click.echo(f"wrote {write_atomic(output, native_yaml(native, lines, config))}")


def _study_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--storage", default=None, help="Storage URL, as `evomerge search` printed it (default "
                      "sqlite:///runs/<study>.db; a relative sqlite:/// path is relative to the current folder).")(fn)
    fn = click.option("--study", "study_name", required=True, help="Study name.")(fn)
    return fn


def _storage_url(storage: str | None) -> str | None:
    """A ``--storage`` given on the command line: a relative SQLite path is relative to the current
    folder, in every subcommand (a ``storage:`` inside a config file is relative to that file's folder)."""
    if storage and storage.startswith("sqlite:///") and not storage.startswith("sqlite:////"):
        return f"sqlite:///{Path(storage.removeprefix('sqlite:///')).resolve()}"
    return storage


def _study_url(study_name: str, storage: str | None) -> str:
    return _storage_url(storage) or f"sqlite:///{Path('runs', study_name + '.db').resolve()}"


def _load_study(study_name: str, storage: str | None):
    from evomerge.study import load_existing_study

    url = _study_url(study_name, storage)
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        from evomerge.errors import ConfigError

        raise ConfigError(f"--storage: {url.removeprefix('sqlite:///')} does not exist (pass --storage URL)")
    return load_existing_study(study_name, url)


@main.command(epilog=_example("evomerge export --study my-study --storage sqlite:///runs/my-study.db -o best.yml --merge merged/"))
@_study_options
@click.option("--trial", "number", type=int, default=None, help="Trial number (default: the best).")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("best.yml"), show_default=True)
@click.option("--merge", "merge_dir", type=click.Path(path_type=Path), default=None, help="Also build the model here.")
@click.option("--overwrite", is_flag=True, help="Replace the --merge folder if it exists.")
@click.option("--device", default="cpu", show_default=True)
@friendly_errors
def export(study_name: str, storage: str | None, number: int | None, output: Path, merge_dir: Path | None,
           overwrite: bool, device: str) -> None:
    """Write a trial's recipe as mergekit YAML (and optionally build it)."""
    from evomerge.export import baseline_note, build_trial_model, export_recipe

    study = _load_study(study_name, storage)
    path, recipe, trial = export_recipe(study, output, number)
    note = baseline_note(study, trial)
    click.echo(f"wrote {path} (trial {trial.number}" + (f"; {note})" if note else ")"))
    if merge_dir is not None:
        build_trial_model(study, trial, recipe, merge_dir, device=device, overwrite=overwrite)
        click.echo(f"wrote {merge_dir}")


@main.command(epilog=_example("evomerge status --study my-study --storage sqlite:///runs/my-study.db --top 5"))
@_study_options
@click.option("--top", type=int, default=10, show_default=True)
@friendly_errors
def status(study_name: str, storage: str | None, top: int) -> None:
    """Print a study's leaderboard (best trials and the parents' baselines)."""
    from rich.console import Console
    from rich.table import Table

    from evomerge.study import baseline_note, best_trial, elite_line, elites_of, leaderboard

    study = _load_study(study_name, storage)
    rows = leaderboard(study, top)
    states: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        states[t.state.name] = states.get(t.state.name, 0) + 1
    table = Table(title=f"study {study.study_name}: " + ", ".join(f"{v} {k.lower()}" for k, v in sorted(states.items())))
    tasks = sorted({k for r in rows for k in r["scores"]})
    for col in ["trial", "fitness", *tasks, "method", "seconds", "note"]:
        table.add_column(col, justify="right" if col not in ("method", "note") else "left")
    for r in rows:
        table.add_row(str(r["number"]), f"{r['fitness']:.4f}", *[f"{r['scores'].get(t, float('nan')):.4f}" for t in tasks],
                      r["method"] or "", f"{r['seconds']:.1f}" if r["seconds"] else "",
                      baseline_note(study, r["baseline"], r["method"]))
    Console().print(table)
    elites, best = elites_of(study), best_trial(study)
    for number, elite in sorted(elites.items(), key=lambda kv: -kv[1]["fitness"]):
        mark = "best" if best is not None and best.number == number else "elite"
        click.echo(f"{mark} trial {number}, re-evaluated: {elite_line(elite)}")


@main.command(epilog=_example("evomerge report --study my-study --storage sqlite:///runs/my-study.db -o reports/my-study"))
@_study_options
@click.option("-o", "--output", "--out", "out", type=click.Path(path_type=Path), default=None,
              help="Output folder (default reports/<study>/).")
@friendly_errors
def report(study_name: str, storage: str | None, out: Path | None) -> None:
    """Plot a study: fitness per trial, the best recipe or layer path, parameter importances, the
    Pareto front (multi-objective); and report.md linking them."""
    from evomerge.report import write_report

    study = _load_study(study_name, storage)
    result = write_report(study, out or Path("reports", study_name), storage=_study_url(study_name, storage))
    for path in result.files:
        click.echo(f"wrote {path}")
    for reason in result.skipped:
        click.echo(f"skipped {reason}")
    click.echo(f"wrote {result.markdown}")


@main.command(epilog=_example("evomerge sweep configs/sweep_example.yml -o runs/sweep"))
@click.argument("config", type=click.Path(path_type=Path))
@click.option("--metric", type=click.Choice(["exact", "embedding"]), default=None,
              help="Re-score with this metric (cached generations are reused).")
@click.option("--aggregate", type=click.Choice(["all", "mean"]), default=None,
              help="all: count prompts unlike every neighbour (AdaMMS); mean: average over neighbours.")
@click.option("--smoothing", type=int, default=None, help="Moving-average half-width (0: none).")
@click.option("-o", "--output", "--out", "out", type=click.Path(path_type=Path), default=None,
              help="Output folder (default runs/<sweep>/ next to CONFIG).")
@click.option("--device", default=None, help="Override the config's device.")
@friendly_errors
def sweep(config: Path, metric: str | None, aggregate: str | None, smoothing: int | None, out: Path | None,
          device: str | None) -> None:
    """Pick merge coefficients without labels: generate at every value and choose the one whose
    answers agree most with its neighbours' (AdaMMS). Run it again to resume or re-score."""
    from rich.console import Console
    from rich.table import Table

    from evomerge.config import SweepConfig
    from evomerge.sweep import run_sweep
    from evomerge.sweep_report import table_rows

    cfg = SweepConfig.load(config, device=device)
    console = Console(stderr=True)
    total = len(cfg.points())
    done = 0

    def on_point(p) -> None:
        nonlocal done
        done += 1
        label = " ".join(f"{k}={v:g}" for k, v in p.values.items())
        how = "cached" if p.cached and p.seconds < 0.05 else f"{p.seconds:.1f}s"
        acc = f"  accuracy {p.accuracy:.4f}" if p.accuracy is not None else ""
        console.print(f"[{done}/{total}] {label}: {how}{acc}", highlight=False)

    res = run_sweep(cfg, out=out, metric=metric, aggregate=aggregate, smoothing=smoothing, on_point=on_point)
    header, rows = table_rows(res)
    table = Table(title=f"sweep {res.name}: {res.metric} disagreement over {res.prompts} prompts")
    for col in header:
        table.add_column(col, justify="left" if col == "note" else "right")
    for row in rows:
        table.add_row(*row, style="bold" if "chosen" in row[-1] else None)
    Console().print(table)
    label = ", ".join(f"{k}={v:g}" for k, v in res.chosen.values.items())
    smoothed = f", smoothed {res.chosen.smoothed:.4g}" if res.smoothing else ""
    click.echo(f"chosen: {label} (disagreement {res.chosen.disagreement:.4g}{smoothed})")
    if len(res.ties) > 1:
        click.echo("tied: " + "; ".join(", ".join(f"{k}={v:g}" for k, v in t.values.items()) for t in res.ties))
    if res.label_best is not None:
        best = ", ".join(f"{k}={v:g}" for k, v in res.label_best.values.items())
        click.echo(f"label-best (reported only): {best} (accuracy {res.label_best.accuracy:.4f}; "
                   f"chosen {res.chosen.accuracy:.4f})")
    click.echo(f"generated {res.generated} of {total} points; wrote " + ", ".join(str(p) for p in res.files.values()))


@main.command(epilog=_example("evomerge demo -o demo_out --trials 20"))
@click.option("-o", "--output", "--out", "out", type=click.Path(path_type=Path), default=Path("demo_out"), show_default=True,
              help="Folder for the world, the study and the results.")
@click.option("--trials", type=int, default=None, help="Search budget (default: the demo config's, evomerge/demo/demo.yml).")
@click.option("--sampler", type=click.Choice(["cmaes", "tpe", "random", "qmc"]), default=None)
@click.option("--seed", type=int, default=0, show_default=True, help="World and search seed.")
@click.option("--fresh", is_flag=True, help="Restart the demo study from scratch.")
@click.option("--world", "world", default=None, metavar="PRESET|JSON",
              help="World settings: a preset (layered: the default world; v1: rebuilds the world of evomerge's "
                   "earlier releases, where one weight per model does as well as a per-layer search) or a JSON "
                   "object of overrides of evomerge.demo.world.DEFAULT_CONFIG, e.g. '{\"base_steps\": 500}'. "
                   "Give each world its own --out.")
@friendly_errors
def demo(out: Path, trials: int | None, sampler: str | None, seed: int, fresh: bool, world: str | None) -> None:
    """Build a tiny offline world (a base, a math and a language specialist), search a merge,
    and show it beating its parents on held-out data."""
    import optuna
    from rich.console import Console
    from rich.table import Table

    from evomerge.demo.pipeline import DEMO_TASKS, run_demo
    from evomerge.demo.world import world_settings

    settings = world_settings(world)  # before anything is written
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    console = Console(stderr=True)
    summary = run_demo(out, trials=trials, sampler=sampler, seed=seed, fresh=fresh, world=settings,
                       say=lambda m: console.print(m, highlight=False),
                       on_trial=lambda r: console.print(_trial_line(r), soft_wrap=True, highlight=False, markup=False),
                       on_start=lambda i: console.print(
                           f"searching: study {i['study']} ({i['dimensions']} dimensions, {i['done']}/{i['total']} trials done)"))
    if summary.get("interrupted"):
        click.echo(f"stopped; run `evomerge demo --out {out}` again to resume")
        sys.exit(130)
    table = Table(title=f"test accuracy (held-out split); best merge = trial {summary['best_trial']} "
                        f"of {summary['trials']} ({summary['sampler']}, {summary['method']})")
    table.add_column("model")
    for task in DEMO_TASKS:
        table.add_column(task, justify="right")
    for name, scores in summary["test_scores"].items():
        table.add_row(name if name != "merged" else "[bold]best merge[/]",
                      *[f"{scores[t]:.3f}" for t in DEMO_TASKS])
    Console().print(table)
    click.echo(f"wrote {out}/best.yml, {out}/merged/, {out}/summary.json, {out}/report/ "
               f"({summary['seconds']['total']:.0f} s)")
