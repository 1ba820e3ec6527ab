"""The flatd commands: parse, call, print. Heavy modules are imported by each command."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from flatd.errors import FlatdError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(FlatdError):
    """A mistake in the command line or the rules file: exit 2."""


# ---------------------------------------------------------------------- parsers


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", type=Path, metavar="F",
                   help="rules file (default: $FLATD_CONFIG, ~/.config/flatd/flatd.yaml, /etc/flatd/flatd.yaml)")


def _add_logging(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-format", choices=("plain", "plain-time", "json"), default="plain", help="log line format")
    p.add_argument("--verbose", action="store_true", help="more log lines")


def build_parser() -> argparse.ArgumentParser:
    from flatd import __version__

    parser = argparse.ArgumentParser(
        prog="flatd", description="Master flats from each night's flat frames, with nobody at the keyboard.")
    parser.add_argument("-V", "--version", action="version", version=f"flatd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("run-once", help="scan the capture folders now, combine and move, then exit")
    _add_config(p)
    _add_logging(p)
    p.add_argument("--dry-run", action="store_true", help="say what would be done and why; change nothing")
    p.add_argument("--no-wait", action="store_true",
                   help="take complete files at once, without waiting until they are unchanged for `stable`")
    _add_engine(p)

    p = sub.add_parser("watch", help="the service: watch the capture folders and process each settled session")
    _add_config(p)
    _add_logging(p)

    p = sub.add_parser("status", help="flats waiting, last masters made, failed groups")
    _add_config(p)
    p.add_argument("--state", type=Path, help="state folder (default: from the rules file)")

    p = sub.add_parser("retry", help="put failed jobs back to be tried again",
                       description="Put failed jobs back to be tried again. Takes the state lock: while a "
                                   "flatd service holds it, retry refuses and exits 2 (stop the service or "
                                   "wait). Exits 1 when JOB names no failed job.")
    _add_config(p)
    p.add_argument("job", nargs="?", help="job id (or its first characters); all failed jobs if omitted")

    p = sub.add_parser("inspect", help="table of FITS files: kind, size, binning, filter, exposure, temperature")
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    p.add_argument("--adu", action="store_true", help="also read the pixels and show each file's mean ADU "
                   "(and of its R, G and B pixels for colour sensors)")
    p.add_argument("--sort", default="path", help="sort by path, kind, size, binning, filter, exposure, temperature, date, adu")
    p.add_argument("--no-recursive", dest="recursive", action="store_false", help="do not look into sub-folders")

    p = sub.add_parser("qc", help="check flats and master flats now: figures and verdicts; changes nothing")
    p.add_argument("files", nargs="+", type=Path, metavar="FILES")
    p.add_argument("--against", type=Path, metavar="PREVIOUS", help="compare each master with this previous master")
    p.add_argument("--pictures", type=Path, metavar="DIR", help="write the masters' previews into DIR")
    _add_config(p)

    p = sub.add_parser("demo", help="write a demo capture session and calibration library")
    p.add_argument("dir", type=Path, metavar="DIR")
    p.add_argument("--seed", type=int, default=2026)

    p = sub.add_parser("config", help="rules-file tools")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION")
    csub.required = True
    c = csub.add_parser("check", help="validate a rules file; print every error with its key and line")
    c.add_argument("file", nargs="?", type=Path, metavar="F")
    c = csub.add_parser("show", help="print the rules in force as YAML: defaults included, relative paths resolved")
    c.add_argument("file", nargs="?", type=Path, metavar="F")

    p = sub.add_parser("engine", help="the stacking engine")
    esub = p.add_subparsers(dest="engine_command", metavar="ACTION")
    esub.required = True
    c = esub.add_parser("check", help="connect to the Dask cluster: its workers, their flatd version, the paths they see")
    _add_config(c)
    _add_engine(c)

    _add_combine_parser(sub)
    return parser


def _add_engine(p) -> None:
    p.add_argument("--engine", metavar="ENGINE", help=(
        "local, dask (engine.address of the rules file) or a scheduler address (tcp://host:8786); "
        "overrides the rules file's engine.kind"))


def with_engine(rules, value: Optional[str]):
    """The rules with `--engine` in force: local, dask, or a Dask scheduler address."""
    if not value:
        return rules
    engine = rules.engine.model_dump()
    if value in ("local", "dask"):
        engine["kind"] = value
    elif "://" in value:
        engine.update(kind="dask", address=value)
    else:
        raise UsageError(f"--engine {value!r}: local, dask or a scheduler address such as tcp://host:8786")
    from pydantic import ValidationError

    from flatd.config import Engine

    try:
        return rules.model_copy(update={"engine": Engine.model_validate(engine)})
    except ValidationError as exc:
        raise UsageError("--engine: " + "; ".join(e["msg"] for e in exc.errors())) from None


def _add_combine_parser(sub) -> None:
    p = sub.add_parser(
        "combine", help="combine FILES into master flats (the original program's command line)",
        description="Combine flat frames into a master flat. Options not given come from the rules file "
                    "(--config), then from built-in defaults.")
    p.add_argument("files", nargs="+", type=Path, metavar="FILES")
    pre = p.add_argument_group("precalibration")
    pre.add_argument("-rp", "--noprca", action="store_true", help="no precalibration of input files")
    pre.add_argument("-p", "--pedestal", type=float, metavar="<pedestal value>", help="subtract a pedestal value")
    pre.add_argument("-b", "--bias", type=Path, metavar="<Bias FITS file>", help="subtract this dark or bias file")
    pre.add_argument("-a", "--auto", type=Path, metavar="<auto bias directory>",
                     help="select the best dark or bias for each flat from this directory")
    pre.add_argument("-ar", "--autorecursive", action="store_true", help="search sub-folders of the auto directory")
    pre.add_argument("-ab", "--autobias", action="store_true", help="consider only files typed bias or dark")
    pre.add_argument("-ax", "--autodisplay", action="store_true", help="show each automatic calibration choice")
    pre.add_argument("--policy", choices=("original", "exposure-match"), help="how the auto choice is scored")
    meth = p.add_argument_group("combine method")
    _add_method_options(meth.add_mutually_exclusive_group())
    meth.add_argument("--param", action="append", metavar="NAME=VALUE",
                      help="a parameter of the method, e.g. --method sigma --param sigma=2.5 (repeatable)")
    _add_param_options(meth)
    p.add_argument("--normalize", choices=("none", "multiplicative"), help="scale flats to a common level before rejecting")
    grp = p.add_argument_group("grouping")
    grp.add_argument("-gs", "--groupsize", action="store_true", help="group by size (dimensions and binning)")
    grp.add_argument("-gf", "--groupfilter", action="store_true", help="group by filter name")
    grp.add_argument("-gt", "--grouptemperature", type=float, metavar="<bandwidth>", help="group by temperature (bandwidth 0.1-50)")
    grp.add_argument("-mg", "--minimumgroup", type=int, metavar="<minimum group size>", help="skip groups smaller than this")
    out = p.add_argument_group("output")
    out.add_argument("-od", "--outputdirectory", type=Path, metavar="<output directory>", help="folder for grouped masters")
    out.add_argument("-o", "--output", type=Path, metavar="<output path>", help="master file (%%d date, %%t time)")
    out.add_argument("-v", "--moveinputs", metavar="<directory>", help="after success move the inputs to this folder")
    p.add_argument("-t", "--ignoretype", action="store_true", help="take every file as a flat, whatever its type")
    p.add_argument("--memory-limit", metavar="SIZE", help="memory for the stack, e.g. 512MiB, 2GB")
    _add_engine(p)
    p.add_argument("--dry-run", action="store_true", help="say what would be done; change nothing")
    _add_config(p)
    _add_logging(p)


def _add_method_options(group) -> None:
    """The options the registry's methods declare (-m, -n, -mm N, -s Z), and --method NAME."""
    from flatd.stack import methods

    for entry in methods.entries():
        if not entry.flags:
            continue
        param = entry.param(entry.flag_param) if entry.flag_param else None
        kind = {"action": "store_true"} if param is None else {"type": param.kind, "metavar": param.metavar}
        group.add_argument(*entry.flags, dest=_method_dest(entry.name), help=entry.summary, **kind)
    group.add_argument("--method", choices=("auto",) + methods.names(), metavar="NAME",
                       help=f"combine method by name: auto (chosen from each group's number of frames), "
                            f"{', '.join(methods.names())}")


