"""Failover step actions: one module per family, each registering action kinds.

An action module ``watchdogd/actions/<family>.py`` defines::

    ACTIONS: dict[str, Callable[[Section], Action]]      # action name -> parser
    SECTION: str                                          # optional top-level config key
    def parse_section(section: Section) -> Any            # ... and its parser
    def check(config: Config) -> list[str]                # optional whole-config checks

An Action may also have ``async def ready(ctx, timeout) -> str`` (see ``Ready``): whether
the step's target is reachable, without side effects, for the readiness checks
(``watchdogd.readiness``); ``check_ready`` runs it bounded.

A parser reads the action's own keys from the step's Section (errors carry the
step's path) and returns an Action. Adding an action kind is adding a module;
nothing else changes. A module is imported only when the config names one of its
kinds or its section: its ``ACTIONS`` (a literal dict with string keys, on a line of
its own) and ``SECTION`` are read from its source; any other form still works, at
the cost of importing the module to read it.

This package also owns the step schema: the keys every step has
(``read_step_common``), the default steps, and the ``{placeholders}`` a step's strings
may use (checked by ``templated``, filled by ``StepContext.render``).
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import importlib
import importlib.abc
import importlib.util
import pkgutil
import re
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from types import ModuleType
from typing import Any, Protocol

from watchdogd.core.errors import WatchdogdError
from watchdogd.core.model import Config, NodeConfig, StepConfig
from watchdogd.core.secrets import mask_value
from watchdogd.core.section import Section, walk_strings
from watchdogd.engines import Engine, EngineError

DEFAULT_STEPS = (
    {"name": "stop_replication", "action": "stop_replication"},
    {"name": "promote", "action": "promote"},
)

# Placeholders a step's strings may use; rendered at failover time.
PLACEHOLDERS = frozenset(
    {"cluster", "primary.name", "standby.name", "reason", "failover_id", "trigger"}
)


class ActionError(WatchdogdError):
    """A step failed; the message is one clear line (secrets are masked by the caller)."""


def template_fields(text: str) -> set[str]:
    """Names of ``{placeholder}`` fields in a step string (``{{`` escapes)."""
    names: set[str] = set()
    for _, name, _, _ in string.Formatter().parse(text):
        if name is not None:
            names.add(name)
    return names


def render_template(text: str, values: Mapping[str, str]) -> str:
    """Fill ``{placeholder}`` fields; dotted names are plain keys, not attributes."""
    out: list[str] = []
    for literal, name, _, _ in string.Formatter().parse(text):
        out.append(literal)
        if name is not None:
            out.append(values.get(name, "{" + name + "}"))
    return "".join(out)


def templated(s: Section, key: str, value: object) -> None:
    """Check that every ``{placeholder}`` in ``value`` (recursively) is known."""
    for path, text in walk_strings(value, s.sub(key)):
        try:
            unknown = template_fields(text) - PLACEHOLDERS
        except ValueError as exc:
            s.errors.append(f"{path}: bad placeholder syntax ({exc}); write {{{{ for a brace")
            continue
        if unknown:
            s.errors.append(
                f"{path}: unknown placeholder {{{sorted(unknown)[0]}}}; "
                f"known: {', '.join('{' + p + '}' for p in sorted(PLACEHOLDERS))}"
            )


def read_step_common(s: Section) -> dict[str, Any]:
    """The keys every step has; the action's own keys are read by its module."""
    return {
        "name": s.str("name"),
        "action": s.str("action"),
        "timeout": s.duration("timeout", 30.0, minimum=0.01),
        "retries": s.int("retries", 0, minimum=0, maximum=100),
        "retry_delay": s.duration("retry_delay", 1.0),
        "required": s.bool("required", True),
        "idempotent": s.bool("idempotent", None),
    }


@dataclass
class StepContext:
    """Everything a step may use. Within a failover, ``primary`` is always the node
    being failed away from and ``standby`` the node being failed over to."""

    config: Config
    primary: NodeConfig
    standby: NodeConfig
    engines: Mapping[str, Engine]  # by node name
    failover_id: str
    reason: str
    trigger: str
    # Filled by the runner for actions that need it (switchover catch-up).
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def placeholders(self) -> dict[str, str]:
        return {
            "cluster": self.config.cluster,
            "primary.name": self.primary.name,
            "standby.name": self.standby.name,
            "reason": self.reason,
            "failover_id": self.failover_id,
            "trigger": self.trigger,
        }

    def render(self, value: Any) -> Any:
        """Fill ``{placeholders}`` in a string, or recursively in lists and mappings."""
        if isinstance(value, str):
            return render_template(value, self.placeholders)
        if isinstance(value, list | tuple):
            return [self.render(v) for v in value]
        if isinstance(value, Mapping):
            return {k: self.render(v) for k, v in value.items()}
        return value

    def engine(self, node: NodeConfig) -> Engine:
        return self.engines[node.name]


class Action(Protocol):
    # True when running the action again after an interrupted run is safe.
    idempotent: bool

    async def run(self, ctx: StepContext, timeout: float) -> str:
        """Do the step within ``timeout`` seconds; return a short detail, raise
        ActionError (or EngineError) with one clear line on failure."""
        ...

    def describe(self, ctx: StepContext) -> dict[str, Any]:
        """What ``run`` would do, fully rendered (secrets are masked by the caller)."""
        ...


class Ready(Protocol):
    """The optional readiness half of an Action."""

    async def ready(self, ctx: StepContext, timeout: float) -> str:
        """Whether ``run`` could reach its target now, changing nothing (a connection
        accepted, a read-only call answered, a program found) within ``timeout``
        seconds; return a short detail, raise ActionError with one line when not."""
        ...


async def check_ready(action: Action, ctx: StepContext, timeout: float) -> str:
    """Run an action's readiness check, bounded by ``timeout``; ActionError (one line,
    secrets masked) when its target is not reachable."""
    check = getattr(action, "ready", None)
    if check is None:
        return "this action has no readiness check"
    try:
        # A little beyond the action's own bound, so that its message (what it was
        # doing) wins the race; this one only stops a check that ignores its timeout.
        async with asyncio.timeout(timeout + min(timeout, 1.0)):
            detail: str = await check(ctx, timeout)
    except TimeoutError:
        raise ActionError(f"no answer within {timeout:g}s") from None
    except (ActionError, EngineError) as exc:
        raise ActionError(ctx.config.mask(str(exc))) from None
    return ctx.config.mask(detail)


@dataclass(frozen=True)
class _Declared:
    """What an action module declares, read from its source without importing it."""

    kinds: frozenset[str] | None  # None: not readable there (import the module to know)
    section: str | None
    has_check: bool


_ACTIONS_LINE = re.compile(r"^ACTIONS\b[^=\n]*=\s*(\{[^}]*\})", re.M)
_SECTION_LINE = re.compile(r"^SECTION\b[^=\n]*=\s*[\"'](\w+)[\"']", re.M)


def _declared(name: str) -> _Declared:
    """A module's kinds, section and check, read from its source: loading the modules
    (and their drivers: aiohttp, dnspython) a config never names costs memory for
    nothing. A module whose ACTIONS is not a literal dict is imported to be read."""
    spec = importlib.util.find_spec(f"{__name__}.{name}")
    try:
        assert spec is not None and isinstance(spec.loader, importlib.abc.InspectLoader)
        source = spec.loader.get_source(spec.name) or ""
    except (AssertionError, ImportError, OSError):
        source = ""
    found = _ACTIONS_LINE.search(source)
    kinds: frozenset[str] | None = None
    if found:
        with contextlib.suppress(SyntaxError):
            node = ast.parse(found.group(1), mode="eval").body
            if isinstance(node, ast.Dict) and all(
                isinstance(k, ast.Constant) and isinstance(k.value, str) for k in node.keys
            ):
                kinds = frozenset(str(k.value) for k in node.keys if isinstance(k, ast.Constant))
    if kinds is None:
        module = _module(name)
        return _Declared(
            frozenset(getattr(module, "ACTIONS", {})),
            getattr(module, "SECTION", None),
            hasattr(module, "check"),
        )
    section = _SECTION_LINE.search(source)
    return _Declared(
        kinds, section.group(1) if section else None, bool(re.search(r"^def check\(", source, re.M))
    )


@cache
def _index() -> dict[str, _Declared]:
    return {
        m.name: _declared(m.name)
        for m in pkgutil.iter_modules(__path__)
        if not m.name.startswith("_")
    }


def _module(name: str) -> ModuleType:
    return importlib.import_module(f"{__name__}.{name}")


def _kinds() -> dict[str, str]:
    """Every action kind and the module that registers it (nothing imported)."""
    return {kind: name for name, d in _index().items() for kind in d.kinds or ()}


def parser(kind: str) -> Callable[[Section], Action]:
    """The parser of one action kind, importing only the module that registers it."""
    found: Callable[[Section], Action] = _module(_kinds()[kind]).ACTIONS[kind]
    return found


def registry() -> dict[str, Callable[[Section], Action]]:
    """Every kind's parser (imports every action module: for listings, not for a run)."""
    return {kind: parser(kind) for kind in _kinds()}


def provider_sections() -> dict[str, Callable[[Section], Any]]:
    """Top-level config sections of action modules; a parser imports its module when a
    config has the section."""

    def lazy(name: str) -> Callable[[Section], Any]:
        return lambda s: _module(name).parse_section(s)

    return {d.section: lazy(name) for name, d in _index().items() if d.section}


def check_config(config: Config) -> list[str]:
    """Problems only visible with the whole config (e.g. a step needing a top-level
    section), one path-named line each: from the modules of the steps and sections the
    config uses."""
    kinds = _kinds()
    f = config.failover
    used = {kinds.get(s.action) for s in (*f.steps, *f.fence_steps, *f.rejoin_steps)}
    problems: list[str] = []
    for name, declared in _index().items():
        if declared.has_check and (name in used or declared.section in config.providers):
            problems.extend(_module(name).check(config))
    return problems


def validate_step(s: Section) -> StepConfig | None:
    """Parse one step: the common keys here, the action's own keys in its module."""
    common = read_step_common(s)
    kind = common["action"]
    kinds = _kinds()
    if isinstance(kind, str) and kind not in kinds:
        s.error(f"unknown action {kind!r}; known: {', '.join(sorted(kinds))}", "action")
        kind = None
    params: dict[str, Any] = {}
    if isinstance(kind, str):
        before = len(s.errors)
        parser(kind)(s)  # validates; the built action is thrown away
        params = {k: v for k, v in s.read_items().items() if k not in common}
        if len(s.errors) != before:
            kind = None
    s.finish()
    if kind is None or common["name"] is None:
        return None
    return StepConfig(params=params, **common)


def build(step: StepConfig, config: Config) -> Action:
    """The Action for a validated step (config has already checked it)."""
    errors: list[str] = []
    data = dict(step.params)
    section = Section(data, step.name, errors, set(config.secrets))
    section.templates = True
    action = parser(step.action)(section)
    if errors:  # cannot happen for a validated config; fail loudly if it does
        raise ActionError("; ".join(errors))
    return action


def describe(step: StepConfig, action: Action, ctx: StepContext) -> dict[str, Any]:
    """A step as a dry run shows it: common fields plus the action's rendering, masked."""
    described = {
        "name": step.name,
        "action": step.action,
        "timeout": step.timeout,
        "retries": step.retries,
        "required": step.required,
        **action.describe(ctx),
    }
    return dict(mask_value(described, ctx.config.secrets))
