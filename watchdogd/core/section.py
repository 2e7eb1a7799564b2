"""The config section reader: a mapping being read at a path, with typed getters that
record problems instead of raising.

``watchdogd.config`` reads the core keys with it, and action and engine modules receive a
Section for their own keys, so every problem carries the same path-named form
(``failover.steps[2].timeout: expected a duration like 5s, got 'soon'``).
"""

from __future__ import annotations

import builtins
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Final, TypeVar, overload

from watchdogd.core.secrets import MIN_SECRET, PATH_ENV
from watchdogd.core.units import format_duration, parse_duration, parse_size

_T = TypeVar("_T")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class Required:
    """The type of ``REQUIRED``: a getter's default meaning "the key must be given"."""

    def __repr__(self) -> builtins.str:
        return "REQUIRED"


# A missing required key is recorded as a problem and read as None.
REQUIRED: Final = Required()


def kind_of(value: object) -> str:
    """How a problem names what it found instead: ``a mapping``, ``a list``, ..."""
    return {
        dict: "a mapping",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "nothing",
    }.get(type(value), type(value).__name__)


def walk_strings(value: object, path: str) -> Iterator[tuple[str, str]]:
    """Every string inside ``value`` with its config path."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from walk_strings(v, f"{path}[{i}]")
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from walk_strings(v, f"{path}.{k}")


class Section:
    """A mapping being read at ``path``: typed getters that record errors instead of
    raising, and ``finish()`` which reports every key nobody asked for.

    A getter returns the value, or its ``default`` when the key is absent (or its value
    was refused, the problem recorded); with no default the key is required and a missing
    one reads as None. The caller raises once, with every problem, after reading all.
    """

    def __init__(
        self,
        data: object,
        path: str,
        errors: list[str],
        secrets: set[str],
        env_refs: dict[str, str] | None = None,
    ) -> None:
        self.path = path
        self.errors = errors
        self.secrets = secrets
        # Resolved ``${VAR}`` value -> "${VAR}", shared by child sections: problems are
        # reported with the reference, never the value (see ``core.secrets.unresolve``).
        self.env_refs: dict[str, str] = env_refs if env_refs is not None else {}
        # A step's strings are templates: a ``${VAR}`` value with a brace would be read
        # as a placeholder (and change, and then escape masking), so it is refused.
        self.templates = False
        self.ok = isinstance(data, Mapping)
        if not self.ok and data is not None:
            self.error(f"expected a mapping, got {kind_of(data)}")
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

    def _get(self, key: str, default: object) -> Any:
        self._seen.add(key)
        if key in self._data and self._data[key] is not None:
            return self._data[key]
        if default is REQUIRED:
            self.error("is required", key)
            return None
        return default

    def finish(self) -> None:
        for key in self._data:
            if key not in self._seen:
                self.error("unknown key", str(key))

    # -- typed getters
    def raw(self, key: str, default: object = None) -> object:
        """The value as written (``${ENV}`` resolved), for keys of more than one shape:
        the caller checks its type."""
        return self._resolve_env(self._get(key, default), self.sub(key))

    @overload
    def str(
        self, key: builtins.str, default: Required = ..., *, allow_empty: builtins.bool = ...
    ) -> builtins.str | None: ...
    @overload
    def str(
        self, key: builtins.str, default: _T, *, allow_empty: builtins.bool = ...
    ) -> builtins.str | _T: ...
    def str(
        self, key: builtins.str, default: object = REQUIRED, *, allow_empty: builtins.bool = False
    ) -> object:
        value = self._get(key, default)
        if value is None or value is default:
            return value
        if not isinstance(value, str):
            self.error(f"expected a string, got {kind_of(value)}", key)
            return _fallback(default)
        value = self._resolve_env(value, self.sub(key))
        if not allow_empty and not value:
            self.error("must not be empty", key)
        return value

    @overload
    def secret(
        self, key: builtins.str, default: None = ..., *, required: builtins.bool = ...
    ) -> builtins.str | None: ...
    @overload
    def secret(
        self, key: builtins.str, default: _T, *, required: builtins.bool = ...
    ) -> builtins.str | _T: ...
    def secret(
        self, key: builtins.str, default: object = None, *, required: builtins.bool = False
    ) -> object:
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

    @overload
    def duration(
        self, key: builtins.str, default: Required = ..., *, minimum: float = ...
    ) -> float | None: ...
    @overload
    def duration(self, key: builtins.str, default: _T, *, minimum: float = ...) -> float | _T: ...
    def duration(
        self, key: builtins.str, default: object = REQUIRED, *, minimum: float = 0.0
    ) -> object:
        value = self._get(key, default)
        if value is None or value is default:
            return value
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            self.error(str(exc), key)
            return _fallback(default)
        if seconds < minimum:
            self.error(f"must be at least {format_duration(minimum)}, got {value!r}", key)
        return seconds

    @overload
    def size(self, key: builtins.str, default: Required = ...) -> builtins.int | None: ...
    @overload
    def size(self, key: builtins.str, default: _T) -> builtins.int | _T: ...
    def size(self, key: builtins.str, default: object = REQUIRED) -> object:
        value = self._get(key, default)
        if value is None or value is default:
            return value
        try:
            return parse_size(value)
        except ValueError as exc:
            self.error(str(exc), key)
            return _fallback(default)

    @overload
    def int(
        self,
        key: builtins.str,
        default: Required = ...,
        *,
        minimum: builtins.int | None = ...,
        maximum: builtins.int | None = ...,
    ) -> builtins.int | None: ...
    @overload
    def int(
        self,
        key: builtins.str,
        default: _T,
        *,
        minimum: builtins.int | None = ...,
        maximum: builtins.int | None = ...,
    ) -> builtins.int | _T: ...
    def int(
        self,
        key: builtins.str,
        default: object = REQUIRED,
        *,
        minimum: builtins.int | None = None,
        maximum: builtins.int | None = None,
    ) -> object:
        value = self._get(key, default)
        if value is None or value is default:
            return value
        if not isinstance(value, int) or isinstance(value, bool):
            self.error(f"expected an integer, got {value!r}", key)
            return _fallback(default)
        if minimum is not None and value < minimum:
            self.error(f"must be at least {minimum}, got {value}", key)
        if maximum is not None and value > maximum:
            self.error(f"must be at most {maximum}, got {value}", key)
        return value

    @overload
    def bool(self, key: builtins.str, default: Required = ...) -> builtins.bool | None: ...
    @overload
    def bool(self, key: builtins.str, default: _T) -> builtins.bool | _T: ...
    def bool(self, key: builtins.str, default: object = REQUIRED) -> object:
        value = self._get(key, default)
        if value is None or value is default:
            return value
        if not isinstance(value, bool):
            self.error(f"expected true or false, got {value!r}", key)
            return _fallback(default)
        return value

    @overload
    def choice(
        self, key: builtins.str, choices: tuple[builtins.str, ...], default: Required = ...
    ) -> builtins.str | None: ...
    @overload
    def choice(
        self, key: builtins.str, choices: tuple[builtins.str, ...], default: _T
    ) -> builtins.str | _T: ...
    def choice(
        self, key: builtins.str, choices: tuple[builtins.str, ...], default: object = REQUIRED
    ) -> object:
        value = self.str(key, default)
        if value is not None and value is not default and value not in choices:
            self.error(f"expected one of {', '.join(choices)}, got {value!r}", key)
            return _fallback(default)
        return value

    @overload
    def str_list(self, key: builtins.str, default: Required = ...) -> list[builtins.str] | None: ...
    @overload
    def str_list(self, key: builtins.str, default: _T) -> list[builtins.str] | _T: ...
    def str_list(self, key: builtins.str, default: object = REQUIRED) -> object:
        value = self._get(key, default)
        if value is None or value is default:
            return value
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.error(f"expected a list of strings, got {kind_of(value)}", key)
            return _fallback(default)
        return [self._resolve_env(v, f"{self.sub(key)}[{i}]") for i, v in enumerate(value)]

    def str_map(self, key: builtins.str) -> dict[builtins.str, builtins.str]:
        value = self._get(key, None)
        if value is None:
            return {}
        if not isinstance(value, Mapping) or not all(
            isinstance(k, str) and isinstance(v, (str, int, float)) for k, v in value.items()
        ):
            self.error(f"expected a mapping of strings, got {kind_of(value)}", key)
            return {}
        return {k: self._resolve_env(str(v), f"{self.sub(key)}.{k}") for k, v in value.items()}

    def section(self, key: builtins.str, *, required: builtins.bool = False) -> Section | None:
        value = self._get(key, REQUIRED if required else None)
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
            self.error(f"expected a list, got {kind_of(value)}", key)
            return
        for i, item in enumerate(value):
            child = Section(item, f"{self.sub(key)}[{i}]", self.errors, self.secrets, self.env_refs)
            child.templates = self.templates
            yield child

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


def _fallback(default: object) -> object:
    """What a getter returns for a refused value: its default, or None when required."""
    return None if default is REQUIRED else default
