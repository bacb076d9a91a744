"""Runs every benchmark in this directory, one after the other, and writes one report of the run.

Each script prints its own figures and can write them as JSON, but their shapes differ and
comparing runs meant collecting four files by hand. This runs them in turn, each as its own
process (`python <script> --json <tmp>`, one benchmark at a time so they never share the two
cores), streams their console output, and writes into a results folder
(`loadtests/results/bench-<YYYYmmdd-HHMMSS>/` unless --out is given):
  summary.json   per benchmark: status, exit code, wall seconds, the script's arguments and its
                 parsed JSON (or the error / skip reason), plus the run's date, host and load
  summary.md     the same as a markdown report: each list of rows as a table, scalars as bullets
  <name>.log     each benchmark's console output

A benchmark that fails does not stop the others. Ctrl-C (or SIGTERM) stops the current one
(the scripts stop their own processes on SIGINT; press Ctrl-C again to kill it outright), skips
the rest and still writes the summary. Exits 0 when every benchmark exited 0 and wrote its
JSON (or a skip), else 1.

    .venv/bin/python loadtests/bench/run_all.py
        [--only edge,passthrough,cache,dedup,jobs,front,tracing] [--quick] [--strict] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import select
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from common import die_with_parent, loadavg, tail

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
ERROR_LINES = 15  # lines of a failed benchmark's output kept as its error


@dataclass(frozen=True)
class Bench:
    name: str
    script: str
    quick: tuple[str, ...]  # a short smoke run: only options the script accepts
    strict: bool  # accepts --strict (exit 1 below its goal)


BENCHES = (
    Bench("edge", "edge.py", ("--duration", "2", "--rounds", "1"), strict=True),
    Bench("passthrough", "passthrough.py", ("--duration", "2"), strict=False),
    Bench("cache", "cache_hit.py", ("--duration", "2", "--rounds", "1"), strict=True),
    Bench("dedup", "dedup.py", ("--rounds", "1"), strict=True),
    Bench("jobs", "jobs.py", ("--duration", "2"), strict=False),
    Bench("front", "front.py", ("--duration", "2", "--rounds", "1"), strict=False),
    Bench("tracing", "tracing.py", ("--duration", "2", "--rounds", "1"), strict=False),
)


# --- running the benchmarks --------------------------------------------------------------------


def raise_interrupt(signum: int, _frame: object) -> None:
    """SIGTERM / SIGHUP: unwind like Ctrl-C, so the current benchmark is stopped cleanly."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


def pump(process: subprocess.Popen[bytes], log: IO[bytes]) -> None:
    """Copies the benchmark's output to our stdout and its log as it comes, until it has exited
    and nothing more arrives (a server it left behind may still hold the pipe open)."""
    assert process.stdout is not None
    fd = process.stdout.fileno()
    while True:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                return
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
            log.write(chunk)
        elif process.poll() is not None:
            return


def interrupt(process: subprocess.Popen[bytes], name: str, log: IO[bytes]) -> int:
    """SIGINT to the benchmark (in a process group of its own, it did not get the terminal's)
    and waits while it stops its processes; a second Ctrl-C kills it outright (its servers get
    SIGTERM from the kernel then)."""
    print(f"\n[run_all] interrupted: stopping {name} (Ctrl-C again to kill it)", flush=True)
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    try:
        pump(process, log)
        return process.wait()
    except KeyboardInterrupt:
        print(f"\n[run_all] killing {name}", flush=True)
        process.kill()
        return process.wait()


def execute(command: list[str], name: str, log_path: Path) -> tuple[int | None, bool, str]:
    """Runs one benchmark: its exit code (None: it could not start), whether it was interrupted,
    and an error message when it could not start."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # its output in order, as it comes
    with open(log_path, "wb") as log:
        try:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                       process_group=0, preexec_fn=die_with_parent)
        except OSError as exc:
            return None, False, f"could not start: {exc}"
        with process:
            try:
                pump(process, log)
                return process.wait(), False, ""
            except KeyboardInterrupt:
                return interrupt(process, name, log), True, ""


def read_json(path: Path) -> tuple[dict[str, Any] | None, str]:
    """The script's JSON output, or None and why."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None, "no JSON written"
    except (OSError, ValueError) as exc:
        return None, f"unreadable JSON: {exc}"
    if not isinstance(data, dict):
        return None, f"unexpected JSON: {type(data).__name__}, not an object"
    return data, ""


