"""The `offcomp` command line: parse options, call one library function, print with rich.

User mistakes (OffcompError, bad option values) become one red line on stderr and exit code 2,
never a traceback; an unexpected internal error becomes one line naming the exception, exit code 1
(`--debug` or OFFCOMP_DEBUG=1 re-raises it with its traceback). With --json, stdout carries exactly
one JSON object (the recorded result); everything else, including what C libraries such as MKL
print on the process's stdout, goes to stderr.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from .errors import EXIT_INTERNAL, EXIT_NON_FINITE, EXIT_USER, OffcompError
from .progress import ProgressFn
from .records import NON_FINITE, dumps, has_non_finite, strict

EXIT_CODES = (f"Exit codes: 0 success; {EXIT_INTERNAL} internal error (one line; --debug or OFFCOMP_DEBUG=1 "
              f"shows the traceback); {EXIT_USER} bad input (one line, nothing written); {EXIT_NON_FINITE} a "
              "result is not a finite number (recorded as null with a reason); 130 interrupted.")


def _one_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return " ".join(lines) if len(lines) <= 3 else lines[0] + " …"


class OneLineErrors(TyperGroup):
    """Usage errors (unknown option, bad value) as one line on stderr instead of a usage panel."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except typer.TyperException as e:  # click's ClickException family
            if type(e).__name__ != "NoArgsIsHelpError":  # the help was printed already
                ctx = getattr(e, "ctx", None)
                where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
                err.print(f"[bold red]error:[/] {escape(_one_line(e.format_message()))}{escape(where)}",
                          highlight=False, soft_wrap=True)
            sys.exit(getattr(e, "exit_code", EXIT_USER))
        except typer.Abort:
            err.print("[red]aborted[/]")
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


class _Group(OneLineErrors):
    """Plain click help (rich's help panels cut long option names at 80 columns), with each
    command's summary wrapped instead of cut off with "..."."""

    def format_commands(self, ctx: Any, formatter: Any) -> None:  # typer's vendored click types
        rows = [(name, cmd.get_short_help_str(limit=1_000)) for name in self.list_commands(ctx)
                if (cmd := self.get_command(ctx, name)) is not None and not cmd.hidden]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


app = typer.Typer(cls=_Group, add_completion=True, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="Offline compression of pretrained transformer language models.",
                  epilog=EXIT_CODES)
err = Console(stderr=True)
out = Console()


def debug_enabled() -> bool:
    return os.environ.get("OFFCOMP_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def _version(value: bool) -> None:
    if value:
        from . import __version__

        sys.stdout.write(f"offcomp {__version__}\n")
        raise typer.Exit()


@app.callback()
def main(
    debug: Annotated[bool, typer.Option(
        "--debug", help="show the traceback of an internal error (same as OFFCOMP_DEBUG=1)")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="print the version and exit")] = False,
) -> None:
    """Offline compression of pretrained transformer language models."""
    if debug:
        os.environ["OFFCOMP_DEBUG"] = "1"  # also reaches worker processes (torchrun)


Model = Annotated[str, typer.Option("--model", "-m", help="embedded name (smollm2-135m, minilm-l6), HF id or dir")]
def _check_device(value: str) -> str:
    from .pipeline import parse_device

    try:
        parse_device(value)
    except OffcompError as e:
        raise typer.BadParameter(str(e)) from None
    return value


Device = Annotated[str, typer.Option(help="cpu, cuda or cuda:N", callback=_check_device)]
Json = Annotated[bool, typer.Option("--json", help="print exactly one JSON object (the result) on stdout")]
NoVerify = Annotated[bool, typer.Option("--no-verify", help="skip the sha256 check of checkpoint/capture files "
                                                           "(sizes are still checked)")]


def _quiet_libraries() -> None:
    """transformers' own tqdm bars and advisory warnings would bury our progress and errors."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()
    except ImportError:
        pass


# Where `emit` writes the JSON result while `json_stdout` has sent fd 1 to stderr.
_json_out: IO[str] | None = None


@contextlib.contextmanager
def json_stdout(active: bool) -> Iterator[None]:
    """With --json, stdout is reserved for the one result object: everything else written to the
    process's fd 1 (print, C libraries such as MKL/LAPACK) goes to stderr. The real stdout is
    kept aside for `emit`. Under a test runner whose sys.stdout is not fd 1, only sys.stdout is
    redirected."""
    global _json_out
    if not active:
        yield
        return
    real = sys.stdout
    try:
        real_fd = real.fileno()
    except (AttributeError, OSError, ValueError):
        real_fd = None
    if real_fd != 1:
        _json_out = real
        try:
            with contextlib.redirect_stdout(sys.stderr):
                yield
        finally:
            _json_out = None
        return
    real.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    _json_out = os.fdopen(os.dup(saved), "w")
    try:
        yield
    finally:
        sys.stdout.flush()
        _json_out.flush()
        _json_out.close()
        _json_out = None
        os.dup2(saved, 1)
        os.close(saved)


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """OffcompError → one line, exit 2; any other exception → one line naming it, exit 1 (with
    --debug / OFFCOMP_DEBUG=1 the exception propagates with its traceback)."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _quiet_libraries()
        try:
            with json_stdout(bool(kwargs.get("as_json"))):
                return fn(*args, **kwargs)
        except OffcompError as e:
            err.print(f"[bold red]error:[/] {escape(_one_line(str(e)))}", highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_USER) from None
        except KeyboardInterrupt:
            err.print("[red]interrupted[/]")
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise
        except Exception as e:
            if debug_enabled():
                raise
            err.print(f"[bold red]internal error:[/] {escape(type(e).__name__)}: {escape(_one_line(str(e)))} "
                      "(a bug in offcomp or a library; rerun with --debug or OFFCOMP_DEBUG=1 for the traceback)",
                      highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_INTERNAL) from None
    return wrapper


