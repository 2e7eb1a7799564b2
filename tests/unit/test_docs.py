"""The manual against the code: the events the observability page lists are exactly the
events the daemon knows (with their log level and whether webhooks get them), and the keys
the configuration reference lists are exactly the keys the config parser reads.

Both sides are found without naming modules that are being moved: the event registry is
imported from wherever it lives, and config keys are read off the source of the whole
``watchdogd`` package (every call of a ``Section`` getter with a literal key, found with
``ast``), so the test keeps working when the parser moves between modules.
"""

from __future__ import annotations

import ast
import importlib
import re
import unicodedata
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import watchdogd

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PACKAGE = Path(watchdogd.__file__).resolve().parent

# Where the event registry may live (it is moving towards watchdogd/core/).
EVENT_MODULES = ("watchdogd.core.events",)


# --------------------------------------------------------------------------- markdown


def table_rows(markdown: str, first_header: str) -> Iterator[list[str]]:
    """The body rows (as cells) of every pipe table whose first header cell is
    ``first_header``."""
    lines = markdown.splitlines()
    i = 0
    while i < len(lines) - 1:
        line = lines[i].strip()
        is_table = (
            line.startswith("|") and re.fullmatch(r"\|?[\s:|-]+\|?", lines[i + 1].strip() or "x")
        ) is not None
        if is_table and cells(line)[0].strip("`* ").lower() == first_header:
            i += 2
            while i < len(lines) and lines[i].strip().startswith("|"):
                yield cells(lines[i])
                i += 1
            continue
        i += 1


def cells(line: str) -> list[str]:
    line = line.strip()
    line = line[1:] if line.startswith("|") else line
    line = line[:-1] if line.endswith("|") else line
    return [c.strip() for c in re.split(r"(?<!\\)\|", line)]


def code_spans(text: str) -> list[str]:
    return re.findall(r"`([^`]+)`", text)


# --------------------------------------------------------------------------- events


def event_specs() -> Mapping[str, Any]:
    for name in EVENT_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError:
            continue
        specs: Mapping[str, Any] = module.SPECS
        return specs
    raise AssertionError(f"no event registry (SPECS) in any of {', '.join(EVENT_MODULES)}")


@dataclass(frozen=True)
class DocumentedEvent:
    level: str
    webhook: str


def documented_events() -> dict[str, DocumentedEvent]:
    text = (DOCS / "observability.md").read_text()
    events: dict[str, DocumentedEvent] = {}
    for row in table_rows(text, "event"):
        names = code_spans(row[0])
        assert len(names) == 1, f"observability.md: one event per row, got {row[0]!r}"
        assert names[0] not in events, f"observability.md: event {names[0]} listed twice"
        events[names[0]] = DocumentedEvent(level=row[1].strip("` "), webhook=row[2].strip("` "))
    return events


def webhook_column(notify: str) -> str:
    # The registry's Notify values as the page shows them.
    return {"yes": "yes", "no": "no", "unlisted": "always"}[notify]


def test_the_documented_events_are_exactly_the_registered_ones() -> None:
    code = event_specs()
    docs = documented_events()
    assert docs, "observability.md has no table whose first column is 'event'"
    undocumented = sorted(set(code) - set(docs))
    unknown = sorted(set(docs) - set(code))
    wrong: list[str] = []
    for name in sorted(set(code) & set(docs)):
        spec, doc = code[name], docs[name]
        level, webhook = str(spec.level.value), webhook_column(str(spec.notify.value))
        if doc.level != level:
            wrong.append(f"{name}: level is {level}, the page says {doc.level}")
        if doc.webhook != webhook:
            wrong.append(f"{name}: webhook column should be {webhook}, the page says {doc.webhook}")
    problems = [
        *(f"not in docs/observability.md: {n}" for n in undocumented),
        *(f"documented but not an event the code knows: {n}" for n in unknown),
        *wrong,
    ]
    assert not problems, "events, docs against code:\n  " + "\n  ".join(problems)


# --------------------------------------------------------------------------- config keys