def _add_param_options(group) -> None:
    """The options that set a parameter of whichever method is chosen (--low X, --high X)."""
    from flatd.stack import methods

    for p in methods.parameters().values():
        if p.option:
            group.add_argument(p.option, dest=_option_dest(p.name), metavar=p.metavar,
                               help=f"{p.description.split(';')[0]} of the chosen method (its own default if not given)")


def _option_dest(name: str) -> str:
    return "param_" + name.replace("-", "_")


def _method_dest(name: str) -> str:
    return "method_" + name.replace("-", "_")


def _method_choice(args, configured: str) -> dict:
    """The combine method and parameters the command line gives (`configured`: the rules file's method)."""
    from flatd.stack import methods

    chosen: dict = {}
    for entry in methods.entries():
        value = getattr(args, _method_dest(entry.name), None)
        if value is not None and value is not False:
            chosen = {"method": entry.name, **({entry.flag_param: value} if entry.flag_param else {})}
    if args.method:
        chosen = {"method": args.method}
    for p in methods.parameters().values():  # --low X, --high X: a parameter of the chosen method
        text = getattr(args, _option_dest(p.name), None) if p.option else None
        if text is None:
            continue
        name = chosen.get("method", configured)
        own = methods.get(name).param(p.name) if name in methods.names() else p  # auto: the shared key
        if own is None:
            raise UsageError(f"{p.option} {text}: the method {name} has no parameter {p.name} "
                             f"(methods that have: {', '.join(e.name for e in methods.entries() if e.param(p.name))})")
        try:
            chosen[p.name] = own.validate(text)
        except ValueError as exc:
            raise UsageError(f"{p.option} {text}: {exc}") from None
    if chosen.get("method", configured) == "auto":  # resolved per group at planning
        if args.param:
            raise UsageError(f"--param {args.param[0]!r}: the method is auto (chosen per group); "
                             "name one with --method NAME to give its parameters")
        return chosen
    entry = methods.get(chosen.get("method", configured))
    for item in args.param or []:
        name, sep, text = item.partition("=")
        param = entry.param(name.strip())
        if param is None or not sep:
            own = ", ".join(p.name for p in entry.params) or "none"
            raise UsageError(f"--param {item!r}: give NAME=VALUE, NAME a parameter of {entry.name} ({own})")
        if param.name in chosen:
            raise UsageError(f"--param {item!r}: {param.name} is given twice")
        try:
            chosen[param.name] = param.validate(text)
        except ValueError as exc:
            raise UsageError(f"--param {item!r}: {exc}") from None
    return chosen


