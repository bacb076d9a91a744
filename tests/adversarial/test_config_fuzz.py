"""Config files written by anyone: whatever the YAML holds, `load_config` (and the SLA file's
`load_slas`) either loads it or raises ConfigError with located problems, and `sidecar check`
exits 0 or 1 without a traceback. Hypothesis generates the shapes (wrong types at every key of
the models, random keys, unicode, huge numbers, null) and raw text and bytes; known hostile
documents (alias bombs, deep nesting, duplicate keys, other encodings) are spelled out.
"""

from __future__ import annotations

import contextlib
import io
import signal
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from sidecar.cli import main as sidecar_main
from sidecar.config import Config, ConfigError, LoadedConfig, load_config
from sidecar.loadtest.sla import SlaFile, load_slas

FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """TimeoutError if the block runs longer (a hang is a failure, not a stuck suite)."""

    def expired(signum: int, frame: types.FrameType | None) -> None:
        raise TimeoutError(f"still running after {seconds}s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def check_loader(path: Path, loader: Callable[[Path], Any]) -> ConfigError | None:
    """Load `path`: fine, or a ConfigError whose problems each say where; nothing else."""
    with time_limit(10):
        try:
            loader(path)
        except ConfigError as exc:
            assert exc.problems
            for problem in exc.problems:
                assert problem.file and problem.message, problem
                assert str(problem).startswith(problem.file)
            return exc
    return None


def check_cli(path: Path) -> int:
    """`sidecar check -c path`, in this process: 0 or 1, never a traceback."""
    out, err = io.StringIO(), io.StringIO()
    with time_limit(10), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = sidecar_main(["check", "-c", str(path)])
    assert code in (0, 1), (code, err.getvalue())
    assert "Traceback" not in out.getvalue() + err.getvalue()
    if code == 1:
        assert "nothing was started" in err.getvalue()
    else:
        assert "OK" in out.getvalue()
    return code


# -- what YAML can hold ------------------------------------------------------------------------

SCALARS = st.one_of(
    st.none(), st.booleans(),
    st.integers(), st.integers(min_value=10**18, max_value=10**40), st.just(-1), st.just(0),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=10),
    st.sampled_from([
        "30s", "-5s", "0s", "0ms", "1e400s", "9" * 400 + "s", "9" * 400, "9" * 400 + "GiB",
        "1.5.5s", "10 m", "64MiB", "-1MiB", "nan", "inf", "-inf", "1/s", "0/s", "99999999/h",
        "20%", "200%", "-1%", "${NOPE_NOT_SET}", "${HOME}", "${X:-30s}", "/**", "/a/**/b",
        "**", "GET", "get", "http://127.0.0.1:8000", "redis://x", "embedded", "127.0.0.1:99999",
        "[::1]:80", "0.0.0.0:0", "\x00", "\ud800", "é", "🙂" * 50, "a" * 5000,
    ]),
)


def yaml_values(max_leaves: int = 12) -> st.SearchStrategy[Any]:
    keys = st.one_of(st.text(max_size=12), st.sampled_from(
        ["name", "path", "url", "ttl", "on", "<<", "routes", "server", "1"]))
    return st.recursive(
        SCALARS,
        lambda children: st.one_of(st.lists(children, max_size=4),
                                   st.dictionaries(keys, children, max_size=4)),
        max_leaves=max_leaves)