@contextlib.contextmanager
def rich_progress() -> Iterator[ProgressFn]:
    """The ProgressFn of a command: one transient line on stderr (offcomp.terminal)."""
    from .terminal import progress_display

    with progress_display(err) as progress:
        yield progress


def warn_line(message: str) -> None:
    """One yellow line on stderr (never on stdout: --json keeps it for the result)."""
    err.print(f"[bold yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)


def emit(result: dict[str, Any], as_json: bool, table: Table | None = None) -> None:
    """Print the result (one strict JSON object with --json, else the table); a result that holds a
    non-finite number is printed and recorded, then the command exits with EXIT_NON_FINITE."""
    if as_json:
        stream = _json_out or sys.stdout
        stream.write(dumps(result) + "\n")
        stream.flush()
    elif table is not None:
        from .terminal import keep_numbers_whole

        out.print(keep_numbers_whole(table, out.width))
    if has_non_finite(result):
        reasons = strict(result)[NON_FINITE]
        err.print(f"[bold red]non-finite result:[/] {escape(_one_line('; '.join(reasons)))}", highlight=False,
                  soft_wrap=True)
        raise typer.Exit(EXIT_NON_FINITE)


def warn_contaminated(record: dict[str, Any]) -> None:
    """The record says so too (`contaminated: true`); a score on calibration text must be seen."""
    if record.get("contaminated"):
        err.print(f"[yellow]warning:[/] contaminated evaluation: {escape(str(record.get('contamination')))}",
                  highlight=False, soft_wrap=True)


def parse_options(pairs: list[str]) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise OffcompError(f"--option takes key=value, got {pair!r}")
        try:
            opts[key] = json.loads(value)
        except json.JSONDecodeError:
            opts[key] = value
        except RecursionError:  # e.g. -o k=[[[[...]]]]: no method option is nested like that
            raise OffcompError(f"--option {key}: value nested too deeply; options are numbers, strings, "
                               "booleans or short lists") from None
    return opts


def modular_section(epochs: int | None, mode: str | None) -> dict[str, Any] | None:
    """The quick form's `modular:` section: present when either option is given."""
    if epochs is None and mode is None:
        return None
    return {k: v for k, v in (("epochs", epochs), ("mode", mode)) if v is not None}


@app.command()
@user_errors
def compress(
    model: Model = "smollm2-135m",
    plan: Annotated[Path | None, typer.Option(
        help="plan file (YAML/JSON) or a shipped plan's name (`offcomp plans`); or --method")] = None,
    method: Annotated[str | None, typer.Option(help="quick form: method of a one-group plan")] = None,
    rank: Annotated[int | None, typer.Option(help="quick form: rank")] = None,
    ratio: Annotated[float | None, typer.Option(help="quick form: fraction of parameters kept")] = None,
    cr: Annotated[float | None, typer.Option(help="quick form: compression factor original/stored")] = None,
    modules: Annotated[list[str] | None, typer.Option("--modules", help="roles/suffixes/re:regex (repeat)")] = None,
    layers: Annotated[str, typer.Option(help='"all", "0-11", "0-3,8"')] = "all",
    joint: Annotated[bool, typer.Option(help="quick form: compress the matched matrices jointly")] = False,
    option: Annotated[list[str] | None, typer.Option("--option", "-o", help="method option key=value")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="output checkpoint directory")] = None,
    stats: Annotated[Path | None, typer.Option(help="calibration statistics from `offcomp capture`")] = None,
    calib_data: Annotated[str | None, typer.Option(
        help="capture the statistics the plan needs on the fly from this text (cached like `capture`)")] = None,
    calib_split: Annotated[str, typer.Option(help="split of --calib-data (never test)")] = "validation",
    calib_samples: Annotated[int, typer.Option(help="calibration sequences")] = 64,
    calib_seq_len: Annotated[int, typer.Option(help="tokens per calibration sequence")] = 1024,
    calib_seed: Annotated[int, typer.Option(help="seed of the calibration windows")] = 0,
    valid_data: Annotated[str | None, typer.Option(
        help="validation text for early stopping of trained methods (ae, refinement); never the test split")] = None,
    valid_tokens: Annotated[int, typer.Option(help="validation tokens scored per check")] = 4096,
    valid_seq_len: Annotated[int, typer.Option(help="window length of the validation PPL")] = 1024,
    allocate: Annotated[float | None, typer.Option(
        help="quick form: keep this fraction of all the matched parameters, ranks spread by sensitivity")] = None,
    allocate_criterion: Annotated[str, typer.Option(help="quick form: whitened, fisher or weight")] = "whitened",
    modular_epochs: Annotated[int | None, typer.Option(
        help="quick form: then train each compressed block to reproduce the dense one (needs --calib-data)")] = None,
    modular_mode: Annotated[str | None, typer.Option(
        help="quick form: modular training per block on dense inputs (blocks) or per layer on the compressed "
             "model's own hidden states (sequential)")] = None,
    save_dtype: Annotated[str | None, typer.Option(
        help="dtype of the saved weights: fp32, bf16 or fp16 (default: the base checkpoint's own); "
             "fitting always runs in fp32/fp64")] = None,
    pipeline: Annotated[str, typer.Option(
        help="sequential: one block at a time, read lazily (memory independent of depth); global: whole model "
             "and whole-model statistics; auto: sequential when the plan needs calibration data")] = "auto",
    calib_loop: Annotated[str | None, typer.Option(
        help="sequential pipeline: statistics on the compressed prefix's outputs (closed, default) or the dense "
             "model's (open, as the global pipeline)")] = None,
    hidden_states: Annotated[str, typer.Option(
        help="sequential pipeline: keep calibration hidden states on the device, cpu or disk (auto: where "
             "they fit)")] = "auto",
    device: Device = "cpu",
    seed: int = 0,
    dry_run: Annotated[bool, typer.Option(help="expand and validate the plan, print the table, write nothing")] = False,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    no_verify: NoVerify = False,
    as_json: Json = False,
) -> None:
    """Compress a model by a plan (or the quick one-group form) and save a checkpoint."""
    from .pipeline import compress_model, model_config, quick_plan
    from .plan import load_plan

    if (plan is None) == (method is None):
        raise OffcompError("give either --plan FILE or --method NAME (with --rank/--ratio/--cr)")
    if out_dir is not None and not dry_run:  # before the statistics are read and hashed
        from .checkpoint import prepare_out_dir

        prepare_out_dir(out_dir, overwrite, sources=(model,))
    stats_data = None
    if stats is not None:
        from .capture import load_stats  # arrives with data-aware methods

        stats_data = load_stats(stats, verify=not no_verify)
    if plan is not None:
        if any(v is not None for v in (rank, ratio, cr, allocate, modular_epochs, modular_mode)) or modules or joint \
                or option:
            raise OffcompError(
                "--rank/--ratio/--cr/--allocate/--modular-epochs/--modular-mode/--modules/--joint/--option belong to "
                "the quick form; "
                "put them in the plan"
            )
        the_plan, source = load_plan(plan), str(plan)
    else:
        config = model_config(model, trust_remote_code)
        the_plan = quick_plan(config, method, rank=rank, ratio=ratio, cr=cr, modules=modules,  # type: ignore[arg-type]
                              layers=layers, joint=joint, options=parse_options(option or []),
                              allocate=None if allocate is None else {"ratio": allocate,
                                                                      "criterion": allocate_criterion},
                              modular=modular_section(modular_epochs, modular_mode))
        source = f"quick:{method}"
    with rich_progress() as progress:
        calib = None if calib_data is None else {"data": calib_data, "split": calib_split, "samples": calib_samples,
                                                                 "seq_len": calib_seq_len, "seed": calib_seed}
        valid = None if valid_data is None else {"data": valid_data, "max_tokens": valid_tokens,
                                                  "seq_len": valid_seq_len}
        result = compress_model(model, the_plan, out_dir, device=device, seed=seed, stats=stats_data, calib=calib,
                                valid=valid,
                                overwrite=overwrite, dry_run=dry_run, trust_remote_code=trust_remote_code,
                                plan_source=source, save_dtype=save_dtype, progress=progress,
                                verify=not no_verify, warn=warn_line, pipeline=pipeline, calib_loop=calib_loop,
                                hidden_states=hidden_states)
    table = Table(title=f"{'dry run: ' if dry_run else ''}{model} → {out_dir or '-'}")
    for col in ("group", "method", "modules", "mode", "hyper", "original", "stored", "max rel. error"):
        table.add_column(col)
    units = result["units"] if dry_run else result["report"]["units"]
    for label, us in _by_label(units).items():
        names = [n for u in us for n in u["names"]]
        hyper = sorted({json.dumps(u["hyper"]) for u in us})
        errs = [u["rel_error"] for u in us if "rel_error" in u]
        table.add_row(label, us[0]["method"], f"{len(names)}: {names[0]}" + ("…" if len(names) > 1 else ""),
                      "joint" if us[0]["joint"] else f"separate ×{len(us)}", ", ".join(hyper[:3]),
                      f"{sum(u['original_params'] for u in us):,}", f"{sum(u['stored_params'] for u in us):,}",
                      f"{max(errs):.4f}" if errs else "-")
    if not dry_run:
        rep = result["report"]
        table.caption = (f"params {rep['params_before']:,} → {rep['params_after']:,} "
                         f"(ratio {rep['ratio']:.3f}) in {rep['seconds']:.1f}s; "
                         f"weights {result['bytes']['weights_file']:,} bytes ({result['bytes']['dtype']})"
                         + (f"; sequential, {result['pipeline']['loop']} loop"
                            if (result.get("pipeline") or {}).get("pipeline") == "sequential" else ""))
    dense = (result.get("allocation") or {}).get("dense_units")
    if dense:  # not in the table: the allocation left them out of the plan
        table.caption = (table.caption + "; " if table.caption else "") + \
            f"allocation kept {dense} matri{'x' if dense == 1 else 'ces'} dense"
    emit(result, as_json, table)


