"""Failover step actions: one module per family, each registering action kinds.

An action module ``watchdogd/actions/<family>.py`` defines::

    ACTIONS: dict[str, Callable[[Section], Action]]      # action name -> parser
    SECTION: str                                          # optional top-level config key
    def parse_section(section: Section) -> Any            # ... and its parser
    def check(config: Config) -> list[str]                # optional whole-config checks

A parser reads the action's own keys from the step's Section (errors carry the
step's path) and returns an Action. Adding an action kind is adding a module;
nothing else changes.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol

from watchdogd.config import StepConfig, mask_value, read_step_common, render_template

if TYPE_CHECKING:
    from watchdogd.config import Config, NodeConfig, Section
    from watchdogd.engines import Engine


class ActionError(Exception):
    """A step failed; the message is one clear line (secrets are masked by the caller)."""


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


@cache
def _modules() -> tuple[ModuleType, ...]:
    return tuple(
        importlib.import_module(f"{__name__}.{m.name}")
        for m in pkgutil.iter_modules(__path__)
        if not m.name.startswith("_")
    )


def registry() -> dict[str, Callable[[Section], Action]]:
    kinds: dict[str, Callable[[Section], Action]] = {}
    for module in _modules():
        kinds.update(getattr(module, "ACTIONS", {}))
    return kinds


def provider_sections() -> dict[str, Callable[[Section], Any]]:
    return {m.SECTION: m.parse_section for m in _modules() if hasattr(m, "SECTION")}


def check_config(config: Config) -> list[str]:
    """Problems only visible with the whole config (e.g. a step needing a top-level
    section), one path-named line each."""
    problems: list[str] = []
    for module in _modules():
        if hasattr(module, "check"):
            problems.extend(module.check(config))
    return problems


def validate_step(s: Section) -> StepConfig | None:
    """Parse one step: the common keys here, the action's own keys in its module."""
    common = read_step_common(s)
    kind = common["action"]
    kinds = registry()
    if isinstance(kind, str) and kind not in kinds:
        s.error(f"unknown action {kind!r}; known: {', '.join(sorted(kinds))}", "action")
        kind = None
    params: dict[str, Any] = {}
    if isinstance(kind, str):
        before = len(s.errors)
        kinds[kind](s)  # validates; the built action is thrown away
        params = {k: v for k, v in s.read_items().items() if k not in common}
        if len(s.errors) != before:
            kind = None
    s.finish()
    if kind is None or common["name"] is None:
        return None
    return StepConfig(params=params, **common)


def build(step: StepConfig, config: Config) -> Action:
    """The Action for a validated step (config has already checked it)."""
    from watchdogd.config import Section

    errors: list[str] = []
    data = dict(step.params)
    section = Section(data, step.name, errors, set(config.secrets))
    section.templates = True
    action = registry()[step.action](section)
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