# ---------------------------------------------------------------------- helpers


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True)


def _load_rules(path: Optional[Path], required: bool = True, writes_state: bool = True):
    from flatd.config import ConfigError, find_config, load_rules

    found = find_config(path)
    if found is None and required:
        raise UsageError("no rules file: give --config F, set FLATD_CONFIG, or create ~/.config/flatd/flatd.yaml")
    if found is not None and not found.exists():
        raise UsageError(f"rules file {found} does not exist")
    try:
        rules = load_rules(found)
    except ConfigError as exc:
        raise UsageError(exc.render()) from None
    if required:  # the commands that keep a ledger: run-once (dry run too), watch, status, retry
        problem = state_problem(rules.state, write=writes_state)
        if problem:
            raise UsageError(f"{found or '<built-in rules>'}: {problem}")
    return rules


NO_CAPTURE = "the rules file names no capture folder (capture: [- path: ...])"


def state_problem(state: Path, write: bool = True) -> Optional[str]:
    """Why the `state` folder cannot hold the ledger and the lock (None: it can).

    It is usable when it is a writable folder, or when its nearest existing parent is
    one (the folder is made at the first run)."""
    import stat

    for probe in (state, *state.parents):
        try:
            st = os.stat(probe)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except (OSError, ValueError) as exc:
            return f"at 'state': {state}: not a usable path ({getattr(exc, 'strerror', None) or exc})"
        if not stat.S_ISDIR(st.st_mode):
            what = "is a file, not a folder" if probe == state else f"cannot be made: {probe} is a file"
            return f"at 'state': {state} {what}"
        if write and not os.access(probe, os.W_OK):
            where = "is" if probe == state else f"cannot be made: {probe} is"
            return f"at 'state': {state} {where} not writable"
        return None
    return f"at 'state': {state}: no existing folder above it"


def _progress_factory():
    """A rich progress bar per job on a terminal; nothing otherwise (log lines suffice)."""
    if not sys.stderr.isatty():
        return None
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    def factory(label: str, total: int):
        progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                            TimeElapsedColumn(), console=_console(stderr=True), transient=True)
        from rich.markup import escape

        from flatd.log import printable

        task = progress.add_task(escape(printable(label)), total=total)  # a FILTER of "[/x]" is no markup
        progress.start()

        def update(done: int, total_rows: int) -> None:
            progress.update(task, completed=done, total=total_rows)
            if done >= total_rows:
                progress.stop()

        return update

    return factory


# ---------------------------------------------------------------------- commands


def cmd_config_check(args) -> int:
    from flatd.config import ConfigError, find_config, load_rules

    path = find_config(args.file)
    if path is None:
        raise UsageError("no rules file to check: give F, or set FLATD_CONFIG")
    if not path.exists():
        raise UsageError(f"rules file {path} does not exist")
    try:
        rules = load_rules(path)
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        print(f"{path}: {len(exc.problems)} error(s)", file=sys.stderr)
        return EXIT_USAGE
    problems = _run_problems(rules)
    if problems:
        for problem in problems:
            print(f"{path}: {problem}", file=sys.stderr)
        return EXIT_USAGE
    print(f"{path}: valid ({len(rules.capture)} capture folder(s), {len(rules.rules)} rule(s))")
    for warning in _missing_paths(rules):
        print(f"{path}: warning: {warning}", file=sys.stderr)
    return EXIT_OK


