"""The ``/metrics`` exposition: Prometheus series computed from the store at each scrape."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from coordinator.api.records import RunContext, as_dict, finite, integer, siren_standing
from coordinator.api.store_view import StoreView
from coordinator.config import CoordinatorConfig
from coordinator.store import TelemetryRow
from protocol.errors import Reason

#: Upper bounds (seconds) of the round-duration histogram of ``/metrics``.
DURATION_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
#: Content type of the answer: the Prometheus text exposition format 0.0.4.
PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Telemetry figure -> (metric, scale to the metric's unit, help text) of ``/metrics``.
TELEMETRY_METRICS: dict[str, tuple[str, float, str]] = {
    "rss_peak_mib": (
        "siren_board_peak_rss_bytes",
        2.0**20,
        "Peak resident set size of the board's process.",
    ),
    "process_boards": (
        "siren_board_process_boards",
        1.0,
        "Boards sharing the process whose memory and CPU figures are reported.",
    ),
    "alarm_s": ("siren_board_alarm_seconds", 1.0, "Wall time of the SIREN alarm."),
    "alarm_cpu_s": ("siren_board_alarm_cpu_seconds", 1.0, "CPU time of the SIREN alarm."),
    "train_s": ("siren_board_train_seconds", 1.0, "Wall time of local training."),
    "train_cpu_s": ("siren_board_train_cpu_seconds", 1.0, "CPU time of local training."),
    "soc_temp_c": (
        "siren_board_soc_temperature_celsius",
        1.0,
        "Highest SoC temperature during the round.",
    ),
    "throttled_flags": (
        "siren_board_throttled_flags",
        1.0,
        "Raspberry Pi get_throttled word after the round.",
    ),
    "power_mw": ("siren_board_power_watts", 1e-3, "Mean board input power during the round."),
}
#: Telemetry family -> (metric, label, scale, help text) of ``/metrics``.
TELEMETRY_FAMILY_METRICS: dict[str, tuple[str, str, float, str]] = {
    "temp_c": (
        "siren_board_zone_temperature_celsius",
        "zone",
        1.0,
        "Highest temperature of one thermal zone during the round.",
    ),
    "power_mw": (
        "siren_board_rail_power_watts",
        "rail",
        1e-3,
        "Mean power of one power-monitor rail during the round.",
    ),
}


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class Exposition:
    """Prometheus text exposition format 0.0.4, written by hand."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, text: str) -> None:
        self.lines.append(f"# HELP {name} {text}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, value: float, labels: Mapping[str, str] | None = None) -> None:
        if labels:
            inner = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
            self.lines.append(f"{name}{{{inner}}} {_number(value)}")
        else:
            self.lines.append(f"{name} {_number(value)}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def metrics_text(v: StoreView, config: CoordinatorConfig, ctx: RunContext, clock: Any) -> str:
    """The ``/metrics`` text (see ``docs/api.md`` for the series)."""
    out = Exposition()
    out.family("siren_info", "gauge", "Run identity (always 1).")
    out.sample("siren_info", 1, {"run": config.run, "aggregator": config.aggregator.name})
    out.family("siren_rounds_planned", "gauge", "Rounds the run is configured for.")
    out.sample("siren_rounds_planned", config.rounds)
    ready = v.initialized
    records = v.closed_records() if ready else []
    out.family("siren_round_current", "gauge", "The open round (rounds + 1 once finished).")
    out.sample("siren_round_current", v.current_round if ready else 0)
    out.family("siren_rounds_closed_total", "counter", "Rounds closed.")
    out.sample("siren_rounds_closed_total", len(records))
    out.family("siren_run_finished", "gauge", "1 once the final global model is committed.")
    out.sample("siren_run_finished", int(ready and v.finished))
    out.family("siren_paused", "gauge", "1 while an operator paused the closing of rounds.")
    out.sample("siren_paused", int(ctx.paused))

    counts = v.decision_counts() if ready else {}
    out.family("siren_updates_admitted_total", "counter", "Updates admitted.")
    out.sample("siren_updates_admitted_total", counts.get(Reason.ACCEPTED.value, 0))
    out.family("siren_updates_duplicate_total", "counter", "Identical resends of admitted updates.")
    out.sample("siren_updates_duplicate_total", counts.get(Reason.DUPLICATE.value, 0))
    out.family("siren_updates_rejected_total", "counter", "Messages refused, by reason code.")
    reasons = {r.value for r in Reason} | set(counts)
    for reason in sorted(reasons - {Reason.ACCEPTED.value, Reason.DUPLICATE.value}):
        out.sample("siren_updates_rejected_total", counts.get(reason, 0), {"reason": reason})

    durations = [d for _, _, _, r in records if (d := finite(r.get("seconds"))) is not None]
    out.family("siren_round_duration_seconds", "histogram", "Wall time of closed rounds.")
    for bound in DURATION_BUCKETS:
        out.sample(
            "siren_round_duration_seconds_bucket",
            sum(1 for d in durations if d <= bound),
            {"le": _number(bound)},
        )
    out.sample("siren_round_duration_seconds_bucket", len(durations), {"le": "+Inf"})
    out.sample("siren_round_duration_seconds_sum", float(sum(durations)))
    out.sample("siren_round_duration_seconds_count", len(durations))

    alarms = [sum(1 for a in as_dict(r.get("alarms")).values() if a is True) for *_, r in records]
    out.family("siren_alarms_total", "counter", "SIREN alarms raised by admitted updates.")
    out.sample("siren_alarms_total", sum(alarms))
    out.family("siren_round_alarms", "gauge", "Alarms in the last closed round.")
    out.sample("siren_round_alarms", alarms[-1] if alarms else 0)
    kept = rejected = 0
    cases: dict[str, int] = {}
    for *_, record in records:
        for verdict in as_dict(record.get("verdicts")).values():
            if as_dict(verdict).get("kept") is True:
                kept += 1
            else:
                rejected += 1
        decision = as_dict(record.get("decision"))
        if decision.get("rule") == "siren" and integer(decision.get("case")) is not None:
            case = str(decision["case"])
            cases[case] = cases.get(case, 0) + 1
    out.family("siren_aggregation_kept_total", "counter", "Admitted updates the aggregate used.")
    out.sample("siren_aggregation_kept_total", kept)
    out.family(
        "siren_aggregation_discarded_total", "counter", "Admitted updates the aggregate left out."
    )
    out.sample("siren_aggregation_discarded_total", rejected)
    out.family("siren_decision_case_total", "counter", "SIREN rounds by decision case.")
    for case in ("0", "1", "3", "4"):
        out.sample("siren_decision_case_total", cases.get(case, 0), {"case": case})

    accuracy = [a for *_, r in records if (a := finite(r.get("test_accuracy"))) is not None]
    out.family("siren_test_accuracy", "gauge", "Test accuracy of the latest global model.")
    out.sample("siren_test_accuracy", accuracy[-1] if accuracy else float("nan"))

    statuses = v.statuses() if ready else {}
    out.family("siren_boards_expected", "gauge", "Boards of the run.")
    out.sample("siren_boards_expected", len(ctx.boards))
    out.family("siren_boards", "gauge", "Boards by last announced status.")
    tally = {"online": 0, "offline": 0, "unknown": 0}
    for board in ctx.boards:
        state = as_dict(statuses.get(board)).get("status")
        tally[state if state in ("online", "offline") else "unknown"] += 1
    for state, n in tally.items():
        out.sample("siren_boards", n, {"status": state})
    standing = siren_standing(records, ctx)
    out.family("siren_boards_banned", "gauge", "Banned boards, by SIREN's penalty or an operator.")
    out.sample("siren_boards_banned", len(standing[1]) if standing else 0, {"by": "siren"})
    out.sample("siren_boards_banned", len(ctx.admin_banned), {"by": "admin"})
    telemetry_metrics(out, v.latest_telemetry() if ready else {}, ctx)
    out.family("siren_scrape_timestamp_seconds", "gauge", "Server time of this scrape.")
    out.sample("siren_scrape_timestamp_seconds", float(clock()))
    return out.text()


def telemetry_metrics(out: Exposition, latest: Mapping[str, TelemetryRow], ctx: RunContext) -> None:
    """Per-board gauges of each board's latest figures; a figure a board did not send (an
    absent sensor) has no sample for that board."""
    rows = [latest[b] for b in ctx.boards if b in latest]
    out.family(
        "siren_board_telemetry_round", "gauge", "Round of the board's latest telemetry figures."
    )
    for row in rows:
        out.sample("siren_board_telemetry_round", row.round, {"client": row.client})
    for name, (metric, scale, text) in TELEMETRY_METRICS.items():
        out.family(metric, "gauge", f"{text} Latest round reported; absent sensors: no sample.")
        for row in rows:
            if name in row.figures:
                out.sample(metric, row.figures[name] * scale, {"client": row.client})
    for prefix, (metric, label, scale, text) in TELEMETRY_FAMILY_METRICS.items():
        out.family(metric, "gauge", f"{text} Latest round reported.")
        for row in rows:
            for name, value in row.figures.items():
                head, dot, sensor = name.partition(".")
                if dot and head == prefix:
                    out.sample(metric, value * scale, {"client": row.client, label: sensor})
