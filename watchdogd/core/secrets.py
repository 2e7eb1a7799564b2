"""Secrets and masking: every secret value is replaced by ``***`` wherever text leaves
the daemon (logs, replies, webhooks, metrics, config problems).

``Secrets`` is the holder a daemon instance owns: the masking in logging, notify and
metrics reads it on every use, so ``secrets.replace(new_config.secrets)`` on reload takes
effect at once (and keeps masking the old ones).
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

# Masking replaces text; a secret this short would mangle every reply and log line,
# and leaving it unmasked would show it. Config refuses such secrets instead.
MIN_SECRET = 3
# Paths systemd gives the service (``${CREDENTIALS_DIRECTORY}/pg-password``): not secrets,
# so not masked, and problems naming them show the path itself.
PATH_ENV = frozenset({"CREDENTIALS_DIRECTORY", "RUNTIME_DIRECTORY", "STATE_DIRECTORY"})


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


def mask_deep(value: Any, secrets: frozenset[str]) -> Any:
    """Like ``mask_value``, for log events: bytes are decoded and masked, and any other
    object whose repr (what the renderers print) would show a secret becomes that
    masked repr."""
    if not secrets or value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return mask(value, secrets)
    if isinstance(value, Mapping):
        return {mask_deep(k, secrets): mask_deep(v, secrets) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [mask_deep(v, secrets) for v in value]
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
        return mask(value, secrets)
    text = repr(value)
    masked = mask(text, secrets)
    return value if masked == text else masked


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


class Secrets:
    """The strings to mask wherever text leaves the daemon; they only grow on reload."""

    def __init__(self, values: Iterable[str] = ()) -> None:
        self._values: frozenset[str] = frozenset(v for v in values if v)

    def replace(self, values: Iterable[str]) -> None:
        """Take a reloaded config's secrets, and keep masking the previous ones: a rotated
        password is still a password (the old one may still work, or echo in a reply)."""
        # Rebinding one attribute is atomic, so a concurrent log call sees old or new, whole.
        self._values = self._values | {v for v in values if v}

    def add(self, *values: str) -> None:
        self._values = self._values | {v for v in values if v}

    @property
    def values(self) -> frozenset[str]:
        return self._values

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, value: object) -> bool:
        return value in self._values

    def mask(self, text: str) -> str:
        return mask(text, self._values)

    def mask_value(self, value: Any) -> Any:
        """Mask every string inside ``value`` (dict keys and values, lists, tuples, sets).

        Other objects are kept unless their repr (what the renderers print) would show a
        secret; then the masked repr replaces them.
        """
        return mask_deep(value, self._values)


def as_secrets(secrets: Secrets | Iterable[str]) -> Secrets:
    """The holder itself when given one (so later ``replace`` calls are seen), else a new one."""
    return secrets if isinstance(secrets, Secrets) else Secrets(secrets)