def _by_label(units: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for u in units:
        groups.setdefault(u["label"], []).append(u)
    return groups


@app.command("eval-ppl")
@user_errors
def eval_ppl(
    model: Annotated[str, typer.Argument(help="base model name/dir or compressed directory")],
    data: Annotated[str, typer.Option(help="embedded, wikitext2 (datasets) or a raw text file")] = "embedded",
    split: str = "test",
    seq_len: int = 1024,
    stride: Annotated[int | None, typer.Option(help="sliding-window stride (default: seq-len, no overlap)")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="score only the first N tokens")] = None,
    batch_size: int = 1,
    device: Device = "cpu",
    dtype: Annotated[str, typer.Option(help="fp32 or bf16")] = "fp32",
    seed: Annotated[int, typer.Option(help="mask seed for masked LMs")] = 0,
    results: Annotated[Path | None, typer.Option(
        help="results.jsonl to append to (default: a compressed dir's own; base models: $OFFCOMP_RESULTS/NAME/, "
             "else ~/.cache/offcomp/results/NAME/)")] = None,
    trust_remote_code: bool = False,
    no_verify: NoVerify = False,
    as_json: Json = False,
) -> None:
    """Perplexity of a base or compressed model (causal: windows; masked: the paper's protocol)."""
    from .pipeline import evaluate_ppl

    with rich_progress() as progress:
        rec = evaluate_ppl(model, data, split=split, seq_len=seq_len, stride=stride, max_tokens=max_tokens,
                           batch_size=batch_size, device=device, dtype=dtype, seed=seed, results=results,
                           trust_remote_code=trust_remote_code, progress=progress, verify=not no_verify)
    warn_contaminated(rec)
    from .terminal import ppl_table

    table = ppl_table(rec, model, out.width)
    err.print(f"results appended to {rec['results_file']}", highlight=False, soft_wrap=True)
    emit(rec, as_json, table)