def section_getters(trees: Mapping[Path, ast.Module]) -> set[str]:
    """The methods of class ``Section`` that read a key: their first parameter is ``key``
    and they call ``self._get`` or another such method. Found, not listed, so a getter
    added to the reader is picked up here too."""
    methods: dict[str, set[str]] = {}
    for tree in trees.values():
        for cls in ast.walk(tree):
            if not (isinstance(cls, ast.ClassDef) and cls.name == "Section"):
                continue
            for fn in cls.body:
                if not isinstance(fn, ast.FunctionDef):
                    continue
                params = [a.arg for a in fn.args.args]
                if params[:2] != ["self", "key"]:
                    continue
                calls = methods.setdefault(fn.name, set())
                for node in ast.walk(fn):
                    if (
                        isinstance(node, ast.Call)
                        and isinstance(node.func, ast.Attribute)
                        and isinstance(node.func.value, ast.Name)
                        and node.func.value.id == "self"
                    ):
                        calls.add(node.func.attr)
    assert methods, "no class Section with key getters in the watchdogd package"
    getters = {"_get"}
    while True:
        more = {name for name, calls in methods.items() if calls & getters} - getters
        if not more:
            return getters - {"_get"}
        getters |= more


@dataclass
class KeyScan:
    keys: dict[str, list[str]] = field(default_factory=dict)  # key -> where it is read

    def add(self, key: str, where: str) -> None:
        self.keys.setdefault(key, []).append(where)


def _literal_strings(node: ast.expr) -> list[str] | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    return None


def _loop_values(fn: ast.AST) -> dict[str, list[str]]:
    """Names bound by ``for x in ("a", "b")`` (or a comprehension over such a literal)
    inside ``fn``: a key read through ``x`` is each of those strings."""
    values: dict[str, list[str]] = {}
    for node in ast.walk(fn):
        targets: list[tuple[ast.expr, ast.expr]] = []
        if isinstance(node, ast.For):
            targets.append((node.target, node.iter))
        elif isinstance(node, ast.comprehension):
            targets.append((node.target, node.iter))
        for target, it in targets:
            if isinstance(target, ast.Name) and isinstance(it, ast.Tuple | ast.List | ast.Set):
                items = [e.value for e in it.elts if isinstance(e, ast.Constant)]
                strings = [v for v in items if isinstance(v, str)]
                if strings and len(strings) == len(it.elts):
                    values.setdefault(target.id, []).extend(strings)
    return values


def parser_keys() -> KeyScan:
    """Every key the config parser reads, from the package source: literal keys passed to
    a Section getter (``s.duration("timeout", ...)``), or to a helper that hands its own
    parameter on as the key (``_url(w, "url")``, ``_uid(s, "stack")``), or taken from a
    literal tuple a loop runs over. ``secret(key)`` also reads ``<key>_file``. Sections
    named by a registry (an action family's top-level section) are asked for at run time."""
    trees = {path: ast.parse(path.read_text(), str(path)) for path in sorted(PACKAGE.rglob("*.py"))}
    getters = section_getters(trees)

    # callable name -> positions of the arguments that are keys. Getters are methods
    # (``s.str("key")``: argument 0); helpers are functions that pass one of their own
    # parameters on as a key (``_url(s, "url")``: argument 1), found until none is new.
    getter_args: dict[str, set[int]] = {name: {0} for name in getters}
    helpers: dict[str, set[int]] = {}
    changed = True
    while changed:
        changed = False
        for tree in trees.values():
            for fn in ast.walk(tree):
                if not isinstance(fn, ast.FunctionDef) or fn.name in getters:
                    continue
                params = [a.arg for a in fn.args.args]
                skip = 1 if params[:1] in (["self"], ["cls"]) else 0
                for call in ast.walk(fn):
                    if not isinstance(call, ast.Call):
                        continue
                    for pos in _key_positions(call, getter_args, helpers):
                        arg = _arg(call, pos)
                        if isinstance(arg, ast.Name) and arg.id in params[skip:]:
                            index = params.index(arg.id) - skip
                            if index not in helpers.setdefault(fn.name, set()):
                                helpers[fn.name].add(index)
                                changed = True

    scan = KeyScan()
    for path, tree in trees.items():
        seen: set[int] = set()
        scopes: list[ast.AST] = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]
        for scope in [*scopes, tree]:  # functions first: their loops bind names
            bound = _loop_values(scope) if scope is not tree else {}
            for call in ast.walk(scope):
                if not isinstance(call, ast.Call) or id(call) in seen:
                    continue
                seen.add(id(call))
                for pos in _key_positions(call, getter_args, helpers):
                    arg = _arg(call, pos)
                    if arg is None:
                        continue
                    found = _literal_strings(arg)
                    if found is None and isinstance(arg, ast.Name):
                        found = bound.get(arg.id)
                    where = f"{path.relative_to(PACKAGE.parent)}:{call.lineno}"
                    for key in found or ():
                        scan.add(key, where)
                        if _callee(call) == "secret":
                            scan.add(f"{key}_file", where)

    actions = importlib.import_module("watchdogd.actions")
    for section in actions.provider_sections():
        scan.add(section, "watchdogd.actions.provider_sections()")
    return scan