def outcome(code: int | None, interrupted: bool, start_error: str, result: dict[str, Any] | None,
            json_error: str, log_path: Path) -> dict[str, str]:
    """Status (ok / skipped / failed / interrupted) of one benchmark, with its skip `reason` or
    its `error`."""
    if interrupted:
        return {"status": "interrupted"}
    if code == 0 and result is not None and "skipped" in result:
        return {"status": "skipped", "reason": str(result["skipped"])}
    if code == 0 and result is not None:
        return {"status": "ok"}
    error = start_error or (json_error if code == 0 else exit_error(code, log_path))
    return {"status": "failed", "error": error}


def exit_error(code: int | None, log_path: Path) -> str:
    output = tail(log_path, ERROR_LINES).strip()
    return f"exit code {code}" + (f"; last output:\n{output}" if output else " (no output)")


def run_bench(bench: Bench, options: list[str], tmp: Path, out: Path) -> dict[str, Any]:
    json_path = tmp / f"{bench.name}.json"
    log_path = out / f"{bench.name}.log"
    command = [sys.executable, str(HERE / bench.script), "--json", str(json_path), *options]
    print(f"\n[run_all] === {bench.name}: {bench.script} {' '.join(options)}".rstrip(),
          flush=True)
    started = time.monotonic()
    code, interrupted, start_error = execute(command, bench.name, log_path)
    wall = round(time.monotonic() - started, 1)
    result, json_error = read_json(json_path)
    status = outcome(code, interrupted, start_error, result, json_error, log_path)
    print(f"[run_all] --- {bench.name}: {status['status']} (exit {code}, {wall:g} s)", flush=True)
    return {**status, "exit_code": code, "wall_s": wall, "script": bench.script, "args": options,
            "log": log_path.name, "result": result}


def bench_options(bench: Bench, args: argparse.Namespace) -> list[str]:
    options = list(bench.quick) if args.quick else []
    if args.strict and bench.strict:
        options.append("--strict")
    return options