def _num(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


@app.command("eval-lm")
@user_errors
def eval_lm(
    model: Annotated[str, typer.Argument(help="base model name/dir or compressed directory")],
    tasks: Annotated[str, typer.Option(help="comma-separated lm-eval tasks; offline: local_glue (local_sst2, "
                                            "local_rte, local_mrpc), local_wikitext")],
    data_dir: Annotated[Path | None, typer.Option(
        help="data root of the local_* tasks (holds glue/ and wikitext-2-raw/); default $OFFCOMP_DATA, "
             "else ../shared/data")] = None,
    include_path: Annotated[list[Path] | None, typer.Option(help="extra folder of lm-eval task YAMLs (repeat)")] = None,
    num_fewshot: Annotated[int | None, typer.Option(help="few-shot examples (default: each task's own, 0)")] = None,
    limit: Annotated[int | None, typer.Option(help="score only the first N documents of each task")] = None,
    batch_size: int = 1,
    max_length: Annotated[int | None, typer.Option(
        help="context window (rolling windows for perplexity tasks); default: the model's positions")] = None,
    device: Device = "cpu",
    dtype: Annotated[str, typer.Option(help="fp32 or bf16")] = "fp32",
    results: Annotated[Path | None, typer.Option(help="results.jsonl to append to (default: by the model)")] = None,
    trust_remote_code: bool = False,
    no_verify: NoVerify = False,
    as_json: Json = False,
) -> None:
    """Zero-/few-shot tasks through lm-evaluation-harness (needs offcomp[eval]); one record per task."""
    from .pipeline import evaluate_lm

    out = evaluate_lm(model, tasks.split(","), data_dir=data_dir, include_path=include_path, num_fewshot=num_fewshot,
                      limit=limit, batch_size=batch_size, max_length=max_length, device=device, dtype=dtype,
                      results=results, trust_remote_code=trust_remote_code, verify=not no_verify)
    table = Table(title=f"lm-eval: {model}")
    for col in ("task", "metric", "value", "± stderr", "n"):
        table.add_column(col)
    for rec in out["records"]:
        for key, value in rec["metrics"].items():
            if key.endswith("_stderr"):
                continue
            table.add_row(rec["task"], key, _num(value, ".4f"), _num(rec["metrics"].get(f"{key}_stderr"), ".4f"),
                          str(rec["data"].get("n_scored")))
    for rec in out["records"]:
        warn_contaminated(rec)
    err.print(f"results appended to {out['results_file']}", highlight=False, soft_wrap=True)
    emit(out, as_json, table)


@app.command()
@user_errors
def export(
    src: Annotated[Path, typer.Argument(help="compressed checkpoint directory")],
    dst: Annotated[Path, typer.Argument(help="output directory")],
    dense: Annotated[bool, typer.Option(
        "--dense", help="multiply factors back into plain weights (the only mode, the default)")] = True,
    overwrite: bool = False,
    no_verify: NoVerify = False,
) -> None:
    """Write a plain Hugging Face checkpoint that vanilla from_pretrained loads."""
    from .checkpoint import export_dense

    export_dense(src, dst, overwrite=overwrite, verify=not no_verify)
    err.print(f"wrote {dst}")


@app.command()
@user_errors
def report(
    root: Annotated[Path, typer.Argument(help="directory of runs")] = Path("runs"),
    fmt: Annotated[str, typer.Option("--format", help="table (terminal), md, csv, json or tex")] = "table",
    wide: Annotated[bool, typer.Option("--wide", help="terminal: every column, however wide")] = False,
    plot: Annotated[Path | None, typer.Option(
        "--plot", help="also write one PNG per table (metric vs kept parameters) to this directory")] = None,
    metric: Annotated[list[str] | None, typer.Option(
        help="only this metric's tables (repeat for several), e.g. f1")] = None,
) -> None:
    """One comparison table per evaluation of the runs under a directory."""
    from .report import report_tables

    warnings: list[str] = []
    tables = report_tables(root, warnings, metric)
    for w in warnings:
        err.print(f"[yellow]warning:[/] {escape(w)}", highlight=False, soft_wrap=True)
    if fmt == "table":
        from .terminal import print_tables

        print_tables(tables, out, wide=wide)
    else:
        from .report_render import render

        sys.stdout.write(render(tables, fmt))
    if plot is not None:
        from .report_plot import plot_tables

        for path in plot_tables(tables, plot):
            err.print(f"wrote {path}", highlight=False, soft_wrap=True)


def _fused_note(r: dict) -> str:
    """"fused q/k/v" (slices are roles), with the row layout when it interleaves heads, or why not."""
    if not r.get("fused"):
        return ""
    layout = {"per_head": " per head", "per_group": " per kv group"}.get(r.get("fused_layout") or "", "")
    return "fused " + "/".join(r["fused"]) + layout + (" (slices not addressable)" if r.get("slices_refused") else "")


@app.command()
@user_errors
def inspect(
    model: Annotated[str, typer.Argument(help="embedded name, HF id or model directory")],
    trust_remote_code: bool = False,
    as_json: Json = False,
) -> None:
    """Blocks, roles and aliases, shapes, parameter shares, tied tensors, shared inputs, break-even
    ranks, and a plan skeleton (YAML) to edit."""
    from .inspection import inspect_model

    rec = inspect_model(model, trust_remote_code=trust_remote_code)
    if as_json:
        emit(rec, True)
        return
    b = rec["blocks"]
    out.print(f"{rec['class']} ({rec['model_type']}), {rec['params']:,} parameters; "
              f"{b['layers']} × {b['type']} at {b['path']}", highlight=False)
    table = Table(title="modules: roles of every block (params: all blocks), then the rest")
    for c in ("role", "alias", "shape", "params", "share", "break-even", "notes"):
        table.add_column(c, overflow="fold")
    for r in rec["roles"]:
        notes = ", ".join(x for x in ("Conv1D" if r["conv1d"] else "",
                                      _fused_note(r)) if x)
        table.add_row(r["role"], r["alias"] or "-", "×".join(map(str, r["shape"])), f"{r['params']:,}",
                      f"{r['share']:.1%}", f"{r['break_even_rank']:g}", notes or "-")
    tied = {n for t in rec["tied"] for n in t}
    for r in rec["other"]:
        notes = ", ".join(x for x in ("tied" if r["name"] in tied else "", "refused" if r["refused"] else "") if x)
        table.add_row(r["name"], r["role"] or "-", "×".join(map(str, r["shape"])), f"{r['params']:,}",
                      f"{r['share']:.1%}", f"{r['break_even_rank']:g}", notes or "-")
    out.print(table)
    shared = [" ".join(s) for s in rec["shared_inputs"] if len(s) > 1]
    out.print("read one input (one Gram matrix): " + ("; ".join(shared) or "none"), highlight=False)
    out.print("tied: " + ("; ".join(" = ".join(t) for t in rec["tied"]) or "none"), highlight=False)
    out.print(rec["plan"], highlight=False, markup=False)


@app.command()
@user_errors
def methods(
    method: Annotated[str | None, typer.Argument(help="show this method with every option")] = None,
) -> None:
    """List the compression methods, or one method with every option."""
    from .registry import available_methods, describe_method

    if method is not None:
        d = describe_method(method)
        out.print(f"[bold]{d['name']}[/]: {escape(d['summary'])}", highlight=False)
        out.print(f"statistics needed: {', '.join(d['needs_stats']) or 'none (data-free)'}; "
                  f"compresses: {', '.join(d['kinds'])}; joint groups need matching {d['joint_shapes']}",
                  highlight=False)
        table = Table(title=f"options of {d['name']} (plan `options:` or `compress -o key=value`)",
                      title_justify="left")
        table.add_column("option", no_wrap=True)
        table.add_column("type", overflow="fold")
        table.add_column("default", overflow="fold")
        table.add_column("description", overflow="fold", ratio=1)
        for o in d["options"]:
            table.add_row(o["name"], o["type"], json.dumps(o["default"]), o["description"] or "-")
        out.print(table)
        return
    table = Table(title="compression methods (`offcomp methods NAME` for the options)", title_justify="left")
    table.add_column("method", no_wrap=True)
    table.add_column("statistics", overflow="fold")
    table.add_column("what it does", overflow="fold", ratio=1)
    for name in available_methods():
        d = describe_method(name)
        table.add_row(name, ",".join(d["needs_stats"]) or "-", d["summary"].split(". ")[0])
    out.print(table)


@app.command()
@user_errors
def plans() -> None:
    """List the sample plans shipped with offcomp (use one with --plan NAME)."""
    from .plan import plan_description, shipped_plans

    table = Table(title="shipped plans (`offcomp compress --plan NAME`)", title_justify="left")
    table.add_column("name", no_wrap=True)
    table.add_column("description", overflow="fold", ratio=1)
    for name, path in shipped_plans().items():
        table.add_row(name, plan_description(path))
    out.print(table)
    out.print(f"files: {next(iter(shipped_plans().values())).parent}", highlight=False, soft_wrap=True)


@app.command("plan-schema")
@user_errors
def plan_schema() -> None:
    """Print the plan JSON schema, for editors such as the YAML language server."""
    from .plan import Plan

    sys.stdout.write(json.dumps(Plan.model_json_schema(), indent=2) + "\n")


@app.command()
@user_errors
def capture(
    model: Model = "smollm2-135m",
    data: Annotated[str, typer.Option(help="wikitext2 (hub), embedded, a raw file or dir")] = "wikitext2",
    split: Annotated[str, typer.Option(help="validation or train; test is refused")] = "validation",
    samples: Annotated[int, typer.Option(help="number of calibration sequences")] = 64,
    seq_len: Annotated[int, typer.Option(help="tokens per sequence (random windows)")] = 1024,
    seed: Annotated[int, typer.Option(help="seed of the windows (and of the masks for encoders)")] = 0,
    batch_size: Annotated[int, typer.Option(help="sequences per step; Fisher uses per-batch gradients")] = 1,
    gram: Annotated[bool, typer.Option(help="XᵀX, Σx² and mean|x| per input (forward only)")] = True,
    fisher: Annotated[bool, typer.Option(help="Fisher row sums (needs a backward pass)")] = True,
    fisher_full: Annotated[bool, typer.Option(help="also the per-element Fisher (as large as the weights)")] = False,
    blocks: Annotated[str | None, typer.Option(
        help='stream attention/FFN block inputs+outputs of these layers ("0-3", "all") to shards')] = None,
    block_dtype: Annotated[str, typer.Option(help="float32 or bfloat16 for --blocks shards")] = "float32",
    modules: Annotated[list[str] | None, typer.Option(
        "--modules", help="roles/suffixes/re:regex (repeat); default all roles")] = None,
    layers: Annotated[str, typer.Option(help='"all", "0-11", "0-3,8"')] = "all",
    out_root: Annotated[Path | None, typer.Option(
        "--out", help="root of capture directories (default ~/.cache/offcomp/captures)")] = None,
    force: Annotated[bool, typer.Option(help="recompute even if an identical capture exists")] = False,
    device: Device = "cpu",
    trust_remote_code: bool = False,
    no_verify: NoVerify = False,
    as_json: Json = False,
) -> None:
    """Capture calibration statistics (XᵀX, mean|x|, Fisher; optionally block I/O) for data-aware methods."""
    from .capture import CaptureSpec, run_capture
    from .pipeline import parse_device

    parse_device(device)
    spec = CaptureSpec(samples=samples, seq_len=seq_len, seed=seed, batch_size=batch_size, gram=gram, fisher=fisher,
                       fisher_full=fisher_full, blocks=blocks, block_dtype=block_dtype,  # type: ignore[arg-type]
                       modules=tuple(modules or ()), layers=layers)
    with rich_progress() as progress:
        res = run_capture(model, data, split, spec, root=out_root, device=device, force=force,
                          trust_remote_code=trust_remote_code, progress=progress, verify=not no_verify)
    meta = res.meta
    table = Table(title=f"capture: {model} ({'reused' if res.reused else 'computed'})")
    for col in ("data", "tokens", "modules", "statistics", "seconds"):
        table.add_column(col, overflow="fold")
    table.add_row(f"{meta['data']['name']}:{meta['data']['split']}", f"{meta['n_tokens']:,}",
                  str(len(meta["modules"])), ", ".join(meta["statistics"]) + (" + blocks" if meta["blocks"] else ""),
                  f"{meta['seconds']:.1f}")
    emit(res.to_dict(), as_json, table)
    if not as_json:
        out.print(f"use it: offcomp compress ... --stats {res.path}", highlight=False, soft_wrap=True)


Epochs = Annotated[float | None, typer.Option(help="training epochs (default: the recipe's)")]
Lr = Annotated[float | None, typer.Option("--lr", help="learning rate (default: the recipe's)")]
Batch = Annotated[int | None, typer.Option(help="per-process batch size (default: the recipe's)")]
Accum = Annotated[int | None, typer.Option(help="gradient accumulation steps (default: the recipe's)")]
MaxLen = Annotated[int | None, typer.Option(help="max sequence length (default: the recipe's)")]
Seed = Annotated[int | None, typer.Option(help="training seed (default: the recipe's)")]
MaxSteps = Annotated[int | None, typer.Option(help="stop after N optimizer steps (quick runs)")]
MaxTrain = Annotated[int | None, typer.Option(help="use only the first N training examples")]
MaxEval = Annotated[int | None, typer.Option(help="use only the first N evaluation examples")]
Freeze = Annotated[bool, typer.Option(help="freeze the compressed modules' factors during fine-tuning")]
Bf16 = Annotated[bool, typer.Option("--bf16", help="bf16 mixed precision (autocast; weights stay fp32)")]
OutDir = Annotated[Path, typer.Option("--out", help="directory for metrics + protocol JSON and trainer state")]
SaveModel = Annotated[bool, typer.Option(help="keep the fine-tuned model in OUT/model (compressed stays compressed)")]
CkptSteps = Annotated[int | None, typer.Option(
    help="Trainer checkpoint every N steps (default 500, 0: none); a re-run resumes from it")]


def _finetune_args(defaults: Any, **overrides: Any) -> Any:
    import dataclasses

    names = {"epochs": "epochs", "lr": "learning_rate", "batch_size": "batch_size", "grad_accum": "grad_accum",
             "max_length": "max_length", "seed": "seed", "max_steps": "max_steps",
             "max_train_samples": "max_train_samples", "max_eval_samples": "max_eval_samples", "bf16": "bf16",
             "checkpoint_steps": "checkpoint_steps"}
    return dataclasses.replace(defaults, **{names[k]: v for k, v in overrides.items() if v is not None})


def _metrics_table(title: str, record: dict[str, Any]) -> Table:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value")
    for k, v in (record.get("metrics") or {}).items():
        table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    return table


@app.command("finetune-glue")
@user_errors
def finetune_glue(
    task: Annotated[str, typer.Option(help="cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte or wnli")],
    model: Model = "minilm-l6",
    data_dir: Annotated[Path | None, typer.Option(help="GLUE tsv folder (e.g. ../shared/data/glue); "
                                                       "default: datasets `glue`")] = None,
    out_dir: OutDir = Path("runs/glue"),
    epochs: Epochs = None, lr: Lr = None, batch_size: Batch = None, grad_accum: Accum = None,
    max_length: MaxLen = None, seed: Seed = None, max_steps: MaxSteps = None,
    max_train_samples: MaxTrain = None, max_eval_samples: MaxEval = None,
    freeze_compressed: Freeze = False,
    bf16: Bf16 = False,
    save_model: SaveModel = False,
    checkpoint_steps: CkptSteps = None,
    teacher: Annotated[str | None, typer.Option(
        help="distil from this model fine-tuned on the task (e.g. the dense one: finetune-glue --save-model, "
             "then DIR/model)")] = None,
    distill_weight: Annotated[float | None, typer.Option(
        help="with --teacher: share of the distillation term in the loss (the task loss has the rest) "
             "[default: 0.5]")] = None,
    distill_temperature: Annotated[float | None, typer.Option(
        help="with --teacher: softmax temperature of the distilled class distributions [default: 2]")] = None,
    device: Device = "cpu",
    no_verify: NoVerify = False,
    as_json: Json = False,
) -> None:
    """Fine-tune a base or compressed encoder on a GLUE task (HF Trainer; torchrun/accelerate ready)."""
    from .eval.glue import GLUE_DEFAULTS, run_glue

    if teacher is None and (distill_weight is not None or distill_temperature is not None):
        raise OffcompError("--distill-weight/--distill-temperature shape a distillation: give its --teacher")

    args = _finetune_args(GLUE_DEFAULTS, epochs=epochs, lr=lr, batch_size=batch_size, grad_accum=grad_accum,
                          max_length=max_length, seed=seed, max_steps=max_steps,
                          max_train_samples=max_train_samples, max_eval_samples=max_eval_samples, bf16=bf16 or None,
                          checkpoint_steps=checkpoint_steps)
    with rich_progress() as progress:
        rec = run_glue(model, task, data_dir=data_dir, output_dir=out_dir, args=args,
                       freeze_compressed=freeze_compressed, device=device, progress=progress, verify=not no_verify,
                       save_model=save_model, teacher=teacher,
                       **{k: v for k, v in (("distill_weight", distill_weight),
                                            ("distill_temperature", distill_temperature)) if v is not None})
    warn_contaminated(rec)
    emit(rec, as_json, _metrics_table(f"{task}: {model}", rec))


@app.command()
@user_errors
def squad(
    model: Model = "minilm-l6",
    train_file: Annotated[Path | None, typer.Option(help="SQuAD v1.1 train json")] = None,
    dev_file: Annotated[Path | None, typer.Option(help="SQuAD v1.1 dev json")] = None,
    split_dev: Annotated[int | None, typer.Option(help="train on K dev articles, eval on the rest")] = None,
    out_dir: OutDir = Path("runs/squad"),
    epochs: Epochs = None, lr: Lr = None, batch_size: Batch = None, grad_accum: Accum = None,
    max_length: MaxLen = None, seed: Seed = None, max_steps: MaxSteps = None,
    max_train_samples: MaxTrain = None, max_eval_samples: MaxEval = None,
    doc_stride: int = 128,
    freeze_compressed: Freeze = False,
    bf16: Bf16 = False,
    save_model: SaveModel = False,
    checkpoint_steps: CkptSteps = None,
    device: Device = "cpu",
    no_verify: NoVerify = False,
    as_json: Json = False,
) -> None:
    """Fine-tune and evaluate extractive QA on SQuAD v1.1 (official EM/F1)."""
    from .eval.squad import SQUAD_DEFAULTS, run_squad

    args = _finetune_args(SQUAD_DEFAULTS, epochs=epochs, lr=lr, batch_size=batch_size, grad_accum=grad_accum,
                          max_length=max_length, seed=seed, max_steps=max_steps,
                          max_train_samples=max_train_samples, max_eval_samples=max_eval_samples, bf16=bf16 or None,
                          checkpoint_steps=checkpoint_steps)
    with rich_progress() as progress:
        rec = run_squad(model, train_file=train_file, dev_file=dev_file, split_dev=split_dev, output_dir=out_dir,
                        args=args, doc_stride=doc_stride, freeze_compressed=freeze_compressed, device=device,
                        progress=progress, verify=not no_verify, save_model=save_model)
    warn_contaminated(rec)
    emit(rec, as_json, _metrics_table(f"SQuAD v1.1: {model}", rec))


@app.command("eval-glue")
@user_errors
def eval_glue(
    task: Annotated[str, typer.Option(help="cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte or wnli")],
    model: Annotated[str, typer.Option("--model", "-m", help="a model fine-tuned on the task (finetune-glue "
                                       "--save-model: OUT/model), or its compressed copy")],
    data_dir: Annotated[Path | None, typer.Option(help="GLUE tsv folder (e.g. ../shared/data/glue); "
                                                       "default: datasets `glue`")] = None,
    out_dir: OutDir = Path("runs/glue"),
    max_length: MaxLen = None,
    batch_size: Annotated[int | None, typer.Option(help="evaluation batch size (default: the recipe's)")] = None,
    max_eval_samples: MaxEval = None,
    device: Device = "cpu",
    no_verify: NoVerify = False,
    as_json: Json = False,
) -> None:
    """Score a fine-tuned classifier's own head on a GLUE task's dev set(s), without training: what
    compressing a fine-tuned model lost."""
    import dataclasses

    from .eval.glue import GLUE_DEFAULTS, run_glue

    args = _finetune_args(GLUE_DEFAULTS, max_length=max_length, max_eval_samples=max_eval_samples)
    if batch_size is not None:
        args = dataclasses.replace(args, eval_batch_size=batch_size)
    with rich_progress() as progress:
        rec = run_glue(model, task, data_dir=data_dir, output_dir=out_dir, args=args, device=device,
                       progress=progress, verify=not no_verify, train=False)
    warn_contaminated(rec)
    emit(rec, as_json, _metrics_table(f"{task}: {model}", rec))


@app.command("eval-sts")
@user_errors
def eval_sts(
    model: Annotated[str, typer.Argument(help="sentence encoder: base name/dir or compressed directory")],
    data_dir: Annotated[Path | None, typer.Option(help="folder with STS-B dev.tsv")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="where to write the record")] = None,
    batch_size: int = 64,
    max_eval_samples: MaxEval = None,
    device: Device = "cpu",
    no_verify: NoVerify = False,
    as_json: Json = False,
) -> None:
    """Zero-shot STS-B: mean-pooled embeddings, cosine similarity, Spearman vs gold scores."""
    from .eval.sts import run_sts

    with rich_progress() as progress:
        rec = run_sts(model, data_dir=data_dir, output_dir=out_dir, batch_size=batch_size,
                      max_eval_samples=max_eval_samples, device=device, progress=progress, verify=not no_verify)
    warn_contaminated(rec)
    emit(rec, as_json, _metrics_table(f"STS-B zero-shot: {model}", rec))


if __name__ == "__main__":
    app()
