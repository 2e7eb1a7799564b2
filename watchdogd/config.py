"""Configuration: YAML in, frozen dataclasses out.

Owns the config contract (key names other issues, the README and tests rely on),
the parsing of durations and sizes, secret resolution (``${ENV_VAR}`` and
``*_file`` keys) and validation. Every problem is reported as one line naming
its path, e.g. ``failover.steps[2].timeout: expected a duration like 5s, got 'soon'``,
and all problems are collected before giving up, so one run shows them all.
"""

from __future__ import annotations

import builtins
import json
import os
import re
import string
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_STEPS = (
    {"name": "stop_replication", "action": "stop_replication"},
    {"name": "promote", "action": "promote"},
)

# Placeholders a step's strings may use; rendered at failover time.
PLACEHOLDERS = frozenset(
    {"cluster", "primary.name", "standby.name", "reason", "failover_id", "trigger"}
)


class ConfigError(Exception):
    """The config is invalid; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


# --------------------------------------------------------------------------- values

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|kB|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?\s*$")
_SIZE_UNITS = {
    None: 1,
    "B": 1,
    "kB": 10**3,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
    "TiB": 2**40,
}
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# Masking replaces text; a secret this short would mangle every reply and log line,
# and leaving it unmasked would show it. Config refuses such secrets instead.
MIN_SECRET = 3
# Paths systemd gives the service (``${CREDENTIALS_DIRECTORY}/pg-password``): not secrets,
# so not masked, and problems naming them show the path itself.
PATH_ENV = frozenset({"CREDENTIALS_DIRECTORY", "RUNTIME_DIRECTORY", "STATE_DIRECTORY"})
# A config is a few kilobytes. The caps stop a YAML alias bomb ("billion laughs"):
# aliases make shared references, and walking them would expand to billions of nodes.
MAX_CONFIG_BYTES = 1024 * 1024
MAX_CONFIG_NODES = 100_000


def parse_duration(value: Any) -> float:
    """``"250ms"`` → 0.25. Raises ValueError for anything else (bare numbers too:
    ``5`` could mean seconds or milliseconds, so the unit is required)."""
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    raise ValueError(f"expected a duration like 5s, got {value!r}")


def parse_size(value: Any) -> int:
    """``"16MB"`` → 16_000_000, ``"1GiB"`` → 1_073_741_824, ``4096`` → 4096."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            return int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])
    raise ValueError(f"expected a size like 16MB, got {value!r}")


def format_duration(seconds: float) -> str:
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    return f"{seconds:g}s"


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


# --------------------------------------------------------------------------- reader


_REQUIRED: Any = object()


