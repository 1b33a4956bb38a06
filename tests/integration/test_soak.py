"""The soak benchmark's smoke mode against a live fleet: a private Mosquitto, the coordinator
service as a subprocess, two honest boards and a few hundred hostile messages; every check of
the report must pass."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import soak

pytestmark = pytest.mark.integration


def test_smoke_soak_passes_every_check(tmp_path: Path) -> None:
    out = tmp_path / "soak.md"
    code = soak.main(["--smoke", "--workdir", str(tmp_path / "fleet"), "--out", str(out)])
    report = out.read_text()
    assert code == 0, report
    assert "## Checks: all checks pass" in report
    sent = [json.loads(line) for line in (tmp_path / "fleet" / "messages.jsonl").open()]
    assert len(sent) >= 300
    assert {m["channel"] for m in sent} == {"update", "status"}
    assert sum(1 for m in sent if m["family"] == "stolen_key") >= 80