def cmd_config_show(args) -> int:
    """The effective rules as YAML (a valid rules file itself), or the errors as `check` prints them."""
    import yaml

    from flatd.config import ConfigError, Rules, find_config, load_rules
    from flatd.log import printable

    path = find_config(args.file)
    if path is not None and not path.exists():
        raise UsageError(f"rules file {path} does not exist")
    try:
        rules = load_rules(path) if path is not None else Rules()
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return EXIT_USAGE
    source = printable(str(path)) if path is not None else "no rules file: the built-in defaults"
    print(f"# flatd config show: {source}")
    print("# every key, defaults included; durations in seconds, sizes in bytes")
    print(yaml.safe_dump(rules.model_dump(mode="json"), sort_keys=False, allow_unicode=True), end="")
    return EXIT_OK


def _run_problems(rules) -> list[str]:
    """What would stop run-once and watch with valid rules: no capture folder, an unusable state folder."""
    problems = [] if rules.capture else [NO_CAPTURE]
    state = state_problem(rules.state)
    return problems + ([state] if state else [])


def _missing_paths(rules) -> list[str]:
    """Folders and files the rules name that are not there now (a share may be unmounted)."""
    warnings = [f"capture folder {c.path} does not exist" for c in rules.capture if not c.path.is_dir()]
    pre = rules.precalibration
    if pre.mode == "auto" and pre.library is not None and not pre.library.is_dir():
        warnings.append(f"calibration library {pre.library} does not exist")
    if pre.mode == "file" and pre.file is not None and not pre.file.is_file():
        warnings.append(f"calibration file {pre.file} does not exist")
    return warnings


def cmd_inspect(args) -> int:
    from flatd.inspect import SORT_KEYS, inspect_paths, render_table

    if args.sort not in SORT_KEYS:
        raise UsageError(f"--sort takes one of: {', '.join(SORT_KEYS)}")
    rows = inspect_paths(args.paths, adu=args.adu, sort=args.sort, recursive=args.recursive)
    render_table(rows, _console(), adu=args.adu)
    missing = [p for p in args.paths if not os.path.lexists(p)]
    return EXIT_FAILED if missing else EXIT_OK


def cmd_qc(args) -> int:
    from flatd.qc.command import QcUsage, run_qc

    rules = _load_rules(args.config, required=False)
    try:
        console = _console()
        if not console.is_terminal:  # into a file or a pipe, table rows stay whole
            console.width = max(console.width, 200)
        return run_qc(args.files, rules, console, args.against, args.pictures)
    except QcUsage as exc:
        raise UsageError(str(exc)) from None


def cmd_demo(args) -> int:
    from flatd.demo import write_demo

    try:
        session = write_demo(args.dir, seed=args.seed)
    except FileExistsError:
        raise UsageError(f"{args.dir} exists and is not empty; name a new folder") from None
    print(f"demo session written to {session.root}")
    print(f"  capture folder:      {session.captures}")
    print(f"  calibration library: {session.calibration}")
    print(f"  rules file:          {session.config}")
    print(f"next: flatd run-once --config {session.config}")
    return EXIT_OK


def _one_shot_output(args, report_wins: bool = False) -> bool:
    """Set up the log for a one-shot command; True when it prints its report.

    Each destination gets every event once. stdout and stderr apart (or a terminal):
    the report on stdout, log lines on stderr (muted on a terminal). Both in one file
    (`>> run-once.log 2>&1`): timestamped log lines ending with a `batch_done` summary,
    no report; a dry run, which logs nothing it would do, prints the report alone (as
    does `combine`: `report_wins`).
    """
    from flatd.log import is_terminal, same_destination, setup_logging

    together = same_destination(sys.stdout, sys.stderr) and not is_terminal(sys.stdout)
    report = not together or args.dry_run or report_wins
    # Log lines are muted on a terminal only when the report goes to that terminal too
    # (`flatd run-once > f` at a terminal: the screen still gets every event, errors included).
    setup_logging(args.log_format, args.verbose, quiet_on_terminal=is_terminal(sys.stdout),
                  quiet=together and report)
    return report