class Section:
    """A mapping being read at ``path``: typed getters that record errors instead of
    raising, and ``finish()`` which reports every key nobody asked for.

    Action and engine modules receive a Section for their own keys, so their
    errors carry the same paths as the core's.
    """

    def __init__(
        self,
        data: Any,
        path: str,
        errors: list[str],
        secrets: set[str],
        env_refs: dict[str, str] | None = None,
    ) -> None:
        self.path = path
        self.errors = errors
        self.secrets = secrets
        # Resolved ``${VAR}`` value -> "${VAR}", shared by child sections: problems are
        # reported with the reference, never the value (see ``unresolve``).
        self.env_refs: dict[str, str] = env_refs if env_refs is not None else {}
        # A step's strings are templates: a ``${VAR}`` value with a brace would be read
        # as a placeholder (and change, and then escape masking), so it is refused.
        self.templates = False
        self.ok = isinstance(data, Mapping)
        if not self.ok and data is not None:
            self.error(f"expected a mapping, got {_kind(data)}")
        self._data: dict[str, Any] = dict(data) if isinstance(data, Mapping) else {}
        self._seen: set[str] = set()

    # -- plumbing
    def sub(self, key: str | int) -> str:
        if isinstance(key, int):
            return f"{self.path}[{key}]"
        return f"{self.path}.{key}" if self.path else key

    def error(self, message: str, key: str | int | None = None) -> None:
        where = self.sub(key) if key is not None else (self.path or "config")
        self.errors.append(f"{where}: {message}")

    def has(self, key: str) -> bool:
        return key in self._data

    def keys(self) -> list[str]:
        return list(self._data)

    def read_items(self) -> dict[str, Any]:
        """The keys read so far with their raw values (``${ENV}`` unresolved)."""
        return {k: self._data[k] for k in self._seen if k in self._data}

    def _get(self, key: str, default: Any) -> Any:
        self._seen.add(key)
        if key in self._data and self._data[key] is not None:
            return self._data[key]
        if default is _REQUIRED:
            self.error("is required", key)
            return None
        return default

    def finish(self) -> None:
        for key in self._data:
            if key not in self._seen:
                self.error("unknown key", str(key))

    # -- typed getters
    def raw(self, key: str, default: Any = None) -> Any:
        return self._resolve_env(self._get(key, default), self.sub(key))

    def str(self, key: str, default: Any = _REQUIRED, *, allow_empty: bool = False) -> Any:
        value = self._get(key, default)
        if value is None or value is default:
            return value
        if not isinstance(value, str):
            self.error(f"expected a string, got {_kind(value)}", key)
            return default if default is not _REQUIRED else None
        value = self._resolve_env(value, self.sub(key))
        if not allow_empty and not value:
            self.error("must not be empty", key)
        return value

    def secret(
        self, key: builtins.str, default: Any = None, *, required: builtins.bool = False
    ) -> Any:
        """A secret given inline (usually ``${ENV}``) or as ``<key>_file``."""
        file_key = f"{key}_file"
        inline = self.str(key, None, allow_empty=True)
        path = self.str(file_key, None)
        if inline is not None and path is not None:
            self.error(f"give either {key} or {file_key}, not both")
            return default
        if path is not None:
            try:
                inline = Path(path).read_text().strip()
            except OSError as exc:
                self.error(f"cannot read {path}: {exc.strerror}", file_key)
                return default
            if not inline:
                self.error(f"{path} is empty", file_key)
        if inline:
            if len(inline) < MIN_SECRET:
                where = file_key if path is not None else key
                self.error(
                    f"a secret shorter than {MIN_SECRET} characters cannot be masked; "
                    "use a longer one",
                    where,
                )
                return default
            self.secrets.add(inline)
            return inline
        if required:
            self.error(f"is required (or {file_key})", key)
        return default

    def duration(self, key: builtins.str, default: Any = _REQUIRED, *, minimum: float = 0.0) -> Any:
        value = self._get(key, default)
        if value is None or value is default:
            return value
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            self.error(str(exc), key)
            return default if default is not _REQUIRED else None
        if seconds < minimum:
            self.error(f"must be at least {format_duration(minimum)}, got {value!r}", key)
        return seconds

    def size(self, key: builtins.str, default: Any = _REQUIRED) -> Any:
        value = self._get(key, default)
        if value is None or value is default:
            return value
        try:
            return parse_size(value)
        except ValueError as exc:
            self.error(str(exc), key)
            return default if default is not _REQUIRED else None

    def int(
        self,
        key: builtins.str,
        default: Any = _REQUIRED,
        *,
        minimum: builtins.int | None = None,
        maximum: builtins.int | None = None,
    ) -> Any:
        value = self._get(key, default)
        if value is None or value is default:
            return value
        if not isinstance(value, int) or isinstance(value, bool):
            self.error(f"expected an integer, got {value!r}", key)
            return default if default is not _REQUIRED else None
        if minimum is not None and value < minimum:
            self.error(f"must be at least {minimum}, got {value}", key)
        if maximum is not None and value > maximum:
            self.error(f"must be at most {maximum}, got {value}", key)
        return value

    def bool(self, key: builtins.str, default: Any = _REQUIRED) -> Any:
        value = self._get(key, default)
        if value is None or value is default:
            return value
        if not isinstance(value, bool):
            self.error(f"expected true or false, got {value!r}", key)
            return default if default is not _REQUIRED else None
        return value

    def choice(
        self, key: builtins.str, choices: tuple[builtins.str, ...], default: Any = _REQUIRED
    ) -> Any:
        value = self.str(key, default)
        if value is not None and value is not default and value not in choices:
            self.error(f"expected one of {', '.join(choices)}, got {value!r}", key)
            return default if default is not _REQUIRED else None
        return value

    def str_list(self, key: builtins.str, default: Any = _REQUIRED) -> Any:
        value = self._get(key, default)
        if value is None or value is default:
            return value
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.error(f"expected a list of strings, got {_kind(value)}", key)
            return default if default is not _REQUIRED else None
        return [self._resolve_env(v, f"{self.sub(key)}[{i}]") for i, v in enumerate(value)]

    def str_map(self, key: builtins.str) -> dict[builtins.str, builtins.str]:
        value = self._get(key, None)
        if value is None:
            return {}
        if not isinstance(value, Mapping) or not all(
            isinstance(k, str) and isinstance(v, (str, int, float)) for k, v in value.items()
        ):
            self.error(f"expected a mapping of strings, got {_kind(value)}", key)
            return {}
        return {k: self._resolve_env(str(v), f"{self.sub(key)}.{k}") for k, v in value.items()}

    def section(self, key: builtins.str, *, required: builtins.bool = False) -> Section | None:
        value = self._get(key, _REQUIRED if required else None)
        if value is None:
            return None
        child = Section(value, self.sub(key), self.errors, self.secrets, self.env_refs)
        child.templates = self.templates
        return child

    def sections(self, key: builtins.str) -> Iterator[Section]:
        value = self._get(key, None)
        if value is None:
            return
        if not isinstance(value, list):
            self.error(f"expected a list, got {_kind(value)}", key)
            return
        for i, item in enumerate(value):
            child = Section(item, f"{self.sub(key)}[{i}]", self.errors, self.secrets, self.env_refs)
            child.templates = self.templates
            yield child

    def templated(self, key: builtins.str, value: Any) -> None:
        """Check that every ``{placeholder}`` in ``value`` (recursively) is known."""
        for path, text in _walk_strings(value, self.sub(key)):
            try:
                unknown = template_fields(text) - PLACEHOLDERS
            except ValueError as exc:
                self.errors.append(
                    f"{path}: bad placeholder syntax ({exc}); write {{{{ for a brace"
                )
                continue
            if unknown:
                self.errors.append(
                    f"{path}: unknown placeholder {{{sorted(unknown)[0]}}}; "
                    f"known: {', '.join('{' + p + '}' for p in sorted(PLACEHOLDERS))}"
                )

    def _resolve_env(self, value: Any, path: builtins.str) -> Any:
        if isinstance(value, str):

            def sub(m: re.Match[builtins.str]) -> builtins.str:
                name = m.group(1)
                if name not in os.environ:
                    self.errors.append(f"{path}: environment variable {name} is not set")
                    return ""
                resolved = os.environ[name]
                if name in PATH_ENV:
                    return resolved
                if 0 < len(resolved) < MIN_SECRET:
                    # Every ${VAR} value is masked as a secret; one this short cannot be.
                    self.errors.append(
                        f"{path}: environment variable {name} is shorter than {MIN_SECRET} "
                        "characters; values read from the environment are masked as secrets "
                        "and one this short cannot be"
                    )
                    return ""
                if self.templates and ("{" in resolved or "}" in resolved):
                    self.errors.append(
                        f"{path}: environment variable {name} contains a brace, which a "
                        "step would read as a {placeholder}; use a value without braces"
                    )
                    return ""
                if resolved:
                    self.secrets.add(resolved)
                    self.env_refs.setdefault(resolved, "${" + name + "}")
                return resolved

            return _ENV_REF.sub(sub, value)
        if isinstance(value, list):
            return [self._resolve_env(v, f"{path}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, Mapping):
            return {k: self._resolve_env(v, f"{path}.{k}") for k, v in value.items()}
        return value


def _kind(value: Any) -> str:
    return {
        dict: "a mapping",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "nothing",
    }.get(type(value), type(value).__name__)


def _walk_strings(value: Any, path: str) -> Iterator[tuple[str, str]]:
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _walk_strings(v, f"{path}[{i}]")
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from _walk_strings(v, f"{path}.{k}")


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class DatabaseConfig:
    engine: str
    dsn: str
    # Engine-specific keys, already validated by the engine module.
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AppConfig:
    health_url: str
    expect_status: tuple[int, ...] = ()  # empty: any 2xx
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class NodeConfig:
    name: str
    database: DatabaseConfig
    app: AppConfig | None = None


@dataclass(frozen=True)
class ProbeConfig:
    interval: float = 1.0
    timeout: float = 0.5
    recovery_successes: int = 3


@dataclass(frozen=True)
class StepConfig:
    name: str
    action: str
    timeout: float = 30.0
    retries: int = 0
    retry_delay: float = 1.0
    required: bool = True
    # None: the action's own default (see each action's ``idempotent``).
    idempotent: bool | None = None
    # Action-specific keys, validated by the action module (raw, placeholders unrendered).
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FailoverConfig:
    mode: str = "automatic"
    outage_threshold: float = 30.0
    max_lag: int = 16 * 10**6
    max_lag_seconds: float | None = None
    cooldown: float = 3600.0
    trigger_on: frozenset[str] = frozenset({"database", "app"})
    catchup_timeout: float = 30.0
    steps: tuple[StepConfig, ...] = ()
    fence_steps: tuple[StepConfig, ...] = ()


@dataclass(frozen=True)
class WitnessConfig:
    name: str
    url: str
    timeout: float | None = None


@dataclass(frozen=True)
class MetricsConfig:
    host: str = "127.0.0.1"
    port: int = 9644
    enabled: bool = True


@dataclass(frozen=True)
class ControlConfig:
    socket: str = "/run/watchdogd/control.sock"
    mode: int = 0o660
    # The socket's group (None: the daemon's own). Operators join this group to use
    # watchdogctl without joining the daemon's group, which can read its secrets.
    group: str | None = None
    allow_users: tuple[str, ...] = ()
    allow_groups: tuple[str, ...] = ()
    read_groups: tuple[str, ...] = ()


@dataclass(frozen=True)
class LogConfig:
    format: str = "auto"  # auto | json | console
    level: str = "info"


@dataclass(frozen=True)
class WebhookConfig:
    url: str
    headers: Mapping[str, str] = field(default_factory=dict)
    events: frozenset[str] = frozenset()  # empty: every event
    timeout: float = 5.0


@dataclass(frozen=True)
class Config:
    cluster: str
    primary: NodeConfig
    standby: NodeConfig
    probe: ProbeConfig = ProbeConfig()
    failover: FailoverConfig = FailoverConfig()
    witnesses: tuple[WitnessConfig, ...] = ()
    metrics: MetricsConfig = MetricsConfig()
    control: ControlConfig = ControlConfig()
    log: LogConfig = LogConfig()
    webhooks: tuple[WebhookConfig, ...] = ()
    state_dir: str = "/var/lib/watchdogd"
    # Top-level sections owned by action modules (e.g. ``cloud66``), parsed by them.
    providers: Mapping[str, Any] = field(default_factory=dict)
    # Every resolved secret value: masked wherever text leaves the daemon.
    secrets: frozenset[str] = frozenset()
    source: str | None = None

    def node(self, name: str) -> NodeConfig:
        for node in (self.primary, self.standby):
            if node.name == name:
                return node
        raise KeyError(name)

    @property
    def nodes(self) -> tuple[NodeConfig, NodeConfig]:
        return (self.primary, self.standby)

    def mask(self, text: str) -> str:
        return mask(text, self.secrets)


def mask(text: str, secrets: frozenset[str] | set[str]) -> str:
    """``text`` with every secret replaced by ``***``, also in the forms a secret takes
    inside a URL (percent-encoded) or a JSON string (escaped), where echoes show it."""
    for form in _forms(secrets):
        text = text.replace(form, "***")
    return text


def _forms(secrets: frozenset[str] | set[str]) -> list[str]:
    forms: set[str] = set()
    for secret in secrets:
        if len(secret) < MIN_SECRET:
            continue  # config refuses these; masking them would mangle every text
        forms.add(secret)
        forms.add(urllib.parse.quote(secret, safe=""))
        forms.add(urllib.parse.quote_plus(secret, safe=""))
        forms.add(urllib.parse.quote(secret))
        forms.add(json.dumps(secret)[1:-1])
        forms.add(json.dumps(secret, ensure_ascii=False)[1:-1])
    # Longest first, so a secret containing another is masked whole.
    return sorted(forms, key=len, reverse=True)


def unresolve(problems: list[str], env_refs: Mapping[str, str], secrets: set[str]) -> list[str]:
    """Problems as the operator wrote the config: ``${VAR}`` instead of its value, and
    ``***`` for any other secret (a ``*_file``'s contents)."""
    out = []
    for problem in problems:
        for secret in sorted(secrets | set(env_refs), key=len, reverse=True):
            if len(secret) >= MIN_SECRET:
                problem = problem.replace(secret, env_refs.get(secret, "***"))
        out.append(mask(problem, secrets))
    return out


def mask_value(value: Any, secrets: frozenset[str] | set[str]) -> Any:
    """``value`` with every string in it masked, mapping keys included (a key can quote
    a secret as well as a value can)."""
    if isinstance(value, str):
        return mask(value, secrets)
    if isinstance(value, list | tuple | set | frozenset):
        return [mask_value(v, secrets) for v in value]
    if isinstance(value, Mapping):
        return {
            (mask(k, secrets) if isinstance(k, str) else k): mask_value(v, secrets)
            for k, v in value.items()
        }
    return value


# --------------------------------------------------------------------------- parsing


def load(path: str | os.PathLike[str]) -> Config:
    """Read and validate a config file; raises ConfigError with every problem."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read config: {exc.strerror}"]) from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError([f"{path}: config is larger than {MAX_CONFIG_BYTES // 1024} KiB"])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: config is not valid UTF-8"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError([f"{path}: not valid YAML{line}: {problem}"]) from None
    except RecursionError:
        raise ConfigError([f"{path}: not valid YAML: nested too deeply"]) from None
    if _too_many_nodes(data, MAX_CONFIG_NODES):
        raise ConfigError(
            [
                f"{path}: config expands to more than {MAX_CONFIG_NODES} values "
                "(YAML aliases repeating aliases?); write it out plainly"
            ]
        )
    return parse(data, source=str(path))


def _too_many_nodes(data: Any, limit: int) -> bool:
    """Whether ``data`` has more than ``limit`` values, counting each alias use again.

    Iterative and stopping at ``limit``, so a bomb costs ``limit`` steps, not billions."""
    stack = [data]
    seen = 0
    while stack:
        value = stack.pop()
        seen += 1
        if seen > limit:
            return True
        if isinstance(value, Mapping):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return False


def parse(data: Any, source: str | None = None) -> Config:
    from watchdogd import actions, engines  # registries import this module

    errors: list[str] = []
    secrets: set[str] = set()
    env_refs: dict[str, str] = {}
    if not isinstance(data, Mapping):
        raise ConfigError([f"config: expected a mapping at the top level, got {_kind(data)}"])
    root = Section(data, "", errors, secrets, env_refs)

    cluster = root.str("cluster")
    if isinstance(cluster, str) and not re.fullmatch(r"[A-Za-z0-9_.-]+", cluster):
        root.error("use letters, digits, '.', '_' or '-'", "cluster")

    nodes = [_node(root, role, engines.validate_database) for role in ("primary", "standby")]
    if nodes[0] and nodes[1] and nodes[0].name == nodes[1].name:
        root.error(f"must differ from primary.name ({nodes[0].name!r})", "standby")

    probe = ProbeConfig()
    if (p := root.section("probe")) is not None:
        probe = ProbeConfig(
            interval=p.duration("interval", 1.0, minimum=0.05),
            timeout=p.duration("timeout", 0.5, minimum=0.01),
            recovery_successes=p.int("recovery_successes", 3, minimum=1, maximum=100),
        )
        p.finish()
        if probe.timeout >= probe.interval:
            p.error(
                f"must be shorter than probe.interval ({format_duration(probe.interval)})",
                "timeout",
            )

    failover = _failover(root, actions.validate_step)
    if failover.outage_threshold < probe.interval:
        root.error("must be at least probe.interval", "failover.outage_threshold")

    witnesses: list[WitnessConfig] = []
    for w in root.sections("witnesses"):
        witnesses.append(
            WitnessConfig(
                name=w.str("name", f"witness{len(witnesses) + 1}"),
                url=_url(w, "url"),
                timeout=w.duration("timeout", None),
            )
        )
        w.finish()

    metrics = MetricsConfig()
    if (m := root.section("metrics")) is not None:
        enabled = m.bool("enabled", True)
        listen = m.str("listen", "127.0.0.1:9644")
        host, port = _host_port(m, "listen", listen)
        metrics = MetricsConfig(host=host, port=port, enabled=enabled)
        m.finish()

    control = ControlConfig()
    if (c := root.section("control")) is not None:
        mode_text = c.str("mode", "0660")
        mode = 0o660
        if isinstance(mode_text, str):
            if re.fullmatch(r"0?[0-7]{3}", mode_text):
                mode = int(mode_text, 8)
                if mode & 0o007:
                    c.error(f"must not give rights to others, got {mode_text!r}", "mode")
            else:
                c.error(f'expected an octal mode like "0660", got {mode_text!r}', "mode")
        group = c.str("group", None)
        if isinstance(group, str) and not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\$?", group):
            c.error(f"expected a group name, got {group!r}", "group")
        control = ControlConfig(
            socket=c.str("socket", ControlConfig.socket),
            mode=mode,
            group=group,
            allow_users=tuple(c.str_list("allow_users", [])),
            allow_groups=tuple(c.str_list("allow_groups", [])),
            read_groups=tuple(c.str_list("read_groups", [])),
        )
        c.finish()

    log = LogConfig()
    if (lg := root.section("log")) is not None:
        log = LogConfig(
            format=lg.choice("format", ("auto", "json", "console"), "auto"),
            level=lg.choice("level", ("debug", "info", "warning", "error"), "info"),
        )
        lg.finish()

    webhooks: list[WebhookConfig] = []
    if (n := root.section("notify")) is not None:
        for w in n.sections("webhooks"):
            webhooks.append(
                WebhookConfig(
                    url=_url(w, "url"),
                    headers=w.str_map("headers"),
                    events=frozenset(w.str_list("events", [])),
                    timeout=w.duration("timeout", 5.0, minimum=0.01),
                )
            )
            w.finish()
        from watchdogd.notify import unknown_events  # notify imports this module

        errors.extend(unknown_events(webhooks))
        n.finish()

    state_dir = root.str("state_dir", "/var/lib/watchdogd")

    providers: dict[str, Any] = {}
    for name, parser in actions.provider_sections().items():
        if (s := root.section(name)) is not None:
            providers[name] = parser(s)
            s.finish()

    root.finish()
    if errors:
        raise ConfigError(unresolve(errors, env_refs, secrets))
    assert nodes[0] is not None and nodes[1] is not None
    config = Config(
        cluster=cluster,
        primary=nodes[0],
        standby=nodes[1],
        probe=probe,
        failover=failover,
        witnesses=tuple(witnesses),
        metrics=metrics,
        control=control,
        log=log,
        webhooks=tuple(webhooks),
        state_dir=state_dir,
        providers=providers,
        secrets=frozenset(secrets),
        source=source,
    )
    if problems := actions.check_config(config):
        raise ConfigError(unresolve(problems, env_refs, secrets))
    return config


def _node(
    root: Section, role: str, validate_db: Callable[[Section, str], Mapping[str, Any]]
) -> NodeConfig | None:
    s = root.section(role, required=True)
    if s is None:
        return None
    name = s.str("name", role)
    app = None
    if (a := s.section("app")) is not None:
        statuses = a.raw("expect_status", [])
        if isinstance(statuses, int):
            statuses = [statuses]
        if not isinstance(statuses, list) or not all(
            isinstance(x, int) and 100 <= x <= 599 for x in statuses
        ):
            a.error(f"expected HTTP status codes, got {statuses!r}", "expect_status")
            statuses = []
        app = AppConfig(
            health_url=_url(a, "health_url"),
            expect_status=tuple(statuses),
            headers=a.str_map("headers"),
        )
        a.finish()
    db = None
    if (d := s.section("database", required=True)) is not None:
        engine = d.str("engine")
        dsn = d.str("dsn")
        options: Mapping[str, Any] = {}
        if isinstance(engine, str) and isinstance(dsn, str):
            options = validate_db(d, engine)
        db = DatabaseConfig(engine=engine or "", dsn=dsn or "", options=options)
        d.finish()
    s.finish()
    if db is None:
        return None
    return NodeConfig(name=name, database=db, app=app)


def _failover(
    root: Section, validate_step: Callable[[Section], StepConfig | None]
) -> FailoverConfig:
    f = root.section("failover")
    if f is None:
        return FailoverConfig(
            steps=tuple(
                s
                for s in (
                    validate_step(Section(d, f"failover.steps[{i}]", root.errors, root.secrets))
                    for i, d in enumerate(DEFAULT_STEPS)
                )
                if s
            )
        )
    trigger_on = f.str_list("trigger_on", ["database", "app"])
    for i, t in enumerate(trigger_on or []):
        if t not in ("database", "app"):
            f.error(f"expected database or app, got {t!r}", f"trigger_on[{i}]")
    if trigger_on == []:
        f.error("must name at least one of database, app", "trigger_on")
    steps = _steps(f, "steps", validate_step)
    if not f.has("steps"):
        steps = tuple(
            s
            for s in (
                validate_step(Section(d, f"failover.steps[{i}]", f.errors, f.secrets))
                for i, d in enumerate(DEFAULT_STEPS)
            )
            if s
        )
    elif not steps and not any(e.startswith("failover.steps") for e in f.errors):
        f.error("must list at least one step", "steps")
    fence_steps = _steps(f, "fence_steps", validate_step)
    cfg = FailoverConfig(
        mode=f.choice("mode", ("automatic", "manual"), "automatic"),
        outage_threshold=f.duration("outage_threshold", 30.0, minimum=0.1),
        max_lag=f.size("max_lag", 16 * 10**6),
        max_lag_seconds=f.duration("max_lag_seconds", None),
        cooldown=f.duration("cooldown", 3600.0),
        trigger_on=frozenset(trigger_on or ("database", "app")),
        catchup_timeout=f.duration("catchup_timeout", 30.0, minimum=0.1),
        steps=steps,
        fence_steps=fence_steps,
    )
    f.finish()
    return cfg


def _steps(
    f: Section, key: str, validate_step: Callable[[Section], StepConfig | None]
) -> tuple[StepConfig, ...]:
    steps: list[StepConfig] = []
    names: set[str] = set()
    for s in f.sections(key):
        s.templates = True
        step = validate_step(s)
        if step is None:
            continue
        if step.name in names:
            s.error(f"duplicate step name {step.name!r}", "name")
        names.add(step.name)
        steps.append(step)
    return tuple(steps)


def read_step_common(s: Section) -> dict[str, Any]:
    """The keys every step has; used by ``actions.validate_step``."""
    return {
        "name": s.str("name"),
        "action": s.str("action"),
        "timeout": s.duration("timeout", 30.0, minimum=0.01),
        "retries": s.int("retries", 0, minimum=0, maximum=100),
        "retry_delay": s.duration("retry_delay", 1.0),
        "required": s.bool("required", True),
        "idempotent": s.bool("idempotent", None),
    }


def _url(s: Section, key: str) -> Any:
    url = s.str(key)
    if isinstance(url, str) and not re.match(r"^https?://[^/\s]+", url):
        s.error(f"expected an http(s) URL, got {url!r}", key)
    return url


def _host_port(s: Section, key: str, text: Any) -> tuple[str, int]:
    if not isinstance(text, str):
        return "127.0.0.1", 9644
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        s.error(f"expected host:port, got {text!r}", key)
        return "127.0.0.1", 9644
    return host.strip("[]") or "0.0.0.0", int(port)
