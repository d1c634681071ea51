"""The `llm-mitm` command (also `python -m llm_mitm`)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import orjson

from llm_mitm.arguments import count_of, port_number, proxy_host
from llm_mitm.atomic import atomic_output
from llm_mitm.environment import DEFAULT_NO_PROXY, SHELLS, UnsafeValue, client_environment, prepare_bundle, render
from llm_mitm.tracefile import ReadReport, printable, read_traces, with_rotated
from llm_mitm.trust import DEFAULT_CONFDIR, TrustError
from llm_mitm.writer import FILE_MODE

if TYPE_CHECKING:  # imported where used: the env command stays light
    from llm_mitm.redact import Redactor


class CommandError(Exception):
    """A command that cannot go on: one line on stderr, exit code 2."""


def _records(args: argparse.Namespace, report: ReadReport) -> Iterator[dict[str, Any]]:
    if not args.traces.exists():
        raise CommandError(f"no trace file or traces.directory at {args.traces}")
    return _read(read_traces(args.traces, report), args.traces)


def _read(records: Iterator[dict[str, Any]], traces: Path) -> Iterator[dict[str, Any]]:
    """The records, a file that cannot be read said as such: an OSError in the output's
    block is taken for the output's (`_output`), and stats had none (a traceback)."""
    try:
        yield from records
    except OSError as exc:  # the reading's own: what is done with a record is not raised here
        raise CommandError(f"cannot read {exc.filename or traces}: {exc.strerror or exc}") from None


@contextmanager
def _output(args: argparse.Namespace) -> Iterator[BinaryIO]:
    """The output file, written whole or not at all, and never the trace file being read."""
    read = [args.traces] if args.traces.is_dir() else with_rotated(args.traces)
    if args.output.exists() and any(os.path.samefile(args.output, file) for file in read if file.exists()):
        raise CommandError(f"the output {args.output} is a trace file being read: name another file with -o")
    if args.traces.is_dir() and _inside(args.output, args.traces):
        raise CommandError(f"the output {args.output} is inside the traces directory {args.traces} being read: name another file with -o")
    try:
        with atomic_output(args.output, FILE_MODE) as handle:  # a new file: for its owner only, as the traces it is made of
            yield handle
    except OSError as exc:
        raise CommandError(f"cannot write {args.output}: {exc.strerror or exc}") from None


def _inside(path: Path, directory: Path) -> bool:
    """A traces.directory's record, or a file that would join them: each of its `*.json`
    files is a record read (one written over was lost). Found through links, by identity."""
    return any(folder.exists() and os.path.samefile(folder, directory) for folder in Path(os.path.realpath(path)).parents)


def _problems(command: str, report: ReadReport) -> None:
    for problem in report.problems():
        print(f"llm-mitm {command}: {problem}", file=sys.stderr)


def _stats(args: argparse.Namespace) -> int:
    from llm_mitm.tracestats import aggregate, render_table

    report = ReadReport()
    groups, total = aggregate(_records(args, report), args.by)
    if args.json:
        rows = {name: group.row() for name, group in groups.items()}
        print(orjson.dumps({"by": args.by, "groups": rows, "total": total.row()}, option=orjson.OPT_INDENT_2).decode())
    else:
        print(render_table(groups, total, args.by))
    _problems("stats", report)
    return 0


def _report(args: argparse.Namespace) -> int:
    from llm_mitm.report import collect, render

    report = ReadReport()
    records = _records(args, report)
    redactor = _redactor(args)
    with _output(args) as out:
        data = collect(records, args.max_calls, redactor)
        out.write(render(data, f"llm-mitm report: {args.traces.name}").encode())
    print(f"wrote {args.output} ({data.calls_total} calls)", file=sys.stderr)
    _problems("report", report)
    return 0