def cmd_run_once(args) -> int:
    report_here = _one_shot_output(args)
    rules = with_engine(_load_rules(args.config), args.engine)
    if not rules.capture:
        raise UsageError("the rules file names no capture folder (capture: [- path: ...])")
    from flatd.runonce import run_once

    say = (lambda text: print(f"flatd: {text}", file=sys.stderr, flush=True)) if sys.stderr.isatty() else None
    report = run_once(rules, dry_run=args.dry_run, progress=_progress_factory(), wait=not args.no_wait, say=say)
    if report_here:
        print_report(report, dry_run=args.dry_run)
    return report.exit_code


def cmd_watch(args) -> int:
    from flatd.log import setup_logging

    setup_logging(args.log_format, args.verbose)
    config_path = args.config
    rules = _load_rules(config_path)
    if not rules.capture:
        raise UsageError("the rules file names no capture folder (capture: [- path: ...])")
    from flatd.config import find_config
    from flatd.service import Service
    from flatd.web.server import WebError

    try:
        return Service(find_config(config_path), rules).run()
    except WebError as exc:  # the endpoint cannot listen: restarting would not help
        raise UsageError(str(exc)) from None


def cmd_status(args) -> int:
    from flatd.status import print_status

    state = args.state
    rules = None
    if state is None:
        rules = _load_rules(args.config, writes_state=False)
        state = rules.state
    else:
        problem = state_problem(state, write=False)
        if problem:  # a file is no state folder; a folder not made yet is (no ledger yet)
            raise UsageError(problem.replace("at 'state': ", "--state: ", 1))
        if args.config:
            rules = _load_rules(args.config)
    return print_status(state, rules, _console())


def cmd_retry(args) -> int:
    """Under the state lock: a running service would not see the change in time."""
    from flatd.ledger import Ledger, LedgerLocked, StateLock
    from flatd.status import service_pid

    rules = _load_rules(args.config)
    try:
        lock = StateLock(rules.state).acquire()
    except LedgerLocked:
        pid, _ = service_pid(rules.state)
        print(f"flatd: a flatd service (pid {pid if pid is not None else '?'}) holds the state lock of "
              f"{rules.state}; stop it or wait", file=sys.stderr)
        return EXIT_USAGE
    try:
        ledger = Ledger.open(rules.state)
        try:
            if args.job is not None and (not args.job or not ledger.jobs_like(args.job)):
                from flatd.log import printable

                print(f"flatd: no job {printable(args.job) or repr(args.job)} in the ledger", file=sys.stderr)
                return EXIT_FAILED
            count = ledger.retry(args.job)
        finally:
            ledger.close()
    finally:
        lock.release()
    print(f"{count} failed job(s) put back; they are planned again on the next run")
    return EXIT_OK if count or args.job is None else EXIT_FAILED


