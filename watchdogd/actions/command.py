"""The ``command`` step: run a program (argv, never a shell) with a timeout.

The child gets a small environment, not the daemon's: the daemon's may hold secrets
(``${ENV}`` values, credentials) the program has no business seeing. It gets ``PATH``,
``LANG``, ``LC_ALL`` and ``HOME`` when set, the step's own ``env``, and ``WATCHDOGD_*``:
``FAILOVER_ID``, ``CLUSTER``, ``PRIMARY``, ``STANDBY``, ``TRIGGER`` and ``REASON`` (the
operator's ``--reason``, or the daemon's own). A script reads the reason from
``$WATCHDOGD_REASON``: ``{reason}`` inside a shell (or ``python -c``) script would run an
operator's text as code, so config refuses it there.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from watchdogd.actions import Action, ActionError, StepContext, template_fields, templated
from watchdogd.core.section import Section

if TYPE_CHECKING:
    from watchdogd.core.model import Config

# Passed through from the daemon's environment: what programs need to run at all.
INHERITED_ENV = ("PATH", "LANG", "LC_ALL", "HOME")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# A chatty step must not fill the daemon's memory: only the tail is kept (the last
# line is what the step reports).
OUTPUT_LIMIT = 64 * 1024
# Programs that take code as an option's argument: the option letter that does it.
_CODE_OPTION = {
    **dict.fromkeys(
        ("sh", "bash", "dash", "zsh", "ksh", "mksh", "ash", "busybox", "fish", "csh", "tcsh"),
        "c",
    ),
    **dict.fromkeys(("python", "python2", "python3", "pypy", "pypy3"), "c"),
    **dict.fromkeys(("perl", "ruby", "node", "nodejs", "php", "lua"), "e"),
}
_VERSIONED = re.compile(r"^(python|pypy|perl|ruby|lua|php)[0-9.]*$")


@dataclass
class CommandAction:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    idempotent: bool = False

    def environment(self, ctx: StepContext) -> dict[str, str]:
        base = {k: os.environ[k] for k in INHERITED_ENV if k in os.environ}
        base.setdefault("PATH", DEFAULT_PATH)
        return {
            **base,
            **ctx.render(self.env),
            "WATCHDOGD_FAILOVER_ID": ctx.failover_id,
            "WATCHDOGD_CLUSTER": ctx.config.cluster,
            "WATCHDOGD_PRIMARY": ctx.primary.name,
            "WATCHDOGD_STANDBY": ctx.standby.name,
            "WATCHDOGD_TRIGGER": ctx.trigger,
            "WATCHDOGD_REASON": ctx.reason,
        }

    async def run(self, ctx: StepContext, timeout: float) -> str:
        argv = ctx.render(self.argv)
        env = self.environment(ctx)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                cwd=self.cwd,
                start_new_session=True,  # so a timeout kills the whole process group
            )
        except OSError as exc:
            raise ActionError(f"cannot run {argv[0]}: {exc.strerror}") from None
        assert proc.stdout is not None and proc.stderr is not None
        try:
            async with asyncio.timeout(timeout):
                out, err, _ = await asyncio.gather(
                    _tail(proc.stdout), _tail(proc.stderr), proc.wait()
                )
        except TimeoutError:
            _kill_group(proc.pid)
            await proc.wait()
            raise ActionError(f"{argv[0]} did not finish within {timeout:g}s (killed)") from None
        except asyncio.CancelledError:
            _kill_group(proc.pid)
            raise
        last = _last_line(err) or _last_line(out)
        if proc.returncode != 0:
            raise ActionError(
                f"{argv[0]} exited with {proc.returncode}" + (f": {last}" if last else "")
            )
        return f"{argv[0]} exited 0" + (f": {last}" if last else "")

    def describe(self, ctx: StepContext) -> dict[str, Any]:
        described: dict[str, Any] = {"argv": ctx.render(self.argv)}
        if self.env:
            described["env"] = ctx.render(self.env)
        return described

    async def ready(self, ctx: StepContext, timeout: float) -> str:
        """The program exists and is executable, found the way ``run`` finds it: a path
        (relative to ``cwd``), or a bare name in the child's own PATH. Nothing runs."""
        return _find_program(ctx.render(self.argv)[0], self.cwd, self.environment(ctx)["PATH"])