def _export(args: argparse.Namespace) -> int:
    from llm_mitm.export import ExportReport, export_examples

    report, read = ExportReport(), ReadReport()
    records = _records(args, read)
    redactor = _redactor(args)
    with _output(args) as out:
        for example in export_examples(records, args.model, report, redactor):
            out.write(orjson.dumps(example, option=orjson.OPT_APPEND_NEWLINE))
    print(f"llm-mitm export: {printable(report.summary())} -> {args.output}", file=sys.stderr)
    _problems("export", read)
    return 0


def _redactor(args: argparse.Namespace) -> Redactor:
    """Redaction as the proxy's config sets it (`--config`, else ./config.yaml where there is
    one): what a tool puts together from a trace (a message's parts joined) is looked at
    again with the patterns the config adds, else a secret of the config's own shape cut
    across two parts was whole in a report or an export."""
    from llm_mitm.config import ConfigError, default_config, load_config, resolve_config_path
    from llm_mitm.redact import Redactor

    path = resolve_config_path(args.config or "")
    try:
        config = load_config(path) if path is not None else default_config()
    except ConfigError as exc:
        raise CommandError(f"{exc} (read for its redaction settings; name the proxy's config with --config)") from None
    return Redactor(**config.redaction.redactor_options())


def _env(args: argparse.Namespace) -> int:
    try:
        bundle = prepare_bundle(args.confdir, args.bundle)
        lines = render(client_environment(f"http://{args.host}:{args.port}", bundle, args.no_proxy), args.shell)
    except (TrustError, UnsafeValue) as exc:
        raise CommandError(str(exc)) from None
    print(lines)
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="llm-mitm", description="llm-mitm tools")
    commands = root.add_subparsers(dest="command", required=True)
    env = commands.add_parser("env", help="print the environment a client needs for this proxy")
    env.add_argument("--shell", choices=SHELLS, default="bash")
    env.add_argument("--host", type=proxy_host, default="127.0.0.1", help="the proxy's host name or address (default 127.0.0.1)")
    env.add_argument("--port", type=port_number, default=8080)
    env.add_argument("--confdir", type=Path, default=DEFAULT_CONFDIR, help="mitmproxy's confdir (default ~/.mitmproxy)")
    env.add_argument("--bundle", type=Path, help="where to write certifi + the CA (default CONFDIR/llm-mitm-bundle.pem)")
    env.add_argument("--no-proxy", default=DEFAULT_NO_PROXY, help=f"NO_PROXY (default {DEFAULT_NO_PROXY})")
    env.set_defaults(run=_env)

    from llm_mitm.tracestats import GROUPINGS

    stats = commands.add_parser("stats", help="requests, errors, tokens, cost and latency from a trace file")
    stats.add_argument("traces", type=Path, help="a trace file (traces.destination) or a traces.directory")
    stats.add_argument("--by", choices=GROUPINGS, default="model")
    stats.add_argument("--json", action="store_true", help="JSON instead of a table")
    stats.set_defaults(run=_stats)

    report = commands.add_parser("report", help="a self-contained HTML report of a trace file")
    report.add_argument("traces", type=Path, help="a trace file (traces.destination) or a traces.directory")
    report.add_argument("-o", "--output", type=Path, default=Path("report.html"))
    report.add_argument("--max-calls", type=count_of, default=2000, help="calls listed in the table (the latest)")
    report.add_argument("--config", help="the proxy's config, for its redaction patterns (default: ./config.yaml where there is one)")
    report.set_defaults(run=_report)

    export = commands.add_parser("export", help="fine-tuning data from a trace file")
    export.add_argument("traces", type=Path, help="a trace file (traces.destination) or a traces.directory")
    export.add_argument("--format", choices=("openai-chat",), default="openai-chat")
    export.add_argument("-o", "--output", type=Path, required=True)
    export.add_argument("--model", help="only calls to models matching this glob")
    export.add_argument("--config", help="the proxy's config, for its redaction patterns (default: ./config.yaml where there is one)")
    export.set_defaults(run=_export)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.run(args))
    except CommandError as exc:
        print(f"llm-mitm {args.command}: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `llm-mitm stats ... | head`: the reader left, which is fine
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