def _combine_rules(args):
    """The rules for `flatd combine`: command line, then --config, then defaults."""
    from flatd.config import Rules, parse_size

    rules = _load_rules(args.config, required=False) if args.config else Rules()
    pre = rules.precalibration.model_dump()
    if args.noprca:
        pre["mode"] = "none"
    elif args.pedestal is not None:
        pre.update(mode="pedestal", pedestal=args.pedestal)
    elif args.bias is not None:
        pre.update(mode="file", file=args.bias)
    elif args.auto is not None:
        pre.update(mode="auto", library=args.auto)
    if args.autorecursive:
        pre["recursive"] = True
    elif args.auto is not None and not args.config:
        pre["recursive"] = False  # the original searched sub-folders only when asked
    if args.autobias:
        pre["bias_dark_only"] = True
    elif args.auto is not None and not args.config:
        pre["bias_dark_only"] = False
    if args.policy:
        pre["policy"] = args.policy
    comb = rules.combine.model_dump()
    if not args.config:  # the original program's default; only the rules file's default is auto
        comb["method"] = "sigma"
    comb.update(_method_choice(args, comb["method"]))
    if args.normalize:
        comb["normalize"] = args.normalize
    grouping_flags = args.groupsize or args.groupfilter or args.grouptemperature is not None
    if grouping_flags or not args.config:
        grouping = {"size": args.groupsize, "filter": args.groupfilter,
                    "temperature": args.grouptemperature, "min_group_size": 1, "folder": False}
    else:
        grouping = {**rules.grouping.model_dump(), "folder": False}
    if args.minimumgroup is not None:
        grouping["min_group_size"] = args.minimumgroup
    inputs = rules.inputs.model_dump()
    inputs["move_to"] = args.moveinputs if args.moveinputs else (inputs["move_to"] if args.config else None)
    if args.ignoretype:
        inputs["ignore_type"] = True
    engine = with_engine(rules, args.engine).engine.model_dump()
    if args.memory_limit:
        try:
            engine["memory_limit"] = parse_size(args.memory_limit)
        except ValueError as exc:
            raise UsageError(f"--memory-limit: {exc}") from None
    data = rules.model_dump()
    data.update(precalibration=pre, combine=comb, grouping=grouping, inputs=inputs, engine=engine, rules=[])
    from pydantic import ValidationError

    try:
        combined = Rules.model_validate(data)
    except ValidationError as exc:  # a bad option value
        raise UsageError("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())) from None
    grouped = bool(grouping["size"] or grouping["filter"] or grouping["temperature"] is not None)
    return combined, grouped


def _expand_output_name(name: str) -> str:
    """The original's -o accepted %d and %t for the date and time of the run. A name
    that is not a plain file name, or has an extension flatd cannot write (.png,
    .tif...), is a usage error; .xisf asks for an XISF master."""
    from datetime import datetime

    from flatd.output.naming import check_file_name, check_output_template

    try:
        check_output_template(name, "-o")
        check_file_name(name)
    except ValueError as exc:
        hint = " (-od names a folder)" if name in ("", ".", "..") else ""
        raise UsageError(str(exc) if str(exc).startswith("-o") else f"-o: {exc}{hint}") from None
    now = datetime.now()
    return name.replace("%d", now.strftime("%Y%m%d")).replace("%t", now.strftime("%H%M%S"))


def cmd_combine(args) -> int:
    _one_shot_output(args, report_wins=True)
    rules, grouped = _combine_rules(args)
    _check_move_destination(args.moveinputs)
    if grouped and args.output:
        raise UsageError("-o names one master; with grouping options use -od for the folder of the masters")
    from datetime import datetime

    from flatd.calibration import LibraryCache
    from flatd.stack.engines import make_engine
    from flatd.ingest.frames import read_frames
    from flatd.plan import plan_frames
    from flatd.runner import Runner

    missing = [p for p in args.files if not p.exists()]
    frames, bad = read_frames([p for p in args.files if p.exists()], rules.keyword_map())
    output_dir = args.outputdirectory
    output_name = None
    if args.output:
        output_dir = args.output.parent if str(args.output.parent) else Path(".")
        output_name = _expand_output_name(args.output.name)
    elif output_dir is None and not grouped:
        output_dir = Path(".")
    now = datetime.now()
    libraries = LibraryCache()
    plan = plan_frames(frames, rules, None, libraries, now, output_dir=output_dir, output_name=output_name, by_folder=False)
    from flatd.ingest.frames import Skipped

    unusable = bad + [Skipped(p, "no such file") for p in missing]
    from flatd.notify import events as E
    from flatd.runner import not_a_flat

    for item in unusable:  # the log gets them too (`2> log > /dev/null`), as run-once's does
        E.emit(E.FrameLeftOut(item.path, item.reason, bad=True))
    for item in plan.left_out:
        E.emit(E.FrameLeftOut(item.path, item.reason, quiet=not_a_flat(item.reason)))
    plan.left_out = unusable + plan.left_out
    if args.autodisplay:
        from flatd.log import printable

        for job in plan.jobs:
            for item in job.inputs:  # names from the disk and headers: no escape sequences reach the terminal
                print(printable(f"{item.frame.path}: {item.calibration.why or item.calibration.label}"))
    engine = None if args.dry_run else make_engine(rules.engine, _progress_factory())
    report = Runner(engine=engine).run(plan, dry_run=args.dry_run, now=now)
    print_report(report, dry_run=args.dry_run)
    _warn_single_flat_groups(plan.jobs)
    if not plan.jobs and not plan.failed:
        print("nothing to combine", file=sys.stderr)
        only_small_groups = all("min_group_size" in s.reason for s in plan.left_out)
        return EXIT_OK if only_small_groups else EXIT_FAILED
    return EXIT_FAILED if (report.exit_code or missing or bad) else EXIT_OK


FITS_SUFFIXES = (".fit", ".fits", ".fts", ".fz", ".xisf")


def _check_move_destination(destination: Optional[str]) -> None:
    """-v is the original's "move inputs to this folder": a FITS file after it is a slip."""
    if destination is None:
        return
    path = Path(destination)
    if path.is_file() or (not path.is_dir() and path.name.lower().endswith(FITS_SUFFIXES)):
        raise UsageError(f"-v/--moveinputs takes the folder the inputs are moved to, and {destination} is a file, "
                         "not a folder (for more log lines use --verbose)")


def _warn_single_flat_groups(jobs) -> None:
    """A master of one flat is that flat again, with all its noise: say so."""
    from flatd.log import printable

    for job in jobs:
        if len(job.inputs) == 1:
            print(f"flatd: warning: group {printable(job.label)} has one flat: a master of one flat is no master "
                  "(nothing is averaged; give more flats, or -mg to skip such groups)", file=sys.stderr)


# ---------------------------------------------------------------------- report


def print_report(report, dry_run: bool = False) -> None:
    """What was done (or would be, in a dry run), and every file left out with why.
    Text from headers and file names is printed without control characters."""
    from rich.markup import escape

    from flatd.log import printable

    def safe(value) -> str:
        return escape(printable(value))

    out = _console()
    verb = "would write" if dry_run else "wrote"
    for line in report.recovered_notes:
        out.print(f"[yellow]recovered[/yellow] {safe(line)}")
    for line in report.pending_moves:
        out.print(f"[red]not moved yet[/red] {safe(line)}")
    for outcome in report.outcomes:
        job = outcome.job
        rule = f" (rule {safe(job.rule)})" if job.rule else ""
        group = safe(job.label)
        _print_flat_checks(out, outcome, safe)
        if outcome.state == "would-run":
            how = job.method.description
            if job.auto_reason is not None:
                from flatd.stack.auto import describe

                how = describe(job.method, job.auto_reason)
            out.print(f"[bold]group {group}[/bold]{rule}: {len(job.inputs)} flats, {safe(how)}, "
                      f"normalize {safe(job.normalize)}")
            for item in job.inputs:
                out.print(f"  {safe(item.frame.path)}  [dim]calibration:[/dim] "
                          f"{safe(item.calibration.why or item.calibration.label)}")
            out.print(f"  -> {verb} {safe(outcome.master)}" + (f" ({safe(outcome.reason)})" if outcome.reason else ""))
            for folder in sorted({str(dest) for _, dest in outcome.moved}):
                out.print(f"  -> would move the inputs to {safe(folder)}")
        elif outcome.state == "done":
            out.print(f"[green]{verb}[/green] {safe(outcome.master)}  ({len(job.inputs)} flats, {group}{rule})")
            _print_rejection(out, outcome, safe)
            _print_preview(out, outcome, safe)
            _print_checks(out, outcome, safe)
            if outcome.moved:
                out.print(f"  moved {len(outcome.moved)} inputs to {safe(outcome.moved[0][1].parent)}")
        elif outcome.state == "skipped":
            out.print(f"skipped group {group}{rule}: {safe(outcome.reason)}")
        elif outcome.state == "moves-pending":
            out.print(f"[green]{verb}[/green] {safe(outcome.master)}  ({len(job.inputs)} flats, {group}{rule})")
            _print_rejection(out, outcome, safe)
            _print_preview(out, outcome, safe)
            _print_checks(out, outcome, safe)
            out.print(f"  [red]not all moved[/red]: {safe(outcome.reason)}")
        elif outcome.state in ("busy", "failed-before"):
            out.print(f"[red]not done[/red] group {group}{rule}: {safe(outcome.reason)}")
        else:
            out.print(f"[red]failed[/red] group {group}{rule}: {safe(outcome.reason)}")
            if outcome.master:
                out.print(f"  (the master {safe(outcome.master)} was written)")
    for failed in report.plan.failed:
        rule = f" (rule {safe(failed.rule)})" if failed.rule else ""
        out.print(f"[red]failed[/red] group {safe(failed.label)}{rule}: {safe(failed.reason)}")
    for item in report.plan.left_out:
        out.print(f"[yellow]left out[/yellow] {safe(item.path)}: {safe(item.reason)}")
    for problem in report.problems:
        out.print(f"[red]error[/red] {safe(problem)}")
    if not report.outcomes and not report.plan.failed and not report.problems and not report.pending_moves:
        out.print("no groups to combine")


def _print_flat_checks(out, outcome, safe) -> None:
    """The flat checks' warnings of a group (its left-out flats are listed with the other
    files left out), and why a dry run did not screen it."""
    for f in getattr(outcome, "findings", []):
        if not f.leaves_out:
            out.print(f"[yellow]warning[/yellow] {safe(f.path)}: {safe(f.reason)} (quality: warn, combined)")
    if getattr(outcome, "checks_note", None):
        out.print(f"[dim]{safe(outcome.checks_note)}[/dim]")


# Inputs named in the report when they lost more than clean data's baseline plus
# combine.rejection_warn, at most.
REPORT_FRAMES = 5


def _print_preview(out, outcome, safe) -> None:
    """The PNG preview beside a master made now (output.previews)."""
    from flatd.runner import preview_of

    preview = preview_of(outcome.job, outcome.master)
    if preview is not None:
        out.print(f"  preview {safe(preview)}")


def _print_checks(out, outcome, safe) -> None:
    """The master checks' verdict and reasons (flatd.qc.masters), the previous master
    compared with and the dust that changed since."""
    qc = getattr(outcome, "qc", None)
    if qc is None:
        return
    colour = {"good": "green", "warn": "yellow", "bad": "red"}.get(qc.status, "")
    out.print(f"  checks: [{colour}]{safe(qc.status)}[/{colour}]" + (f": {safe('; '.join(qc.reasons))}"
                                                                    if qc.reasons else ""))
    previous = qc.previous
    if previous is not None and previous.path is not None:
        c = previous.comparison
        out.print(f"  against {safe(previous.path.name)}: {100 * c.changed_fraction:.3g} % of pixels changed, "
                  f"{len(c.blobs)} dust change(s)")
        for blob in c.blobs[:10]:
            out.print(f"    dust {safe(blob.kind)} at x={blob.x:.0f} y={blob.y:.0f} (r {blob.radius:.0f} px, "
                      f"{blob.depth:.2f} %)")
    for note in (previous.skipped if previous is not None else []):
        out.print(f"  [yellow]previous master skipped[/yellow]: {safe(note)}")
    from flatd.runner import keeps_inputs

    if outcome.job.move_to and keeps_inputs(outcome.job, qc):
        out.print("  inputs kept in place: the master is bad (quality.bad_keeps_inputs)")


def _print_rejection(out, outcome, safe) -> None:
    """The rejected fractions of a master made now and what the method rejects from clean
    data at this number of frames (the baseline); a warning more than combine.rejection_warn
    above the baseline, and the inputs that lost most (often a bad frame)."""
    from flatd.notify.events import percent

    rej = outcome.rejection
    if rej is None:
        return
    notes = [f"auto: {safe(outcome.job.method.label)}"] if outcome.job.auto_reason else []
    if rej.threshold is not None:  # the baseline is measured only for the warning
        notes.append(f"clean data at this N: {percent(rej.baseline)}")
    out.print(f"  rejected {percent(rej.low)} low, {percent(rej.high)} high"
              + (f" ({'; '.join(notes)})" if notes else ""))
    if rej.warn:
        out.print(f"  [yellow]warning[/yellow]: rejected {percent(rej.total)} of all values (clean data at "
                  f"this N: {percent(rej.baseline)}), more than combine.rejection_warn "
                  f"{percent(rej.threshold)} above it")
    above = rej.frames_above()
    for path, low, high in above[:REPORT_FRAMES]:
        out.print(f"  [yellow]rejected most[/yellow] {safe(path.name)}: {percent(low + high)} of its values "
                  f"({percent(low)} low, {percent(high)} high)")
    if len(above) > REPORT_FRAMES:
        out.print(f"  ... and {len(above) - REPORT_FRAMES} more input(s) above {percent(rej.limit)}")


CONFIG_COMMANDS = {"check": cmd_config_check, "show": cmd_config_show}


def cmd_engine_check(args) -> int:
    """Connect to the cluster; list its workers, their flatd version and whether each sees
    every capture folder (through engine.path_map). Exit 0 when every worker can work,
    1 when some or all cannot (another version, a folder not seen), 2 when the scheduler
    cannot be reached."""
    rules = with_engine(_load_rules(args.config), args.engine)
    if rules.engine.kind != "dask":
        print("engine: local (this process); nothing to check")
        return 0
    from flatd.stack.engines.dask import check_cluster

    lines, code = check_cluster(rules.engine, [c.path for c in rules.capture])
    for line in lines:
        print(line)
    return code

COMMANDS = {
    "run-once": cmd_run_once,
    "watch": cmd_watch,
    "status": cmd_status,
    "retry": cmd_retry,
    "inspect": cmd_inspect,
    "demo": cmd_demo,
    "qc": cmd_qc,
    "combine": cmd_combine,
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: 0 for --help/--version, 2 for usage errors
        return int(exc.code or 0)
    if args.command == "config":
        handler = CONFIG_COMMANDS[args.config_command]
    elif args.command == "engine":
        handler = cmd_engine_check
    else:
        handler = COMMANDS[args.command]
    try:
        return handler(args)
    except UsageError as exc:
        print(f"flatd: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("flatd: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the last guard: a plain message, no traceback, unless asked
        if os.environ.get("FLATD_DEBUG"):
            raise
        from flatd.ledger import LedgerLocked

        if isinstance(exc, LedgerLocked):
            print(f"flatd: {exc}", file=sys.stderr)
            return EXIT_USAGE
        print(f"flatd: error: {exc} (set FLATD_DEBUG=1 for a traceback)", file=sys.stderr)
        return EXIT_FAILED


def run() -> None:
    """The console script: main(), then exit without tearing the interpreter down.

    Unloading astropy and the other modules at exit costs a tenth of a second or more of
    a whole combine; everything flatd writes is flushed, fsynced and closed by then.
    """
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
