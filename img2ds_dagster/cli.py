"""The ``img2ds`` command.

``img2ds download --url_list=urls.txt --output_folder=out ...`` takes img2dataset's flags, with values
written the way img2dataset's command line (python-fire) reads them: ``True``/``False``, ``None``,
``inf``, and lists as ``'["noai","noindex"]'``, ``'[]'`` or ``noai,noindex``.
``img2ds demo`` downloads the bundled sample images from a local server through the Dagster assets.
``img2ds stage PATH...`` registers URL files as ``url_tables`` partitions of the Dagster instance at
$DAGSTER_HOME and stages them, so that ``dagster asset materialize`` works on their shards.
``img2ds export-buckets OUTPUT_FOLDER DEST`` regroups a bucket-mode output folder into the bucketed
export (``export.py``).
"""

from __future__ import annotations

import argparse
import ast
import difflib
import gc
import inspect
import logging
import sys
import traceback
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from .api import download
from .demo import run_demo
from .engine import progress
from .errors import ConfigError, ExportError, InputTableError, ShardError


def parse_value(text: str, annotation: Any) -> Any:
    """A flag's text as the type ``download()`` declares for it."""
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    if type(None) in options and text in ("None", "none", "null"):
        return None
    kind = next(o for o in options if o is not type(None))
    if kind is bool:
        lowered = text.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ValueError(f"expected True or False, got {text!r}")
    if kind is int:
        return int(text)
    if kind is float:
        return float(text)
    if typing.get_origin(kind) is list:
        stripped = text.strip()
        if stripped.startswith("["):
            value = ast.literal_eval(stripped)
            if not isinstance(value, list):
                raise ValueError(f"expected a list, got {text!r}")
            return [str(v) for v in value]
        return [part.strip() for part in stripped.split(",") if part.strip()]
    return text


class _ShortErrors(argparse.ArgumentParser):
    """Errors in one line: download()'s usage line lists every option, far too long to repeat."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} ({self.prog} --help lists the options)\n")


def _parser_for(function: Callable[..., Any], name: str, description: str) -> argparse.ArgumentParser:
    parser = _ShortErrors(prog=f"img2ds {name}", description=description)
    hints = typing.get_type_hints(function)
    for param in inspect.signature(function).parameters.values():
        annotation = hints[param.name]
        required = param.default is inspect.Parameter.empty
        if param.name == "url_list":
            # img2dataset also takes the URL list as the first positional argument.
            parser.add_argument("url_list_positional", nargs="?", metavar="URL_LIST")
            required = False
        parser.add_argument(
            f"--{param.name}",
            required=required,
            # A bare boolean flag means True, as with python-fire.
            nargs="?" if annotation is bool else None,
            const="True" if annotation is bool else None,
            default=argparse.SUPPRESS,
            help=None if required else f"default: {param.default!r}",
        )
    return parser


def _unknown_options(unknown: Sequence[str], options: Sequence[str]) -> str:
    """The error for flags download() does not take, with the nearest option's name for a typo."""
    problems = []
    for arg in unknown:
        name = arg.lstrip("-").split("=", 1)[0]
        if not arg.startswith("--"):
            problems.append(f"unexpected argument {arg!r}")
            continue
        near = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
        problems.append(f"unknown option --{name}" + (f" (did you mean --{near[0]}?)" if near else ""))
    return "; ".join(problems)


def _run_download(argv: Sequence[str]) -> int:
    parser = _parser_for(download, "download", "Download images from URL lists into a dataset.")
    parser.add_argument("--verbose", action="store_true", help="print the traceback of an error")
    known, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(_unknown_options(unknown, list(inspect.signature(download).parameters)))
    args = vars(known)
    verbose = args.pop("verbose")
    positional = args.pop("url_list_positional", None)
    if positional is not None:
        args.setdefault("url_list", positional)
    if "url_list" not in args:
        parser.error("the URL list is required (--url_list=FILE_OR_FOLDER)")
    hints = typing.get_type_hints(download)
    try:
        kwargs = {name: parse_value(text, hints[name]) for name, text in args.items()}
    except (ValueError, SyntaxError) as err:
        parser.error(str(err))
    bar = progress.Bar(sys.stderr, live=sys.stderr.isatty())
    try:
        with progress.listening(bar):
            report = download(**kwargs)
    except (ConfigError, InputTableError, ShardError) as err:
        if verbose:
            traceback.print_exc()
        print(f"img2ds: {err}", file=sys.stderr)
        return 1 if isinstance(err, ShardError) else 2
    finally:
        bar.close()
    totals = report.totals
    print(
        f"{report.output_folder}: {totals['successes']} of {totals['count']} images in "
        f"{report.shards_total} shards ({len(report.shards_skipped)} already done); "
        f"{totals['failed_to_download']} failed to download, {totals['failed_to_resize']} failed to resize; "
        f"stats in {report.stats_file}"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Dagster's storage migrations log at INFO on every new instance; they are not news to a user.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    commands = {
        "download": _run_download,
        "stage": _run_stage,
        "export-buckets": _run_export,
        "preview": _run_preview,
        "demo": _run_demo,
    }
    if not argv or argv[0] not in commands:
        print(
            f"usage: img2ds {{{','.join(commands)}}} [options]   (img2ds <command> --help)",
            file=sys.stderr,
        )
        return 2
    return commands[argv[0]](argv[1:])


