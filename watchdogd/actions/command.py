"""The ``command`` step: run a program (argv, never a shell) with a timeout."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from watchdogd.actions import Action, ActionError, StepContext
from watchdogd.config import Section


@dataclass
class CommandAction:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    idempotent: bool = False

    async def run(self, ctx: StepContext, timeout: float) -> str:
        argv = ctx.render(self.argv)
        env = {
            **os.environ,
            **ctx.render(self.env),
            "WATCHDOGD_FAILOVER_ID": ctx.failover_id,
            "WATCHDOGD_CLUSTER": ctx.config.cluster,
            "WATCHDOGD_PRIMARY": ctx.primary.name,
            "WATCHDOGD_STANDBY": ctx.standby.name,
        }
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
        try:
            async with asyncio.timeout(timeout):
                out, err = await proc.communicate()
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


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _last_line(data: bytes) -> str:
    lines = data.decode(errors="replace").strip().splitlines()
    return lines[-1][:200] if lines else ""


def parse(s: Section) -> Action:
    argv = s.str_list("argv")
    if argv is not None and not argv:
        s.error("must name a program", "argv")
    if argv:
        s.templated("argv", argv)
    env = s.str_map("env")
    s.templated("env", env)
    return CommandAction(argv=argv or [], env=env, cwd=s.str("cwd", None))


ACTIONS: dict[str, Callable[[Section], Action]] = {"command": parse}
