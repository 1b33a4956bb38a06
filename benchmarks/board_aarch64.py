"""The deployment path end to end, with boards in an arm64 userland (``siren bench board-aarch64``).

What a board owner does, on this machine: ``siren deploy init`` for three boards, the generated
TLS-only Mosquitto and the coordinator (SIREN, digits) on the host; two boards installed inside
an arm64 Debian bookworm root (the base of Raspberry Pi OS 64-bit, run through QEMU user
emulation: :mod:`benchmarks.arm64_root`) by their bundle's own ``install.sh``, started as the
service account exactly as the systemd unit's ``ExecStart`` would (systemd does not run in a
chroot); the third board simulated on the host from its bundle. Then:

1. at least three rounds complete, the arm64 boards' alarm runs in LiteRT, their updates are
   admitted; per round: each board's time from the round's opening to its update's admission,
   the peak RSS of each board process, the global model's accuracy;
2. one arm64 board is killed with ``kill -9`` while a round waits for its update, restarted, and
   its update is counted once; the run completes;
3. the broker listens on its TLS port only (no plain text), and an arm64 board cannot publish on
   another board's topic or on the global topic;
4. ``siren bench alarm`` runs inside the arm64 root at its smallest setting;
5. the board's installed size and import times are measured.

Timings inside the root are emulated (QEMU on x86-64), never board figures: the result file says
so on every table. Results: ``benchmarks/results/board-aarch64.md``. With ``--train-backend
litert`` the boards train and alarm in LiteRT without TensorFlow installed, and the lean board's
checks are added (:mod:`benchmarks.board_aarch64_litert`; ``board-aarch64-litert.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks import help_description

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
EMULATED = (
    "Timings inside the arm64 root are emulated (QEMU user emulation on an x86-64 host): they "
    "are not board figures."
)
ARM_BOARDS = ("board-000", "board-001")
HOST_BOARD = "board-002"


def _say(line: str) -> None:
    print(f"[board-aarch64] {line}", flush=True)


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, poll: float = 0.5) -> Any:
    """``predicate()``'s first truthy value, polled every ``poll`` s; ``TimeoutError`` naming
    ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def query_readonly(db: Path, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Rows of ``sql`` on the SQLite file ``db`` opened read-only (none while it is missing or
    locked: a coordinator may be writing it)."""
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5.0) as conn:
            return conn.execute(sql, args).fetchall()
    except sqlite3.Error:
        return []


def _status_kib(pid: int, field: str) -> int | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


class Processes:
    """Started processes with their logs, stopped at the end whatever happens."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.peak_kib: dict[str, int] = {}

    def log(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def add(self, name: str, proc: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
        self.procs[name] = proc
        return proc

    def spawn(self, name: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen[bytes]:
        handle = open(self.log(name), "ab")  # noqa: SIM115 - owned by the child
        try:
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            proc = subprocess.Popen(
                list(argv), stdout=handle, stderr=handle, stdin=subprocess.DEVNULL, env=env, **kw
            )
        finally:
            handle.close()
        return self.add(name, proc)

    def sample(self) -> dict[str, int]:
        """Peak RSS so far (VmHWM, KiB) of every running process, remembered past its end."""
        for name, proc in self.procs.items():
            if proc.poll() is None:
                peak = _status_kib(proc.pid, "VmHWM")
                if peak is not None:
                    self.peak_kib[name] = max(self.peak_kib.get(name, 0), peak)
        return dict(self.peak_kib)

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        proc = self.procs.get(name)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)


def _siren_host() -> list[str]:
    return [sys.executable, "-m", "siren_cli.main"]


def _acl_probe_script() -> str:
    return r"""
import json, sys, threading, time
from edge_client.config import BoardConfig
from protocol.mqtt import make_mqtt_client
settings = BoardConfig.load(sys.argv[1]).broker
run = sys.argv[2]
acks, connected = {}, threading.Event()
client = make_mqtt_client(settings, settings.username)
client.on_connect = lambda c, u, f, rc, p: connected.set()
client.on_publish = lambda c, u, mid, rc, p: acks.__setitem__(mid, rc.value)
client.connect(settings.host, settings.port, keepalive=10)
client.loop_start()
connected.wait(30)
out = {}
for name, topic in (("own update", f"siren/v1/{run}/update/{settings.username}"),
                    ("another board's update", f"siren/v1/{run}/update/board-002"),
                    ("the global model", f"siren/v1/{run}/global")):
    info = client.publish(topic, b"acl probe", qos=1)
    deadline = time.monotonic() + 30
    while info.mid not in acks and time.monotonic() < deadline:
        time.sleep(0.05)
    out[name] = acks.get(info.mid)
client.disconnect()
client.loop_stop()
print(json.dumps(out))
"""


def run_check(args: argparse.Namespace) -> dict[str, Any]:
    """Run the whole check; return the measurements (raises on a failed step)."""
    from benchmarks import arm64_root as ar
    from benchmarks import board_aarch64_litert as lean
    from deploy.checks import check_broker

    t_start = time.monotonic()
    litert = args.train_backend == "litert"
    facts: dict[str, Any] = {"steps": {}, "train_backend_run": args.train_backend}
    steps = facts["steps"]

    t0 = time.monotonic()
    report = ar.build_root(ar.root_path(args.root))
    root = report.root
    steps["arm64 root (built or reused)"] = time.monotonic() - t0
    _say(f"arm64 root ready at {root}")

    base = Path(tempfile.mkdtemp(prefix="siren-aarch64-"))
    base.chmod(0o755)  # Mosquitto's own account must reach the broker folder
    workdir = base
    dep = workdir / "deployment"
    broker_port, api_port = _free_ports(2)
    t0 = time.monotonic()
    init = [
        *_siren_host(), "deploy", "init", str(dep), "--run", "aarch64", "--boards", "3",
        "--broker-host", "127.0.0.1", "--broker-port", str(broker_port),
        "--bind", "127.0.0.1", "--rounds", str(args.rounds), "--aggregator", "siren",
        "--dataset", "digits", "--api-port", str(api_port),
        # An emulated board takes minutes to start: every round waits for every board.
        "--round-timeout", "0", "--train-backend", args.train_backend,
    ]  # fmt: skip
    subprocess.run(init, check=True, cwd=REPO)
    steps["siren deploy init"] = time.monotonic() - t0
    procs = Processes(workdir)
    db = dep / "coordinator" / "coordinator.sqlite"
    try:
        mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        procs.spawn("mosquitto", [mosquitto, "-c", str(dep / "broker" / "mosquitto.conf")])
        wait_for(lambda: _port_open(broker_port), 20, "the broker")
        findings = check_broker(
            (dep / "broker" / "mosquitto.conf").resolve(), "127.0.0.1", broker_port,
            dep / "coordinator" / "ca.crt", pids=[procs.procs["mosquitto"].pid],
        )  # fmt: skip
        facts["broker_checks"] = [(f.ok, f.what) for f in findings]
        if not all(f.ok for f in findings):
            raise RuntimeError(f"broker check failed: {findings}")
        _say("broker: TLS port only, verified handshake, plain text refused")
        procs.spawn(
            "coordinator",
            [*_siren_host(), "coordinator", "run", "--config",
             str(dep / "coordinator" / "coord.toml")],
            cwd=REPO,
        )  # fmt: skip
        with ar.session(root) as pip:
            inside = root / "tmp" / "bundles"
            if inside.exists():
                shutil.rmtree(inside)
            for old in ("opt/siren", *(f"home/{b}" for b in ARM_BOARDS)):
                if args.fresh_venv or old != "opt/siren":
                    shutil.rmtree(root / old, ignore_errors=True)
            if not args.fresh_venv:
                for board in ARM_BOARDS:
                    shutil.rmtree(root / "opt" / "siren" / board, ignore_errors=True)
            installs: dict[str, float] = {}
            for board in ARM_BOARDS:
                shutil.copytree(dep / "boards" / board, inside / board)
                t0 = time.monotonic()
                ar.run_in_root(
                    root, ["sh", f"/tmp/bundles/{board}/install.sh", "--no-systemd"], pip=pip
                )
                installs[board] = time.monotonic() - t0
                _say(f"{board}: installed by its install.sh in {installs[board]:.0f} s")
            facts["install_seconds"] = installs
            facts["unit_verify"] = _verify_unit(ar, root, ARM_BOARDS[0], pip)
            facts["sizes"] = _sizes(ar, root, dep)
            facts["import_seconds"] = _import_times(ar, root, tensorflow=not litert)
            if litert:
                facts["tensorflow_import"] = lean.tensorflow_import(ar, root)
            facts["versions"] = _versions(ar, root)

            def start_arm(board: str) -> None:
                log = open(procs.log(board), "ab")  # noqa: SIM115 - owned by the child
                try:
                    proc = ar.start_in_root(
                        root,
                        ["/opt/siren/venv/bin/siren", "client", "run", "--config",
                         f"/opt/siren/{board}/board.toml"],
                        user="siren", cwd=f"/opt/siren/{board}",
                        env={"PYTHONUNBUFFERED": "1"}, stdout=log, stderr=log,
                    )  # fmt: skip
                finally:
                    log.close()
                procs.add(board, proc)

            for board in ARM_BOARDS:
                start_arm(board)
            procs.spawn(
                HOST_BOARD,
                [*_siren_host(), "client", "run", "--config",
                 str(dep / "boards" / HOST_BOARD / "board.toml")],
                cwd=REPO,
            )  # fmt: skip
            facts["kill"] = {}
            facts["rounds"] = _follow_run(
                procs, db, args.rounds, args.kill_round, start_arm, facts["kill"]
            )
            coord = procs.procs["coordinator"]
            wait_for(lambda: coord.poll() is not None, 600, "the coordinator to finish")
            facts["coordinator_exit"] = coord.returncode
            summary = [
                line for line in procs.log("coordinator").read_text().splitlines()
                if line.startswith("run aarch64 finished")
            ]  # fmt: skip
            facts["coordinator_summary"] = summary[-1] if summary else ""
            for board in (*ARM_BOARDS, HOST_BOARD):
                proc = procs.procs[board]
                wait_for(lambda: proc.poll() is not None, 300, f"{board} to exit")  # noqa: B023
            facts["board_exits"] = {b: procs.procs[b].returncode for b in (*ARM_BOARDS, HOST_BOARD)}
            facts["peak_rss_kib"] = procs.sample()
            logs = {b: procs.log(b).read_text() for b in (*ARM_BOARDS, HOST_BOARD)}
            facts["alarm_backend"] = {b: _alarm_backend(text) for b, text in logs.items()}
            facts["train_backend"] = {b: lean.training_backend(t) for b, t in logs.items()}
            probe = root / "tmp" / "acl_probe.py"
            probe.write_text(_acl_probe_script())
            out = ar.run_in_root(
                root,
                ["/opt/siren/venv/bin/python", "/tmp/acl_probe.py",
                 f"/opt/siren/{ARM_BOARDS[0]}/board.toml", "aarch64"],
                user="siren", capture=True, pip=pip, timeout=300,
            )  # fmt: skip
            facts["acl_probe"] = json.loads(out.stdout.strip().splitlines()[-1])
            _say(f"ACL probe from the arm64 board: {facts['acl_probe']}")
            t0 = time.monotonic()
            md = "/tmp/alarm-aarch64.md"
            bench_argv = (
                lean.bench_alarm_argv(dep / "boards" / ARM_BOARDS[0], md, "emulated")
                if litert  # board mode: the plain mode needs TensorFlow
                else ["/opt/siren/venv/bin/siren", "bench", "alarm", "--data",
                      f"/opt/siren/{ARM_BOARDS[0]}/data.npz", "--rounds", "1", "--epochs", "1",
                      "--out", md, "--note", EMULATED]
            )  # fmt: skip
            bench = ar.run_in_root(
                root, bench_argv, capture=True, pip=pip, timeout=3600, cwd="/tmp"
            )
            steps["siren bench alarm inside the root"] = time.monotonic() - t0
            facts["bench_alarm"] = (root / "tmp" / "alarm-aarch64.md").read_text()
            facts["bench_alarm_stdout"] = bench.stdout[-2000:]
        facts["duplicates"] = query_readonly(
            db, "SELECT round, count FROM decisions WHERE reason = 'duplicate' ORDER BY round"
        )
        facts["updates_per_round"] = query_readonly(
            db, "SELECT round, client FROM updates ORDER BY round, client"
        )
        facts["telemetry"] = {
            client: (rnd, json.loads(figures))
            for client, rnd, figures in query_readonly(
                db, "SELECT client, round, figures FROM telemetry ORDER BY client, round"
            )
        }  # the latest round each board reported figures for
        verify = subprocess.run(
            [*_siren_host(), "audit", "verify", str(db)], capture_output=True, text=True,
            cwd=REPO, check=False,
        )  # fmt: skip
        facts["audit_verify"] = verify.stdout.strip()
    finally:
        procs.stop_all()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
        else:
            _say(f"kept {base}")
    facts["wall_seconds"] = time.monotonic() - t_start
    _check(facts, args.rounds)
    return facts


def _free_ports(count: int) -> list[int]:
    from firmware_sim.broker import free_ports

    return free_ports(count)


def _port_open(port: int) -> bool:
    from firmware_sim.broker import wait_for_port

    return wait_for_port("127.0.0.1", port, 0.2)


def _alarm_backend(log: str) -> str:
    match = re.search(r"SIREN alarm runs in (\w+)", log)
    return match.group(1) if match else "not logged"


def _follow_run(
    procs: Processes,
    db: Path,
    rounds: int,
    kill_round: int,
    restart: Callable[[str], None],
    kill_facts: dict[str, Any],
) -> list[dict[str, Any]]:
    """Watch the rounds close; ``kill -9`` the second arm64 board while round ``kill_round``
    waits for its update, restart it; return one row per closed round."""
    victim = ARM_BOARDS[1]
    killed = False
    kill_facts.clear()
    rows: list[dict[str, Any]] = []
    deadline = time.monotonic() + 3600
    while time.monotonic() < deadline:
        procs.sample()
        closed = query_readonly(
            db, "SELECT round, opened_at, closed_at, record FROM rounds WHERE status = 'closed' "
            "ORDER BY round",
        )  # fmt: skip
        for rnd, opened, closed_at, record in closed[len(rows) :]:
            rec = json.loads(record)
            arrivals = dict(
                query_readonly(
                    db, "SELECT client, received_at FROM updates WHERE round = ?", (rnd,)
                )
            )
            rows.append(
                {
                    "round": rnd,
                    "seconds": closed_at - opened,
                    "accuracy": rec.get("test_accuracy"),
                    "board_seconds": {c: t - opened for c, t in sorted(arrivals.items())},
                    "alarms": rec.get("alarms"),
                    "peak_rss_kib": dict(procs.peak_kib),
                    "case": (rec.get("decision") or {}).get("case"),
                }
            )
            _say(f"round {rnd} closed in {closed_at - opened:.0f} s, accuracy "
                 f"{100 * (rec.get('test_accuracy') or 0):.2f}%")  # fmt: skip
        if len(rows) >= rounds:
            return rows
        current = query_readonly(db, "SELECT value FROM meta WHERE key = 'current_round'")
        open_round = int(current[0][0]) if current else 0
        if not killed and open_round >= kill_round:
            mine = query_readonly(
                db, "SELECT 1 FROM updates WHERE round = ? AND client = ?", (open_round, victim)
            )
            # The round is open and the board's update is not in yet (it is receiving the model,
            # running its alarm or training): kill it now. If it was faster than this poll,
            # the next round is tried.
            if not mine:
                _say(f"kill -9 {victim} while round {open_round} waits for its update")
                procs.stop(victim, signal.SIGKILL)
                killed = True
                kill_facts["round"] = open_round
                restart(victim)
        time.sleep(0.05 if not killed else 0.5)
    raise TimeoutError("the run did not finish within an hour")


def _verify_unit(ar: Any, root: Path, board: str, pip: Any) -> str:
    """``systemd-analyze verify`` of the installed bundle's unit, by the root's own systemd (the
    Debian ``systemd`` package is installed into the root the first time): it checks the unit
    against the root's users and files, as on a board."""
    if not (root / "usr" / "bin" / "systemd-analyze").exists():
        _say("installing Debian's systemd into the root for systemd-analyze (once)")
        ar.run_in_root(root, ["apt-get", "update", "-q"], capture=True, pip=pip, timeout=1800)
        ar.run_in_root(
            root,
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", "systemd"],
            env={"DEBIAN_FRONTEND": "noninteractive"},
            capture=True, pip=pip, timeout=3600,
        )  # fmt: skip
    unit = f"siren-board-{board}.service"
    shutil.copyfile(root / "opt" / "siren" / board / unit, root / "etc/systemd/system" / unit)
    try:
        proc = ar.run_in_root(
            root, ["systemd-analyze", "verify", f"/etc/systemd/system/{unit}"],
            capture=True, check=False, timeout=600,
        )  # fmt: skip
    finally:
        (root / "etc/systemd/system" / unit).unlink(missing_ok=True)
    out = (proc.stdout + proc.stderr).strip()
    return "passes" if proc.returncode == 0 else f"FAILS: {out[-500:]}"


def _sizes(ar: Any, root: Path, dep: Path) -> dict[str, Any]:
    venv = root / "opt" / "siren" / "venv"
    wheel = next(iter(sorted((dep / "dist").glob("*.whl"))))
    return {
        "venv_bytes": ar.du_bytes(venv),
        "wheel_bytes": wheel.stat().st_size,
        "largest": ar.largest_packages(root),
        "packages": sorted(ar.pip_freeze(root)),
    }


def _import_times(ar: Any, root: Path, tensorflow: bool = True) -> dict[str, float]:
    out = {}
    for name, code in (
        ("board program without TensorFlow (edge_client.client)", "import edge_client.client"),
        *((("TensorFlow", "import tensorflow"),) if tensorflow else ()),
        ("LiteRT interpreter", "from ai_edge_litert.interpreter import Interpreter"),
    ):
        t0 = time.monotonic()
        ar.run_in_root(root, ["/opt/siren/venv/bin/python", "-c", code], capture=True)
        out[name] = time.monotonic() - t0
    return out


def _versions(ar: Any, root: Path) -> dict[str, str]:
    freeze = ar.pip_freeze(root)
    python = ar.run_in_root(
        root, ["/opt/siren/venv/bin/python", "-c", "import sys, platform; "
               "print(platform.python_version(), platform.machine())"], capture=True,
    ).stdout.strip()  # fmt: skip
    keep = ("tensorflow", "ai-edge-litert", "numpy", "pynacl", "paho-mqtt", "siren-edge-board")
    return {"python": python, **{k: freeze[k] for k in keep if k in freeze}}


def _check(facts: dict[str, Any], rounds: int) -> None:
    from benchmarks import board_aarch64_litert as lean

    problems = lean.problems(facts, ARM_BOARDS) if facts["train_backend_run"] == "litert" else []
    if len(facts.get("rounds", [])) < rounds:
        problems.append("not every round closed")
    if facts.get("coordinator_exit") != 0:
        problems.append(f"coordinator exit {facts.get('coordinator_exit')}")
    for board, code in facts.get("board_exits", {}).items():
        if code != 0:
            problems.append(f"{board} exit {code}")
    for board in ARM_BOARDS:
        if facts.get("alarm_backend", {}).get(board) != "litert":
            problems.append(f"{board}: alarm not in LiteRT")
    counts: dict[tuple[int, str], int] = {}
    for rnd, client in facts.get("updates_per_round", []):
        counts[(rnd, client)] = counts.get((rnd, client), 0) + 1
    if any(n != 1 for n in counts.values()) or len(counts) != 3 * rounds:
        problems.append(f"updates per round and board: {counts}")
    if facts.get("unit_verify") != "passes":
        problems.append(f"systemd unit: {facts.get('unit_verify')}")
    if not facts.get("kill"):
        problems.append("no arm64 board was killed mid-round")
    probe = facts.get("acl_probe", {})
    if not (probe.get("own update", 255) < 128 and probe.get("another board's update") == 135
            and probe.get("the global model") == 135):  # fmt: skip
        problems.append(f"ACL probe {probe}")
    if not facts.get("audit_verify", "").startswith("ok"):
        problems.append(f"audit: {facts.get('audit_verify')}")
    for board in (*ARM_BOARDS, HOST_BOARD):
        _, figures = facts.get("telemetry", {}).get(board, (None, {}))
        lacking = [n for n in ("rss_peak_mib", "alarm_s", "train_s") if n not in figures]
        if lacking:
            problems.append(f"{board}: no telemetry figure {', '.join(lacking)}")
    facts["problems"] = problems


def _telemetry_row(board: str, telemetry: dict[str, Any]) -> str:
    from protocol.telemetry import FIGURES

    if board not in telemetry:
        return f"| {board} | - | none reported | |"
    rnd, figures = telemetry[board]
    shown = ", ".join(f"{name} {value:.4g}" for name, value in sorted(figures.items()))
    absent = ", ".join(n for n in FIGURES if n not in figures and n != "process_boards")
    return f"| {board} | {rnd} | {shown} | {absent} |"


def write_results(facts: dict[str, Any], out: Path, argv: Sequence[str]) -> str:
    """The Markdown result file."""
    from benchmarks import board_aarch64_litert as lean

    mib = 1024 * 1024
    litert = facts["train_backend_run"] == "litert"
    lines = [
        "# Boards in an arm64 userland, end to end"
        + (": litert boards, no TensorFlow" if litert else ""),
        "",
        f"**{EMULATED}**",
        "",
        f"Command: `siren bench board-aarch64 {' '.join(argv)}` ({facts['wall_seconds'] / 60:.0f} "
        f"min on a shared 2-core {platform.machine()} host). Root: Debian bookworm arm64 "
        "(`debootstrap --variant=minbase`, the base of Raspberry Pi OS 64-bit) under QEMU user "
        "emulation; two boards (board-000, board-001) installed there by their bundle's "
        "`install.sh --no-systemd` and started as the service account with the unit's "
        "`ExecStart`; board-002 on the host; the broker (generated TLS-only Mosquitto) and the "
        "coordinator (SIREN, digits) on the host."
        + (
            " Bundles from `siren deploy init --train-backend litert`: every board trains and "
            "alarms with the model's LiteRT training artifact; the boards' venv has no TensorFlow."
            if litert
            else ""
        ),
        "",
        "Outcome: "
        + (
            "**all checks passed**"
            if not facts["problems"]
            else "**FAILED**: " + "; ".join(facts["problems"])
        ),
        "",
        *(lean.section(facts, ARM_BOARDS) if litert else []),
        "## Versions inside the root",
        "",
        *(f"- {k}: {v}" for k, v in facts["versions"].items()),
        "",
        "## Rounds (emulated timings)",
        "",
        "| round | accuracy | SIREN case | round time | board-000 | board-001 | board-002 (host) "
        "| peak RSS board-000 / board-001 / board-002 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in facts["rounds"]:
        bs = r["board_seconds"]
        rss = r["peak_rss_kib"]
        lines.append(
            f"| {r['round']} | {100 * (r['accuracy'] or 0):.2f}% | {r.get('case')} | "
            f"{r['seconds']:.1f} s | "
            + " | ".join(f"{bs[b]:.1f} s" if b in bs else "-" for b in (*ARM_BOARDS, HOST_BOARD))
            + " | "
            + " / ".join(f"{rss.get(b, 0) / 1024:.0f} MiB" for b in (*ARM_BOARDS, HOST_BOARD))
            + " |"
        )
    peak = facts["peak_rss_kib"]
    sizes = facts["sizes"]
    lines += [
        "",
        "Board columns: seconds from the round's opening to the admission of the board's update "
        "(alarm, training, signing, publishing); round 1 opened when the coordinator started, "
        "before the arm64 boards were installed, so its times include their installation and "
        "emulated start. Peak RSS: the process's high-water mark "
        "(VmHWM) so far; inside the root this is the QEMU process, emulator included.",
        "",
        "Final peak RSS: "
        + ", ".join(f"{b} {v / 1024:.0f} MiB" for b, v in sorted(peak.items()) if "board" in b),
        f"Coordinator: `{facts['coordinator_summary']}` (exit {facts['coordinator_exit']}); "
        f"boards exited {facts['board_exits']}.",
        f"Alarm backend logged by each board: {facts['alarm_backend']}.",
        "",
        "## Telemetry the boards reported (emulated)",
        "",
        "Each board's figures of the latest round it reported (its status message; "
        "`protocol/telemetry.py`). Inside the root the sensors are the host's as QEMU passes "
        "them through, and memory and times are the emulator's: not board figures.",
        "",
        "| board | round | figures | absent |",
        "|---|---|---|---|",
        *(_telemetry_row(b, facts.get("telemetry", {})) for b in (*ARM_BOARDS, HOST_BOARD)),
        "",
        "## kill -9 of an arm64 board mid-round",
        "",
        f"board-001 was killed while round {facts['kill'].get('round')} waited for its update "
        "and restarted; updates per round and board (each exactly once): "
        + ", ".join(f"r{r}:{c}" for r, c in facts["updates_per_round"])
        + f". Duplicates counted by the coordinator (resends of a pending update): "
        f"{facts['duplicates'] or 'none'}.",
        "",
        "## Broker and ACLs",
        "",
        *(f"- {'ok' if ok else 'FAIL'}: {what}" for ok, what in facts["broker_checks"]),
        f"- from inside the arm64 root, board-000's credentials: PUBACK reason codes "
        f"{facts['acl_probe']} (below 128: accepted; 135: not authorized)",
        f"- round log: `{facts['audit_verify']}`",
        f"- the bundle's systemd unit, installed, `systemd-analyze verify` by the arm64 root's "
        f"own systemd: {facts['unit_verify']}",
        "",
        "## Installed size and start-up (emulated)",
        "",
        f"- board venv: {sizes['venv_bytes'] / mib:.0f} MiB; the board wheel "
        f"{sizes['wheel_bytes'] / 1024:.0f} KiB. Largest packages: "
        + ", ".join(f"{n} {b / mib:.0f} MiB" for n, b in sizes["largest"]),
        f"- installed packages: {', '.join(sizes['packages'])}",
        "- install.sh (the first board's creates the venv from nothing and installs its "
        "requirements from PyPI; the second finds them and installs its wheel): "
        + ", ".join(f"{b} {s:.0f} s" for b, s in facts["install_seconds"].items()),
        "- import times: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in facts["import_seconds"].items()),
        "",
        "## siren bench alarm inside the root (smallest setting, emulated)",
        "",
        re.sub(r"^# [^\n]*\n", "", facts["bench_alarm"].strip()).strip(),
        "",
        "## Steps",
        "",
        *(f"- {k}: {v:.0f} s" for k, v in facts["steps"].items()),
        "",
    ]
    text = "\n".join(lines)
    out.write_text(text)
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check and write the result file."""
    p = argparse.ArgumentParser(
        prog="siren bench board-aarch64", description=help_description(__doc__)
    )
    p.add_argument("--rounds", type=int, default=4, help="rounds of the run (default: 4)")
    p.add_argument(
        "--kill-round", type=int, default=2, help="round in which a board is killed (default 2)"
    )
    p.add_argument("--root", type=Path, default=None, help="arm64 root (default: the cache)")
    p.add_argument("--out", type=Path, help="default: results/board-aarch64[-litert].md")
    p.add_argument(
        "--train-backend", default="keras", choices=["keras", "litert"],
        help="the boards' training runtime (litert: bundles without TensorFlow, and the lean "
        "board's checks: no TensorFlow, venv and peak RSS limits)",
    )  # fmt: skip
    p.add_argument("--keep", action="store_true", help="keep the working folder")
    p.add_argument(
        "--fresh-venv",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="let install.sh create the boards' venv from nothing (default; pip's cache inside "
        "the root makes a second run quick)",
    )
    argv_list = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv_list)
    if args.out is None:
        suffix = "-litert" if args.train_backend == "litert" else ""
        args.out = RESULTS / f"board-aarch64{suffix}.md"
    if os.geteuid() != 0:
        p.error("needs root (chroot, mounts, the service account inside the root)")
    # SIGTERM unwinds like Ctrl-C: processes are stopped and the root's mounts released.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    facts = run_check(args)
    print(write_results(facts, args.out, argv_list))
    print(f"wrote {args.out}")
    return 0 if not facts["problems"] else 1


if __name__ == "__main__":
    sys.exit(main())