def run() -> NoReturn:
    """The console script: ``main()``, then the process ends. Frozen objects are left out of the
    interpreter's last garbage collection, which otherwise walks the ~150k objects Dagster and its
    libraries create, 0.3-0.6 s of exit time on every command. (Not in ``main()``: a process that
    calls it, a test for one, goes on living.)"""
    status = main()
    gc.freeze()
    sys.exit(status)


def _run_demo(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="img2ds demo", description=run_demo.__doc__)
    parser.parse_args(argv)
    return run_demo()


def _run_stage(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="img2ds stage",
        description="Register URL files as url_tables partitions in the Dagster instance at "
        "$DAGSTER_HOME and stage them (their settings come from img2ds.toml and <name>.img2ds.toml "
        "beside them, as in the inbox). Then `dagster asset materialize` works for the table, its "
        "shards and the stats.",
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="URL files: local paths or fsspec URLs")
    parser.add_argument("--name", help="the partition key (default: the file name without its extension)")
    parser.add_argument(
        "--no-stage", dest="stage", action="store_false", help="only register the partition(s)"
    )
    args = parser.parse_args(argv)
    if args.name and len(args.paths) > 1:
        parser.error("--name names one file; give one PATH with it")
    from .staging import stage_files  # noqa: PLC0415 - imports Dagster and the code location

    try:
        for line in stage_files(args.paths, args.name, args.stage):
            print(line)
    except (ConfigError, InputTableError) as err:
        print(f"img2ds: {err}", file=sys.stderr)
        return 2
    return 0


def _run_preview(argv: Sequence[str]) -> int:
    from .preview import default_destination, write_preview  # noqa: PLC0415 - only this command needs it

    parser = argparse.ArgumentParser(
        prog="img2ds preview",
        description="Write a static HTML page with a sample of each shard: thumbnails with their "
        "captions, and failed rows with their status and error.",
    )
    parser.add_argument("output_folder", metavar="OUTPUT_FOLDER")
    parser.add_argument("--out", help="the HTML file (default: OUTPUT_FOLDER/preview.html)")
    parser.add_argument("--per_shard", type=int, default=16, help="samples per shard; default: 16")
    args = parser.parse_args(argv)
    destination = args.out or default_destination(args.output_folder)
    try:
        shards, samples = write_preview(args.output_folder, destination, args.per_shard)
    except ExportError as err:
        print(f"img2ds: {err}", file=sys.stderr)
        return 2
    print(f"{destination}: {samples} samples of {shards} shards")
    return 0


def _run_export(argv: Sequence[str]) -> int:
    from .export import export_buckets  # noqa: PLC0415 - only this command needs it

    parser = argparse.ArgumentParser(prog="img2ds export-buckets", description=export_buckets.__doc__)
    parser.add_argument("output_folder", metavar="OUTPUT_FOLDER", help="a download's output folder")
    parser.add_argument("destination", metavar="DEST", help="where the export goes (any fsspec URL)")
    parser.add_argument("--samples_per_tar", type=int, default=1000, help="default: 1000")
    parser.add_argument(
        "--dedup",
        type=lambda text: parse_value(text, bool),
        default=True,
        help="drop samples whose source bytes came before (by their sha256); default: True",
    )
    args = parser.parse_args(argv)
    try:
        report = export_buckets(args.output_folder, args.destination, args.samples_per_tar, args.dedup)
    except ExportError as err:
        print(f"img2ds: {err}", file=sys.stderr)
        return 2
    totals = report.manifest["totals"]
    print(
        f"{report.destination}: {totals['samples']} samples in {totals['buckets']} buckets, "
        f"{totals['tars']} tars ({report.tars_written} written, {report.tars_kept} kept); "
        f"{totals['duplicates_removed']} duplicates removed; manifest.json in {report.destination}"
    )
    return 0


if __name__ == "__main__":
    run()