def _callee(call: ast.Call) -> str | None:
    if isinstance(call.func, ast.Attribute):
        return call.func.attr
    if isinstance(call.func, ast.Name):
        return call.func.id
    return None


def _key_positions(
    call: ast.Call, getter_args: Mapping[str, set[int]], helpers: Mapping[str, set[int]]
) -> set[int]:
    name = _callee(call)
    if name is None:
        return set()
    # Getters only as methods: a bare ``str("x")`` is the builtin.
    if isinstance(call.func, ast.Attribute) and name in getter_args:
        return getter_args[name]
    return helpers.get(name, set())


def _arg(call: ast.Call, pos: int) -> ast.expr | None:
    return call.args[pos] if pos < len(call.args) else None


def documented_keys() -> dict[str, list[str]]:
    """Key -> the tables of docs/configuration.md that list it: every code span in the
    first column of a table whose first header is ``key``."""
    text = (DOCS / "configuration.md").read_text()
    keys: dict[str, list[str]] = {}
    heading = "top"
    for block in text.split("\n\n"):
        if block.lstrip().startswith("#"):
            heading = block.strip().splitlines()[0].lstrip("# ").strip()
        for row in table_rows(block, "key"):
            for span in code_spans(row[0]):
                keys.setdefault(span, []).append(heading)
    return keys


def test_the_documented_config_keys_are_exactly_the_parsed_ones() -> None:
    code = parser_keys().keys
    docs = documented_keys()
    assert docs, "configuration.md has no table whose first column is 'key'"
    undocumented = sorted(set(code) - set(docs))
    unknown = sorted(set(docs) - set(code))
    problems = [
        *(
            f"not in docs/configuration.md: {k} (read at {', '.join(code[k])})"
            for k in undocumented
        ),
        *(
            f"documented (under {', '.join(docs[k])}) but never read by the parser: {k}"
            for k in unknown
        ),
    ]
    assert not problems, "config keys, docs against code:\n  " + "\n  ".join(problems)


def test_the_key_scan_sees_the_parser() -> None:
    """Guards the scan itself: keys read in each way it knows are found."""
    keys = parser_keys().keys
    expected = {
        "outage_threshold",  # a getter with a literal key
        "password_file",  # secret("password") also reads password_file
        "health_url",  # through the _url(section, key) helper
        "deactivate",  # through haproxy's _names(section, key, what) helper
        "primary",  # through a loop over ("primary", "standby")
        "standby",
        "cloud66",  # a provider section, from the actions registry
    }
    assert expected <= set(keys), f"the scan missed {sorted(expected - set(keys))}"


# --------------------------------------------------------------------------- README links


def slug(heading: str) -> str:
    """The anchor Python-Markdown's toc (as MkDocs uses it) gives a heading."""
    text = unicodedata.normalize("NFKD", re.sub(r"`|\*", "", heading))
    text = re.sub(r"[^\w\s-]", "", text.encode("ascii", "ignore").decode()).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(markdown: str) -> set[str]:
    text = re.sub(r"```.*?```", "", markdown, flags=re.S)  # no headings in code
    return {slug(m) for m in re.findall(r"^#{1,6}\s+(.+?)\s*$", text, flags=re.M)}


def test_the_readme_links_lead_somewhere() -> None:
    """``mkdocs build --strict`` checks the links inside docs/; the README is not part of
    the site, so its relative links (and their anchors) are checked here."""
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", readme)
    broken: list[str] = []
    for link in links:
        if re.match(r"[a-z]+:", link):
            continue
        path, _, anchor = link.partition("#")
        target = ROOT / path if path else ROOT / "README.md"
        if not target.exists():
            broken.append(f"{link}: no such file")
        elif anchor and anchor not in anchors(target.read_text()):
            broken.append(f"{link}: no heading with anchor #{anchor}")
    assert links, "the README links to nothing"
    assert not broken, "README links:\n  " + "\n  ".join(broken)
