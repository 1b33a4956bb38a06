"""The ``/metrics`` series: a ``prometheus_client`` collector over the coordinator's store.

:class:`StoreCollector` computes every series at each scrape from one read transaction of the
run's database (as every answer of the API does): nothing is counted in memory, so the numbers
are those of the database, survive a restart of the coordinator and are the same from any
process that reads it. :func:`metrics_registry` registers it in a registry of the app's own
(never the process-wide default registry, so several apps can live in one process), and
:func:`exposition` writes the registry in the Prometheus text format 0.0.4. ``docs/api.md``
section 4 lists the series.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from coordinator.api.answers import Answers
from coordinator.api.records import RunContext, as_dict, finite, integer, siren_standing
from coordinator.api.store_view import StoreView
from coordinator.store import TelemetryRow
from protocol.errors import Reason

#: ``(round, opened_at, closed_at, record)`` of a closed round (:meth:`StoreView.closed_records`).
ClosedRound = tuple[int, float, float, dict[str, Any]]

#: Upper bounds (seconds) of the round-duration histogram of ``/metrics``.
DURATION_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
#: Content type of the answer: the Prometheus text exposition format 0.0.4.
PROMETHEUS_TYPE = CONTENT_TYPE_PLAIN_0_0_4

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


class StoreCollector:
    """The run's series, read from the store at each scrape (a ``prometheus_client`` collector).

    Parameters
    ----------
    answers : Answers
        The app's answers: their read-only view of the store, the coordinator's settings, the
        operator's state (paused, banned boards) and the clock.
    """

    def __init__(self, answers: Answers) -> None:
        self.answers = answers

    def collect(self) -> Iterable[Metric]:
        """Every family, from one snapshot of the store (also before the run started)."""
        with self.answers.read(started=False) as (v, ctx):
            return list(self._families(v, ctx))

    def _families(self, v: StoreView, ctx: RunContext) -> Iterable[Metric]:
        config = self.answers.config
        info = GaugeMetricFamily(
            "siren_info", "Run identity (always 1).", labels=["run", "aggregator"]
        )
        info.add_metric([config.run, config.aggregator.name], 1)
        yield info
        yield GaugeMetricFamily(
            "siren_rounds_planned", "Rounds the run is configured for.", value=config.rounds
        )
        ready = v.initialized
        records = v.closed_records() if ready else []
        yield GaugeMetricFamily(
            "siren_round_current",
            "The open round (rounds + 1 once finished).",
            value=v.current_round if ready else 0,
        )
        yield CounterMetricFamily("siren_rounds_closed_total", "Rounds closed.", value=len(records))
        yield GaugeMetricFamily(
            "siren_run_finished",
            "1 once the final global model is committed.",
            value=int(ready and v.finished),
        )
        yield GaugeMetricFamily(
            "siren_paused", "1 while an operator paused the closing of rounds.", value=ctx.paused
        )
        yield from _admission(v.decision_counts() if ready else {})
        yield from _rounds(records)
        yield from _boards(v, ctx, records)
        yield from _telemetry(v.latest_telemetry() if ready else {}, ctx)
        yield GaugeMetricFamily(
            "siren_scrape_timestamp_seconds",
            "Server time of this scrape.",
            value=float(self.answers.clock()),
        )


def _admission(counts: Mapping[str, int]) -> Iterable[Metric]:
    """Admission outcomes: admitted, duplicates, and refusals by reason (every code, zeros too)."""
    yield CounterMetricFamily(
        "siren_updates_admitted_total",
        "Updates admitted (buffered asynchronous mode: stale ones included).",
        value=counts.get(Reason.ACCEPTED.value, 0) + counts.get(Reason.STALE.value, 0),
    )
    yield CounterMetricFamily(
        "siren_updates_duplicate_total",
        "Identical resends of admitted updates.",
        value=counts.get(Reason.DUPLICATE.value, 0),
    )
    rejected = CounterMetricFamily(
        "siren_updates_rejected_total", "Messages refused, by reason code.", labels=["reason"]
    )
    reasons = {r.value for r in Reason} | set(counts)
    admitted = {Reason.ACCEPTED.value, Reason.STALE.value, Reason.DUPLICATE.value}
    for reason in sorted(reasons - admitted):
        rejected.add_metric([reason], counts.get(reason, 0))
    yield rejected


def _rounds(records: Sequence[ClosedRound]) -> Iterable[Metric]:
    """What the closed rounds did: durations, alarms, kept and discarded updates, SIREN cases,
    the latest test accuracy."""
    durations = [d for _, _, _, r in records if (d := finite(r.get("seconds"))) is not None]
    buckets = [
        (floatToGoString(bound), float(sum(1 for d in durations if d <= bound)))
        for bound in DURATION_BUCKETS
    ]
    yield HistogramMetricFamily(
        "siren_round_duration_seconds",
        "Wall time of closed rounds.",
        buckets=[*buckets, ("+Inf", float(len(durations)))],
        sum_value=float(sum(durations)),
    )
    alarms = [sum(1 for a in as_dict(r.get("alarms")).values() if a is True) for *_, r in records]
    yield CounterMetricFamily(
        "siren_alarms_total", "SIREN alarms raised by admitted updates.", value=sum(alarms)
    )
    yield GaugeMetricFamily(
        "siren_round_alarms", "Alarms in the last closed round.", value=alarms[-1] if alarms else 0
    )
    kept = discarded = 0
    cases: dict[str, int] = {}
    for *_, record in records:
        for verdict in as_dict(record.get("verdicts")).values():
            if as_dict(verdict).get("kept") is True:
                kept += 1
            else:
                discarded += 1
        decision = as_dict(record.get("decision"))
        if decision.get("rule") == "siren" and integer(decision.get("case")) is not None:
            case = str(decision["case"])
            cases[case] = cases.get(case, 0) + 1
    yield CounterMetricFamily(
        "siren_aggregation_kept_total", "Admitted updates the aggregate used.", value=kept
    )
    yield CounterMetricFamily(
        "siren_aggregation_discarded_total",
        "Admitted updates the aggregate left out.",
        value=discarded,
    )
    by_case = CounterMetricFamily(
        "siren_decision_case_total", "SIREN rounds by decision case.", labels=["case"]
    )
    for case in ("0", "1", "3", "4"):
        by_case.add_metric([case], cases.get(case, 0))
    yield by_case
    accuracy = [a for *_, r in records if (a := finite(r.get("test_accuracy"))) is not None]
    yield GaugeMetricFamily(
        "siren_test_accuracy",
        "Test accuracy of the latest global model.",
        value=accuracy[-1] if accuracy else float("nan"),
    )


def _boards(v: StoreView, ctx: RunContext, records: Sequence[ClosedRound]) -> Iterable[Metric]:
    """The boards: expected, by last announced status, banned by SIREN or an operator."""
    statuses = v.statuses() if v.initialized else {}
    yield GaugeMetricFamily("siren_boards_expected", "Boards of the run.", value=len(ctx.boards))
    tally = {"online": 0, "offline": 0, "unknown": 0}
    for board in ctx.boards:
        state = as_dict(statuses.get(board)).get("status")
        tally[state if state in ("online", "offline") else "unknown"] += 1
    by_status = GaugeMetricFamily(
        "siren_boards", "Boards by last announced status.", labels=["status"]
    )
    for state, n in tally.items():
        by_status.add_metric([state], n)
    yield by_status
    standing = siren_standing(records, ctx)
    banned = GaugeMetricFamily(
        "siren_boards_banned", "Banned boards, by SIREN's penalty or an operator.", labels=["by"]
    )
    banned.add_metric(["siren"], len(standing[1]) if standing else 0)
    banned.add_metric(["admin"], len(ctx.admin_banned))
    yield banned


def _telemetry(latest: Mapping[str, TelemetryRow], ctx: RunContext) -> Iterable[Metric]:
    """Per-board gauges of each board's latest figures; a figure a board did not send (an
    absent sensor) has no sample for that board."""
    rows = [latest[b] for b in ctx.boards if b in latest]
    round_of = GaugeMetricFamily(
        "siren_board_telemetry_round",
        "Round of the board's latest telemetry figures.",
        labels=["client"],
    )
    for row in rows:
        round_of.add_metric([row.client], row.round)
    yield round_of
    for name, (metric, scale, text) in TELEMETRY_METRICS.items():
        family = GaugeMetricFamily(
            metric, f"{text} Latest round reported; absent sensors: no sample.", labels=["client"]
        )
        for row in rows:
            if name in row.figures:
                family.add_metric([row.client], row.figures[name] * scale)
        yield family
    for prefix, (metric, label, scale, text) in TELEMETRY_FAMILY_METRICS.items():
        family = GaugeMetricFamily(
            metric, f"{text} Latest round reported.", labels=["client", label]
        )
        for row in rows:
            for name, value in row.figures.items():
                head, dot, sensor = name.partition(".")
                if dot and head == prefix:
                    family.add_metric([row.client, sensor], value * scale)
        yield family


def metrics_registry(answers: Answers) -> CollectorRegistry:
    """A registry of the app's own holding one :class:`StoreCollector` over ``answers``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(answers))
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    """The registry's series in the Prometheus text exposition format 0.0.4."""
    return generate_latest(registry)