def _find_program(program: str, cwd: str | None, path: str) -> str:
    """Where ``program`` is, as the runner would find it; ActionError when it is not."""
    import shutil

    if cwd is not None and not os.path.isdir(cwd):
        raise ActionError(f"cwd {cwd} is not an existing directory")
    if "/" not in program:
        found = shutil.which(program, path=path)
        if found is None:
            raise ActionError(f"{program}: no executable of that name in PATH ({path})")
        return f"{program} is {found}"
    where = os.path.join(cwd, program) if cwd is not None else program
    if not os.path.exists(where):
        raise ActionError(f"{program}: no such file")
    if problem := _not_executable(where):
        raise ActionError(f"{program} {problem}")
    return f"{program} is executable"


async def _tail(stream: asyncio.StreamReader, limit: int = OUTPUT_LIMIT) -> bytes:
    """Read ``stream`` to its end, keeping only the last ``limit`` bytes."""
    kept = b""
    while chunk := await stream.read(65536):
        kept = (kept + chunk)[-limit:]
    return kept


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _last_line(data: bytes) -> str:
    lines = data.decode(errors="replace").strip().splitlines()
    return lines[-1][:200] if lines else ""


def code_arguments(argv: list[str]) -> list[int]:
    """Indexes of argv elements an interpreter runs as code (``sh -c SCRIPT``,
    ``env bash -ec SCRIPT``, ``python3 -c CODE``, ``perl -e CODE``)."""
    found: list[int] = []
    letter: str | None = None
    for i, arg in enumerate(argv):
        if letter is None:
            name = os.path.basename(arg)
            letter = _CODE_OPTION.get(name) or _CODE_OPTION.get(_VERSIONED.sub(r"\1", name))
            continue
        if arg.startswith("-") and not arg.startswith("--") and letter in arg[1:]:
            if i + 1 < len(argv):
                found.append(i + 1)
            letter = None  # the arguments after the code are data ($0, $1 ...)
    return found


def parse(s: Section) -> Action:
    argv = s.str_list("argv")
    if argv is not None and not argv:
        s.error("must name a program", "argv")
    if argv:
        templated(s, "argv", argv)
        for i in code_arguments(argv):
            try:
                fields = template_fields(argv[i])
            except ValueError:
                continue  # templated() above reported the syntax
            if "reason" in fields:
                s.error(
                    "{reason} inside a script would run the operator's text as code; "
                    'read it from "$WATCHDOGD_REASON" instead',
                    f"argv[{i}]",
                )
    env = s.str_map("env")
    templated(s, "env", env)
    cwd = s.str("cwd", None)
    return CommandAction(argv=argv or [], env=env, cwd=cwd)


def check(config: Config) -> list[str]:
    """What is visible on this host: a program given by path must be an executable file,
    a ``cwd`` an existing directory. (A bare name is looked up in PATH when it runs.)"""
    problems: list[str] = []
    for key, steps in (
        ("steps", config.failover.steps),
        ("fence_steps", config.failover.fence_steps),
        ("rejoin_steps", config.failover.rejoin_steps),
    ):
        for i, step in enumerate(steps):
            if step.action != "command":
                continue
            where = f"failover.{key}[{i}]"
            argv = step.params.get("argv")
            program = argv[0] if isinstance(argv, list) and argv else None
            if isinstance(program, str) and "/" in program and "{" not in program:
                problem = _not_executable(program)
                if problem:
                    problems.append(f"{where}.argv[0]: {program} {problem}")
            cwd = step.params.get("cwd")
            if isinstance(cwd, str) and "$" not in cwd and not os.path.isdir(cwd):
                problems.append(f"{where}.cwd: {cwd} is not an existing directory")
    return problems


def _not_executable(program: str) -> str | None:
    try:
        st = os.stat(program)
    except FileNotFoundError:
        # Not an error: the config may be checked on another host than it runs on.
        return None
    except OSError as exc:
        return f"cannot be checked: {exc.strerror}"
    if not stat.S_ISREG(st.st_mode):
        return "is not a file"
    if not os.access(program, os.X_OK):
        return "is not executable"
    return None


ACTIONS: dict[str, Callable[[Section], Action]] = {"command": parse}