def run_all(selected: list[Bench], args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Every selected benchmark in turn; after an interruption the rest are `not run`."""
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="sidecar-bench-all-") as tmp:
        try:
            for bench in selected:
                entry = run_bench(bench, bench_options(bench, args), Path(tmp), out)
                results[bench.name] = entry
                if entry["status"] == "interrupted":
                    break
        except KeyboardInterrupt:  # between two benchmarks
            print("\n[run_all] interrupted", flush=True)
    for bench in selected:
        results.setdefault(bench.name, {"status": "not run", "script": bench.script,
                                        "exit_code": None, "reason": "interrupted before it"})
    return results


# --- the report --------------------------------------------------------------------------------


def fmt_float(value: float) -> str:
    """Sensibly rounded: whole numbers as such, 3 significant digits or so otherwise."""
    if value != value or value in (float("inf"), float("-inf")):
        return str(value)
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}".rstrip("0").rstrip(".")
    if magnitude >= 0.1:
        return f"{value:.2f}".rstrip("0").rstrip(".")
    return f"{value:.3g}"


def fmt(value: Any) -> str:
    """A value as markdown text (one line, `|` escaped)."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return fmt_float(value)
    if isinstance(value, dict):
        return ", ".join(f"{k}: {fmt(v)}" for k, v in value.items()) or "-"
    if isinstance(value, list):
        nested = any(isinstance(v, dict | list) for v in value)
        return ("; " if nested else ", ").join(fmt(v) for v in value) or "-"
    return str(value).replace("|", "\\|").replace("\n", " ")


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def md_table(rows: list[dict[str, Any]]) -> list[str]:
    """Rows as a markdown table: the union of their keys as columns, numbers right-aligned."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    numeric = {c: all(is_number(row.get(c)) for row in rows if row.get(c) is not None)
               for c in columns}
    lines = ["| " + " | ".join(columns) + " |",
             "|" + "|".join("---:" if numeric[c] else "---" for c in columns) + "|"]
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return lines


def as_rows(value: Any) -> list[dict[str, Any]] | None:
    """A list of dicts (or a single dict) is rendered as a table; anything else is a scalar."""
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return value
    if isinstance(value, dict) and value:
        return [value]
    return None


def render_result(result: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    scalars = {}
    for key, value in result.items():
        rows = as_rows(value)
        if rows is None:
            scalars[key] = value
        else:
            lines += [f"#### {key}", "", *md_table(rows), ""]
    lines += [f"- {key}: {fmt(value)}" for key, value in scalars.items()]
    return [*lines, ""] if scalars else lines


def fmt_code(code: int | None) -> str:
    """An exit code; a negative one (killed by a signal) with the signal's name."""
    if code is not None and code < 0:
        with suppress(ValueError):
            return f"{code} ({signal.Signals(-code).name})"
    return fmt(code)


def status_line(entry: dict[str, Any]) -> str:
    status, code = entry["status"], fmt_code(entry.get("exit_code"))
    wall = f", {fmt_float(entry['wall_s'])} s" if "wall_s" in entry else ""
    if status == "ok":
        return f"**status: ok** (exit 0{wall})"
    if status == "skipped":
        return f"**status: skipped** ({entry['reason']}{wall})"
    if status == "failed":
        return f"**status: failed** (exit code {code}{wall})"
    if status == "interrupted":
        return f"**status: interrupted** (exit code {code}{wall})"
    return f"**status: {status}** ({entry.get('reason', '')})"


def render_bench(name: str, entry: dict[str, Any]) -> list[str]:
    lines = [f"## {name}", "", status_line(entry), ""]
    if "args" in entry:
        lines += [f"command: `{' '.join([entry['script'], *entry['args']])}`", ""]
    if entry["status"] in ("failed", "interrupted") and entry.get("error"):
        lines += ["```", entry["error"], "```", ""]
    if entry.get("result") and entry["status"] != "skipped":
        lines += render_result(entry["result"])
    return lines


def render_markdown(run: dict[str, Any], benchmarks: dict[str, Any]) -> str:
    lines = [
        f"# Benchmarks, {run['started'][:19].replace('T', ' ')}", "",
        f"- date: {run['started']} to {run['finished']}",
        f"- host: {run['host']}, {run['cpus']} CPUs ({run['cpu_model']}), "
        f"Python {run['python']}",
        f"- load average (1, 5, 15 min): {run['loadavg_start']} at start, "
        f"{run['loadavg_end']} at end",
        f"- options: {' '.join(run['argv']) or '(none)'}",
        "",
        "| benchmark | status | exit code | wall s |",
        "|---|---|---:|---:|",
    ]
    lines += [f"| {name} | {e['status']} | {fmt_code(e.get('exit_code'))} | "
              f"{fmt(e.get('wall_s'))} |" for name, e in benchmarks.items()]
    lines.append("")
    for name, entry in benchmarks.items():
        lines += render_bench(name, entry)
    return "\n".join(lines).rstrip() + "\n"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


# --- the command -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[Bench]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    names = [bench.name for bench in BENCHES]
    parser.add_argument("--only", metavar="NAME[,NAME]",
                        help=f"run only these, comma-separated ({', '.join(names)})")
    parser.add_argument("--quick", action="store_true",
                        help="short runs for a smoke test (e.g. --duration 2, --rounds 1)")
    parser.add_argument("--strict", action="store_true",
                        help="pass --strict to the scripts that take it (cache, dedup)")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="results folder (loadtests/results/bench-<YYYYmmdd-HHMMSS>/)")
    args = parser.parse_args(argv)
    wanted = names
    if args.only:
        wanted = [name.strip() for name in args.only.split(",") if name.strip()]
        unknown = sorted(set(wanted) - set(names))
        if unknown or not wanted:
            parser.error(f"--only: unknown {', '.join(unknown) or 'empty list'}; "
                         f"choose from {', '.join(names)}")
    return args, [bench for bench in BENCHES if bench.name in wanted]


def main(argv: list[str] | None = None) -> int:
    args, selected = parse_args(argv)
    out: Path = args.out or (ROOT / "loadtests" / "results"
                             / f"bench-{datetime.now():%Y%m%d-%H%M%S}")
    out.mkdir(parents=True, exist_ok=True)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, raise_interrupt)
    run: dict[str, Any] = {
        "started": now(), "host": platform.node(), "cpus": os.cpu_count(),
        "cpu_model": cpu_model(), "python": platform.python_version(),
        "loadavg_start": loadavg(), "argv": sys.argv[1:] if argv is None else argv}
    benchmarks = run_all(selected, args, out)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # the summary gets written
        signal.signal(sig, signal.SIG_IGN)
    run.update(finished=now(), loadavg_end=loadavg())
    (out / "summary.json").write_text(
        json.dumps({"run": run, "benchmarks": benchmarks}, indent=2) + "\n")
    (out / "summary.md").write_text(render_markdown(run, benchmarks))
    # A run that exits 0 without its JSON counts as failed too.
    failed = [f"{name} ({entry['status']})" for name, entry in benchmarks.items()
              if entry["status"] not in ("ok", "skipped")]
    print(f"\n[run_all] {len(benchmarks) - len(failed)} of {len(benchmarks)} benchmarks ok or "
          "skipped" + (f"; not: {', '.join(failed)}" if failed else ""))
    print(f"[run_all] summary: {out / 'summary.md'}\n[run_all]          {out / 'summary.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
