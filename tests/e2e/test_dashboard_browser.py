"""The live dashboard in headless Chromium against a running ``siren sim fleet`` on digits.

The fleet (SIREN, six boards, one sign-flipping) runs with a private broker and serves the
coordinator's API on a free loopback port, with ``SIREN_API_TOKEN`` set so the admin actions
work. Every update is held back 1.5 s (``--latency-ms``), so rounds last long enough to watch.

Once a few rounds are closed the test pauses the coordinator through the admin endpoint (the real
service's controls): the number of closed rounds then stays fixed, so what the page draws can be
compared exactly with the API. It loads the page, checks the accuracy chart and the heat map show
exactly the closed rounds, saves a screenshot to ``tests/artifacts/``, resumes the coordinator
and checks that the page follows the next rounds without a reload; then lets the run finish.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
TOKEN = "e2e-dashboard-token"
BOARDS = 6
ROUNDS = 14

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait(what: str, check: Callable[[], Any], timeout: float, every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
        except httpx.HTTPError:
            value = None
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes], Path]]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"Chromium is not installed at {CHROMIUM} (Debian package 'chromium')")
    port = _free_port()
    log = tmp_path / "fleet.log"
    argv = [
        sys.executable,
        "-m",
        "siren_cli.main",
        "sim",
        "fleet",
        "--dataset",
        "digits",
        "--clients",
        str(BOARDS),
        "--rounds",
        str(ROUNDS),
        "--aggregator",
        "siren",
        "--attack",
        "sign_flip",
        "--malicious-ids",
        "4",
        "--latency-ms",
        "1500",
        "--broker",
        "auto",
        "--api-port",
        str(port),
        "--timeout",
        "400",
        "--out",
        str(tmp_path / "run"),
    ]
    env = {**os.environ, "SIREN_API_TOKEN": TOKEN, "TF_CPP_MIN_LOG_LEVEL": "2"}
    with open(log, "wb") as handle:
        proc = subprocess.Popen(
            argv, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        yield f"http://127.0.0.1:{port}", proc, log
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # the fleet stops its broker and children
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_dashboard_shows_the_rounds_of_a_running_fleet(
    fleet: tuple[str, subprocess.Popen[bytes], Path],
) -> None:
    from playwright.sync_api import sync_playwright

    base, proc, log = fleet
    api = httpx.Client(base_url=base, timeout=10)
    admin = {"Authorization": f"Bearer {TOKEN}"}

    def health() -> Any:
        assert proc.poll() is None, f"the fleet exited early:\n{log.read_text()[-3000:]}"
        body = api.get("/api/health").json()
        return body if body["status"] == "ok" else None

    _wait("the coordinator API", health, timeout=240)
    _wait("three closed rounds", lambda: api.get("/api/run").json()["rounds_closed"] >= 3, 120)

    paused = api.post("/api/admin/pause", headers=admin)
    assert paused.status_code == 200 and paused.json()["paused"] is True
    assert api.post("/api/admin/pause").status_code == 401  # no token, no action
    closed = api.get("/api/run").json()["rounds_closed"]
    rounds = api.get("/api/rounds").json()
    assert [r["round"] for r in rounds] == list(range(1, closed + 1))
    assert all(r["decision_case"] in (1, 3, 4) for r in rounds)

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            external: list[str] = []
            page.on(
                "request",
                lambda req: external.append(req.url) if not req.url.startswith(base) else None,
            )
            page.goto(base + "/")
            page.wait_for_selector(f'#accuracy-chart[data-rounds="{closed}"]', timeout=20_000)
            page.wait_for_selector(f'#heatmap[data-rounds="{closed}"]', timeout=20_000)
            page.wait_for_selector("#run-state.paused", timeout=20_000)

            drawn = page.eval_on_selector_all(
                "#accuracy-chart circle.acc-point", "els => els.map(e => +e.dataset.round)"
            )
            assert drawn == list(range(1, closed + 1))
            assert page.locator("#heatmap rect.cell").count() == closed * BOARDS
            assert page.locator("#heatmap rect.case-box").count() == closed
            alarm_cells = page.locator("#heatmap rect.cell.alarm").count()
            assert alarm_cells == sum(len(r["alarms"]) for r in rounds)
            assert page.locator("#boards tbody tr").count() == BOARDS
            assert page.inner_text("#run-id") == api.get("/api/run").json()["run"]
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

            # The simulator told the coordinator which board attacks (board-004): the page marks
            # it and counts honest boards banned and attackers missed (the run is paused, so
            # the API's answer and the page show the same round).
            page.wait_for_selector("#card-bans[data-attackers-missed]", timeout=20_000)
            run = api.get("/api/run").json()
            assert run["known_malicious"] == ["board-004"]
            assert run["siren_profile"] == "authors"
            card = page.locator("#card-bans")
            assert card.get_attribute("data-banned") == str(len(run["banned"]))
            assert card.get_attribute("data-honest-banned") == str(len(run["honest_banned"]))
            assert card.get_attribute("data-attackers-missed") == str(len(run["attackers_missed"]))
            assert page.locator("#boards .badge.attacker").count() == 1
            assert page.locator('#boards tr[data-board="board-004"] .badge.attacker').count() == 1

            # Paused: every board reports the open round, yet no round closes. (Waiting for all
            # reports first also keeps the ban below from racing a board's update on a slow
            # machine: a refused update is only asked for again after the resend interval.)
            def all_reported() -> bool:
                current = api.get("/api/run").json()["open_round"]
                return current is not None and len(current["admitted"]) == BOARDS

            _wait("every board's update for the open round", all_reported, timeout=120)
            time.sleep(2)
            assert api.get("/api/run").json()["rounds_closed"] == closed

            # Board telemetry: each board sent its open round's figures just before its
            # update; the page shows them, says the worker's memory is shared, and marks what
            # this machine does not expose as absent.
            for board in [f"board-{i:03d}" for i in range(BOARDS)]:
                page.wait_for_selector(
                    f'#telemetry tr[data-board="{board}"][data-round="{closed + 1}"]',
                    timeout=20_000,
                )
            for summary in api.get("/api/clients").json():
                telemetry = summary["telemetry"]
                assert telemetry is not None and telemetry["round"] == closed + 1
                figures = telemetry["figures"]
                assert telemetry["process_boards"] == BOARDS  # one worker hosts them all
                row = f'#telemetry tr[data-board="{summary["client"]}"]'

                def cell(kind: str, row: str = row) -> str:
                    return page.inner_text(f'{row} td[data-figure="{kind}"]')

                assert cell("rss").endswith(f"MiB, process shared by {BOARDS} boards")
                assert " / " in cell("alarm") and " / " in cell("train")
                for kind, name in (
                    ("temperature", "soc_temp_c"),
                    ("throttling", "throttled_flags"),
                    ("power", "power_mw"),
                ):
                    if name in figures:
                        assert cell(kind) != "absent", (kind, figures)
                    else:
                        assert name in telemetry["absent"]
                        assert cell(kind) in ("absent", "rails only (no input rail)"), kind
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

            # Operator ban and key registration through the running service.
            banned = api.post("/api/admin/clients/board-002/ban", headers=admin)
            assert banned.json() == {"client": "board-002", "banned": True, "changed": True}
            page.wait_for_selector('#boards tr[data-board="board-002"].banned', timeout=20_000)
            assert api.get("/api/clients/board-002").json()["admin_banned"] is True
            unbanned = api.post("/api/admin/clients/board-002/unban", headers=admin)
            assert unbanned.json()["banned"] is False
            key = (log.parent / "run" / "fleet" / "keys" / "board-003" / "public.key").read_text()
            same = {"client_id": "board-003", "public_key": key.strip()}
            registered = api.post("/api/admin/keys", json=same, headers=admin)
            assert registered.status_code == 200 and registered.json()["changed"] is False
            resumed = api.post("/api/admin/resume", headers=admin)
            assert resumed.json() == {"paused": False, "changed": True}
            # Rounds now close every ~1.5 s and the page polls every 2 s, so it may show the
            # next two at once: wait for more rounds than before, not for exactly one more.
            _wait(
                "the page to show the next round",
                lambda: int(page.get_attribute("#accuracy-chart", "data-rounds") or 0) > closed,
                timeout=180,
            )
            page.wait_for_selector("#run-state.running", timeout=20_000)
            assert errors == []
            assert external == []
        finally:
            browser.close()
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000

    assert proc.wait(300) == 0, log.read_text()[-3000:]
    output = log.read_text()
    assert f"coordinator dashboard: {base}/" in output
    assert f"round  {ROUNDS}/{ROUNDS}" in output
    assert TOKEN not in output
    assert TOKEN not in (log.parent / "run" / "fleet" / "coordinator.log").read_text()