def key_paths(model: type[BaseModel], prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path of a model, lists entered at [0], dicts at a sample key."""
    paths = []
    for name, field in model.model_fields.items():
        path = (*prefix, field.alias or name)
        paths.append(path)
        paths += _paths_of(field.annotation, path)
    return paths


def _paths_of(annotation: Any, path: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _paths_of(typing.get_args(annotation)[0], path)
    if origin in (typing.Union, types.UnionType):
        return [p for arg in typing.get_args(annotation) for p in _paths_of(arg, path)]
    if origin is list:
        return _paths_of(typing.get_args(annotation)[0], (*path, 0))
    if origin is dict:
        sample = {"upstreams": "app", "queues": "default", "routes": "default"}.get(
            str(path[-1]), "key")
        return _paths_of(typing.get_args(annotation)[1], (*path, sample))
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return key_paths(annotation, path)
    return []


def set_at(document: Any, path: tuple[Any, ...], value: Any) -> Any:
    """`document` with `value` at `path`, making the containers on the way."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(head, int):
        items = list(document) if isinstance(document, list) else []
        while len(items) <= head:
            items.append({})
        items[head] = set_at(items[head], rest, value)
        return items
    mapping = dict(document) if isinstance(document, dict) else {}
    mapping[head] = set_at(mapping.get(head), rest, value)
    return mapping


# A config that loads, with every section and policy present, for values to be planted in.
VALID: dict[str, Any] = {
    "server": {"listen": "127.0.0.1:18080", "admin_listen": "127.0.0.1:19901"},
    "redis": {"url": "redis://127.0.0.1:6379/0"},
    "upstreams": {"app": {"url": "http://127.0.0.1:8000", "breaker": {}, "retry": {}}},
    "routes": [{
        "name": "default", "match": {"path": "/**", "methods": ["GET", "POST"]},
        "upstream": "app", "timeout": "5s", "cache": {"key": {}}, "etag": True, "dedup": {},
        "idempotency": {}, "breaker": {}, "retry": {}, "offload": {"queue": "default"},
        "rate_limit": {"rate": "10/s", "burst": 5},
    }],
    "queues": {"default": {"concurrency": 2}},
    "jobs": {}, "log": {}, "admin": {"token": "s3cret"},
    "metrics": {"sla": {"routes": {"default": {"latency_p95": "200ms"}}}},
}
CONFIG_PATHS = [p for p in key_paths(Config) if p[0] != "include"]
VALID_SLAS: dict[str, Any] = {
    "target": "http://127.0.0.1:8080", "users": 2, "duration": "5s",
    "slas": [{"name": "page", "request": {"method": "GET", "path": "/"}, "p95": "100ms"}],
    "replay": {"p99": "1s"},
}
SLA_PATHS = key_paths(SlaFile)


def write(path: Path, document: Any) -> Path:
    path.write_text(yaml.safe_dump(document, allow_unicode=True), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def test_the_planted_documents_are_valid(folder: Path) -> None:
    """The fuzzing below starts from documents that load: every problem it finds is the
    planted value's."""
    assert isinstance(load_config(write(folder / "valid.yaml", VALID)), LoadedConfig)
    assert check_cli(folder / "valid.yaml") == 0
    load_slas(write(folder / "slas.yaml", VALID_SLAS))
    assert len(CONFIG_PATHS) > 100 and len(SLA_PATHS) > 20


@FUZZ
@given(path=st.sampled_from(CONFIG_PATHS), value=yaml_values())
def test_any_value_at_any_key_of_the_config(folder: Path, path, value) -> None:
    file = write(folder / "config.yaml", set_at(VALID, path, value))
    error = check_loader(file, load_config)
    assert check_cli(file) == (0 if error is None else 1)


@FUZZ
@given(document=yaml_values(30))
def test_any_document_shape_as_a_config(folder: Path, document) -> None:
    file = write(folder / "shape.yaml", document)
    error = check_loader(file, load_config)
    assert check_cli(file) == (0 if error is None else 1)


@FUZZ
@given(section=st.sampled_from(sorted(Config.model_fields)), value=yaml_values(20),
       extra=st.dictionaries(st.text(max_size=8), yaml_values(4), max_size=2))
def test_any_section_shape_beside_valid_ones(folder: Path, section, value, extra) -> None:
    if section == "include":
        value = [value] if isinstance(value, str) else None
    document = {**VALID, section: value, **{k: v for k, v in extra.items() if k != "include"}}
    check_loader(write(folder / "section.yaml", document), load_config)


# Pieces of YAML syntax, for text the parser has to make sense of.
FRAGMENTS = ["a: ", "routes:", "upstreams:", "server:", "- ", "&x ", "*x", "&y ", "*y", "[",
             "]", "{", "}", ", ", "\n", "\n  ", "\n    ", "? ", ": ", "<<: ", "'", '"', "\t",
             "%YAML 1.1\n", "---\n", "...\n", "# c", "!!binary ", "!!python/object:os.system ",
             "!!set ", "!!map ", "|\n  ", ">-\n  ", "\\", "\x00", "\ufeff", "é", "${A}", "1e9",
             "null", "~", "yes", "on", "0x1F", "0o17", ".inf", "2001-12-14t21:59:43.10-05:00"]


@FUZZ
@given(text=st.one_of(st.text(max_size=200),
                      st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join)))
def test_any_text_as_a_config(folder: Path, text) -> None:
    file = folder / "text.yaml"
    file.write_bytes(text.encode("utf-8", "surrogatepass"))
    error = check_loader(file, load_config)
    assert check_cli(file) == (0 if error is None else 1)


@FUZZ
@given(data=st.binary(max_size=200))
def test_any_bytes_as_a_config(folder: Path, data) -> None:
    file = folder / "bytes.yaml"
    file.write_bytes(data)
    error = check_loader(file, load_config)
    assert check_cli(file) == (0 if error is None else 1)


@FUZZ
@given(path=st.sampled_from(SLA_PATHS), value=yaml_values())
def test_any_value_at_any_key_of_the_sla_file(folder: Path, path, value) -> None:
    check_loader(write(folder / "slas.yaml", set_at(VALID_SLAS, path, value)), load_slas)


@FUZZ
@given(document=st.one_of(yaml_values(30), st.text(max_size=100), st.binary(max_size=100),
                          st.lists(st.sampled_from(FRAGMENTS), max_size=30).map("".join)))
def test_any_document_text_or_bytes_as_an_sla_file(folder: Path, document) -> None:
    file = folder / "slas-any.yaml"
    if isinstance(document, bytes):
        file.write_bytes(document)
    elif isinstance(document, str):
        file.write_bytes(document.encode("utf-8", "surrogatepass"))
    else:
        write(file, document)
    check_loader(file, load_slas)


# -- hostile documents, spelled out -------------------------------------------------------------

LAUGHS = "\n".join(
    ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    + [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]" for i in range(8)]
    + ["routes: *i"])
MERGE_BOMB = "\n".join(
    ["m0: &m0 {k0: 1, k1: 1}"]
    + [f"m{i}: &m{i} {{<<: [{', '.join([f'*m{i - 1}'] * 8)}], x{i}: 1}}" for i in range(1, 10)]
    + ["server: *m9"])
VALID_YAML = yaml.safe_dump(VALID)

HOSTILE = {
    "billion laughs": LAUGHS,
    "billion laughs in a route": VALID_YAML + "\nx: " + LAUGHS.replace("\n", "\n  "),
    "merge key bomb": MERGE_BOMB,
    "recursive alias": "server: &s {a: *s}\n",
    "recursive list": "routes: &r [*r]\n",
    # (past Python's recursion limit; deeper ones cost PyYAML's scanner more time, not more
    # ways to fail)
    "deep sequence": "routes: " + "[" * 1_000 + "]" * 1_000 + "\n",
    "deep mapping": "server: " + "{a: " * 5_000 + "1" + "}" * 5_000 + "\n",
    "deep unclosed": "[" * 1_000,
    "duplicate top key": VALID_YAML + "server: {}\n",
    "duplicate nested key": "server:\n  listen: 127.0.0.1:1\n  listen: 127.0.0.1:2\n",
    "sequence as a key": "? [a, b]\n: 1\nroutes: []\n",
    "mapping as a key": "{a: 1}: 2\n",
    "sequence key in a route": VALID_YAML.replace("routes:", "routes:\n- {[x]: 1}\n  ", 1),
    "python object": "server: !!python/object/apply:os.system ['true']\n",
    "binary value": "server: {listen: !!binary aGk=}\n",
    "set value": "routes: !!set {a, b}\n",
    "timestamp": "server: {listen: 2001-12-14}\n",
    "two documents": VALID_YAML + "---\n" + VALID_YAML,
    "tab indentation": "server:\n\tlisten: x\n",
    "unterminated string": 'server: {listen: "127.0.0.1\n',
    "lone surrogate": 'server: {listen: "\\ud800"}\n',
    "lone surrogate key": '"\\udfff": 1\n',
    "control characters": "server: {listen: \x07}\n",
    "empty": "",
    "comments only": "# nothing\n",
    "top-level list": "- a\n- b\n",
    "top-level scalar": "42\n",
    "null document": "~\n",
    "use of a list": VALID_YAML.replace("upstream: app", "upstream: app\n  use: [[a], {b: 1}]"),
    "use of a mapping": VALID_YAML.replace("upstream: app", "upstream: app\n  use: {a: 1}"),
    "huge numbers": yaml.safe_dump(set_at(VALID, ("queues", "default", "concurrency"),
                                          int("9" * 4000))),
    "int past Python's digit limit": "server: {workers: " + "9" * 5000 + "}\n",
    "float of many digits": "server: {workers: " + "9" * 5000 + ".5}\n",
    "size past floats": yaml.safe_dump(set_at(
        VALID, ("routes", 0, "cache", "memory", "max_bytes"), "9" * 400)),
    "size past floats with a unit": yaml.safe_dump(set_at(
        VALID, ("routes", 0, "cache", "redis", "max_entry"), "9" * 400 + "GiB")),
    "duration past floats": yaml.safe_dump(set_at(VALID, ("routes", 0, "timeout"),
                                                  "9" * 400 + "s")),
    "percent past floats": yaml.safe_dump(set_at(VALID, ("routes", 0, "retry", "budget"),
                                                 "9" * 400 + "%")),
    "rate past floats": yaml.safe_dump(set_at(VALID, ("routes", 0, "rate_limit", "rate"),
                                              "9" * 400 + "/s")),
}


@pytest.mark.parametrize("text", list(HOSTILE.values()), ids=list(HOSTILE))
def test_hostile_yaml(folder: Path, text: str) -> None:
    file = folder / "hostile.yaml"
    file.write_bytes(text.encode("utf-8"))
    error = check_loader(file, load_config)
    assert check_cli(file) == (0 if error is None else 1)
    check_loader(file, load_slas)


def test_alias_bombs_are_refused_saying_why(folder: Path) -> None:
    for text in (LAUGHS, MERGE_BOMB, "server: &s {a: *s}\n"):
        file = folder / "bomb.yaml"
        file.write_text(text)
        error = check_loader(file, load_config)
        assert error is not None
        assert any("alias" in p.message for p in error.problems), error


def test_modest_aliases_still_work(folder: Path) -> None:
    file = folder / "aliases.yaml"
    file.write_text("""\
server: {listen: 127.0.0.1:18080, admin_listen: 127.0.0.1:19901}
upstreams:
  app: &up {url: http://127.0.0.1:8000, timeout: 5s}
  other: *up
queues:
  default: &q {concurrency: 3}
  second: *q
routes:
  - &base {name: a, upstream: app, retry: &retry {attempts: 1}, timeout: 2s}
  - {<<: *base, name: b, upstream: other}
  - {name: c, upstream: app, retry: *retry}
""")
    config = load_config(file).config
    assert config.queues["second"].concurrency == 3
    assert config.routes[1].timeout == 2.0 and config.routes[1].upstream == "other"
    assert config.routes[2].retry == config.routes[0].retry


ENCODINGS = {
    "latin-1": ("server: {via: 'caf\u00e9'}\n", "latin-1"),
    "utf-16 with a BOM": (VALID_YAML, "utf-16"),
    "utf-32": (VALID_YAML, "utf-32"),
    "cp1252": ("server: {via: '\u2019'}\n", "cp1252"),
}


@pytest.mark.parametrize(("text", "encoding"), list(ENCODINGS.values()), ids=list(ENCODINGS))
def test_files_not_in_utf_8_are_a_located_problem(folder: Path, text: str,
                                                  encoding: str) -> None:
    file = folder / "encoded.yaml"
    file.write_bytes(text.encode(encoding))
    error = check_loader(file, load_config)
    assert error is not None and "UTF-8" in str(error)
    assert check_cli(file) == 1
    assert check_loader(file, load_slas) is not None


def test_a_utf_8_bom_is_fine(folder: Path) -> None:
    file = folder / "bom.yaml"
    file.write_bytes(b"\xef\xbb\xbf" + VALID_YAML.encode())
    assert check_loader(file, load_config) is None


def test_an_included_policy_file_is_fuzzed_too(folder: Path) -> None:
    """Bundles are read the same way: a binary or bomb policy file is a problem of its own."""
    policies = folder / "policies"
    policies.mkdir(exist_ok=True)
    (policies / "binary.yaml").write_bytes(b"\xff\xfe\x00bad")
    (policies / "bomb.yaml").write_text(LAUGHS)
    (policies / "keys.yaml").write_text("? [a]\n: {timeout: 5s}\n")
    document = {**VALID, "include": "policies/*.yaml"}
    error = check_loader(write(folder / "with-policies.yaml", document), load_config)
    assert error is not None
    files = {Path(p.file).name for p in error.problems}
    assert {"binary.yaml", "bomb.yaml", "keys.yaml"} <= files, error


@pytest.mark.parametrize(("path", "value"), [
    (("routes", 0, "timeout"), "9" * 400 + "s"),
    (("routes", 0, "cache", "ttl"), "9" * 320 + "d"),
    (("routes", 0, "cache", "memory", "max_bytes"), "9" * 400),
    (("routes", 0, "cache", "redis", "max_entry"), "9" * 400 + "GiB"),
    (("routes", 0, "rate_limit", "rate"), "9" * 400 + "/s"),
], ids=["duration", "duration in days", "size", "size with a unit", "rate"])
def test_numbers_past_floats_are_located_problems(folder: Path, path, value) -> None:
    """Infinite once read as a float: refused where they stand, not loaded as `inf`."""
    error = check_loader(write(folder / "numbers.yaml", set_at(VALID, path, value)), load_config)
    assert error is not None
    assert [p for p in error.problems if p.where.endswith(str(path[-1]))], error


def test_check_of_a_folder_or_a_missing_file(folder: Path) -> None:
    assert check_loader(folder, load_config) is not None
    assert check_cli(folder) == 1
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert sidecar_main(["check", "-c", str(folder / "missing.yaml")]) == 1
    assert "not found" in err.getvalue() and "Traceback" not in err.getvalue()
