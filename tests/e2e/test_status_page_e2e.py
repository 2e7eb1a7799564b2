"""Issue 14: the status page (``GET /`` on the metrics port) in a real headless Chromium
against the daemon as a process over a real PostgreSQL pair: healthy, paused with a
hostile reason, and after a real failover. The last screenshot is kept in
``build/test-artifacts/status-page.png`` (see docs/development.md)."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from pathlib import Path

import aiohttp

from tests.e2e.test_failover import FIVE
from tests.support import need, timing, which
from tests.support.apps import DemoApps
from tests.support.daemon import DaemonProcess, lab_config
from tests.unit.test_page import Page
from watchdogd.demo.lab import PgPair

Factory = Callable[..., DaemonProcess]
ARTIFACTS = Path(__file__).resolve().parents[2] / "build" / "test-artifacts"
HOSTILE = '<script>document.title="pwned"</script><img src=x onerror=alert(1)>'


class Chromium:
    """Debian's ``chromium``, headless, with a private profile and no network of its own."""

    def __init__(self, profile: Path) -> None:
        self.exe = need("chromium", which("chromium", "/usr/bin"))
        self.profile = profile

    async def run(self, *args: str) -> bytes:
        proc = await asyncio.create_subprocess_exec(
            self.exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", f"--user-data-dir={self.profile}", *args,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timing.within(60))
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
        return out

    async def dom(self, url: str) -> Page:
        return Page((await self.run("--dump-dom", url)).decode())

    async def screenshot(self, url: str, path: Path) -> tuple[int, int]:
        def fresh() -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.unlink(missing_ok=True)

        await asyncio.to_thread(fresh)
        await self.run(f"--screenshot={path}", "--window-size=1200,1600", url)
        data = await asyncio.to_thread(path.read_bytes)
        assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
        width, height = struct.unpack(">II", data[16:24])
        return width, height


async def test_the_status_page_in_chromium_through_a_real_failover(
    pg_pair: PgPair, demo_apps: DemoApps, daemon_factory: Factory, tmp_path: Path
) -> None:
    browser = Chromium(tmp_path / "chromium")
    cfg = lab_config(
        pg_pair, tmp_path, demo_apps, interval="300ms", timeout="200ms", threshold="1500ms"
    )
    d = daemon_factory(cfg)
    await d.start()
    await d.wait_state("watching")
    url = d.metrics_url.removesuffix("/metrics") + "/"

    healthy = await browser.dom(url)
    assert "watchdogd: cluster orders" in healthy.text
    assert "State watching Reason primary healthy" in healthy.text
    assert "Roles primary main, standby failover" in healthy.text
    assert "main primary ok" in healthy.text and "failover standby ok" in healthy.text
    assert "Streaming yes" in healthy.text and "No failover recorded." in healthy.text
    status = await d.status()
    if "readiness" in status:  # reported by the daemon: shown with what is wrong
        verdict = "not ready" if not status["readiness"]["ready"] else "ready to fail over"
        assert verdict in healthy.text
    else:
        assert "Readiness Not reported by this daemon." in healthy.text

    # Text from an operator (or a remote system) is text in a real browser, too.
    assert (await d.call("pause", reason=HOSTILE))["ok"]
    paused = await browser.dom(url)
    assert f"Paused yes: {HOSTILE}" in paused.text
    assert not paused.named("script") and not paused.named("img")
    assert not paused.named("form") and not paused.named("input")
    assert "pwned" not in (await browser.run("--dump-dom", url)).decode().split("<body")[0]
    assert (await d.call("resume"))["ok"]

    # Nothing on the port changes anything: only GET (and HEAD) are served at /.
    async with aiohttp.ClientSession() as http:
        async with http.get(url) as r:
            assert r.status == 200 and r.content_type == "text/html"
            assert "script-src" not in r.headers["Content-Security-Policy"]
            assert "default-src 'none'" in r.headers["Content-Security-Policy"]
        for method in ("POST", "PUT", "DELETE"):
            async with http.request(method, url) as r:
                assert r.status == 405, method

    pg_pair.primary.kill()
    status = await d.wait_state("failed_over", within=20)
    fid = status["last_failover"]["id"]
    after = await browser.dom(url)
    text = after.text
    assert f"State failed_over Reason {status['reason']}" in text
    assert "Roles primary failover, standby main" in text
    assert "failover primary ok" in text and "main standby FAIL" in text
    assert "Awaiting ack yes" in text
    assert "Why unknown the standby's database does not answer" in text
    assert f"{fid}: completed" in text and "From → to main → failover" in text
    # The step timeline, in the order the steps ran.
    positions = [text.index(f"{step} ", text.index(fid)) for step in FIVE]
    assert positions == sorted(positions), positions
    assert "promote_standby promote" in text and "promoted to primary" in text

    artifact = ARTIFACTS / "status-page.png"
    assert await browser.screenshot(url, artifact) == (1200, 1600)
    size = (await asyncio.to_thread(artifact.stat)).st_size
    assert size > 20_000, size  # a page was drawn, not a blank
