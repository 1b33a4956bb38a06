"""``siren sim run`` / ``siren sim fleet`` as a new user meets them: run folders that are never
shared, help that shows the real defaults, every option checked before anything loads, one-line
errors, a header that says what ``auto`` picked, and a dashboard that outlives the run when asked.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from firmware_sim.fleet_command import (
    RUN_FILES,
    describe_rejections,
    holds_run,
    linger_seconds,
    run_out_dir,
)
from siren_cli.errors import CommandError
from siren_cli.main import main

REPO = Path(__file__).resolve().parents[3]


def _fake_run(folder: Path) -> Path:
    """A folder as a finished fleet run leaves it; returns one of its key files."""
    key = folder / "fleet" / "keys" / "board-000" / "public.key"
    key.parent.mkdir(parents=True)
    key.write_text("ab" * 32 + "\n")
    (folder / "fleet" / "coordinator").mkdir()
    (folder / "fleet" / "coordinator" / "coordinator.sqlite").write_bytes(b"not empty")
    (folder / "history.json").write_text("{}")
    (folder / "accuracy.png").write_bytes(b"png")
    return key


# -- 1. a run folder is never shared ------------------------------------------------------------


def test_without_out_each_fleet_run_gets_a_folder_of_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert run_out_dir(None) == (Path("runs/fleet"), None)
    _fake_run(tmp_path / "runs" / "fleet")
    out, note = run_out_dir(None)
    assert out == Path("runs/fleet-2") and note == "runs/fleet holds an earlier run"
    # An interrupted run (keys and database, no history yet) is a run too.
    (tmp_path / "runs" / "fleet-2" / "fleet" / "keys").mkdir(parents=True)
    (tmp_path / "runs" / "fleet-2" / "fleet" / "keys" / "x").write_text("x")
    assert run_out_dir(None)[0] == Path("runs/fleet-3")
    # An empty folder, or one holding other things, holds no run.
    (tmp_path / "runs" / "fleet-3" / "fleet").mkdir(parents=True)
    assert not holds_run(tmp_path / "runs" / "fleet-3")
    assert run_out_dir(None)[0] == Path("runs/fleet-3")


def test_an_out_folder_holding_a_run_is_refused_unless_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    key = _fake_run(out)
    (out / "notes.txt").write_text("mine, not the run's")
    with pytest.raises(CommandError, match="pass --overwrite to replace it, or give another --out"):
        run_out_dir(str(out))
    assert key.exists()
    assert run_out_dir(str(out), overwrite=True) == (
        out,
        f"removed the earlier run in {out} (--overwrite)",
    )
    assert not any((out / name).exists() for name in RUN_FILES)
    assert (out / "notes.txt").read_text() == "mine, not the run's"  # only the run's files go
    assert run_out_dir(str(out)) == (out, None)


def test_a_second_fleet_into_the_same_out_stops_before_touching_the_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    key = _fake_run(out)
    before = key.read_text()
    code = main(["sim", "fleet", "--dataset", "digits", "--clients", "3", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "--overwrite" in err, err
    assert key.read_text() == before  # the first run's keys are untouched
    assert sorted(p.name for p in (out / "fleet").iterdir()) == ["coordinator", "keys"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--quorum", "1.5"], "--quorum must be in (0, 1], got 1.5"),
        (["--timeout", "-1"], "--timeout must be > 0 seconds, got -1.0"),
        (["--round-timeout", "-2"], "--round-timeout must be >= 0 seconds"),
    ],
)
def test_overwrite_removes_nothing_until_every_option_is_valid(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], options: list[str], message: str
) -> None:
    out = tmp_path / "run"
    key = _fake_run(out)
    argv = ["sim", "fleet", "--dataset", "digits", "--out", str(out), "--overwrite", *options]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert key.exists() and (out / "history.json").exists()


def test_sim_run_never_writes_over_an_earlier_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    argv = ["sim", "run", "--dataset", "digits", "--clients", "2", "--rounds", "1"]
    assert main(argv) == 0
    assert "output: runs/sim\n" in capsys.readouterr().out
    first = (tmp_path / "runs" / "sim" / "history.json").read_text()
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "output: runs/sim-2 (runs/sim holds an earlier run)" in out
    assert (tmp_path / "runs" / "sim" / "history.json").read_text() == first
    # an explicit --out holding a run (of either command) is refused, then replaced on request
    assert main([*argv, "--out", "runs/sim"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "runs" / "sim" / "history.json").read_text() == first
    assert main([*argv, "--out", "runs/sim", "--overwrite"]) == 0
    assert "removed the earlier run in runs/sim (--overwrite)" in capsys.readouterr().out


def test_an_out_folder_that_cannot_be_made_is_refused_before_any_round(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for command in ("run", "fleet"):
        argv = ["sim", command, "--dataset", "digits", "--out", str(blocker / "sub")]
        assert main(argv) == 2
        captured = capsys.readouterr()
        assert "cannot create the output folder" in captured.err
        assert captured.err.count("\n") == 1 and "round" not in captured.out, captured


def test_the_dashboard_url_is_printed_once_it_answers(capsys: pytest.CaptureFixture[str]) -> None:
    import socket
    import time

    from firmware_sim.broker import free_port
    from firmware_sim.fleet_command import _announce_dashboard

    port = free_port()
    thread = _announce_dashboard(port, wait=20.0)
    time.sleep(0.5)
    assert "dashboard" not in capsys.readouterr().out  # nothing listens yet
    with socket.socket() as server:
        server.bind(("127.0.0.1", port))
        server.listen()
        thread.join(10)
    assert capsys.readouterr().out == f"coordinator dashboard: http://127.0.0.1:{port}/\n"


# -- 2. the help says what the fleet really runs -------------------------------------------------


def _help(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as stop:
        main([*argv, "--help"])
    assert stop.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def test_fleet_help_shows_the_demo_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    fleet = _help(capsys, "sim", "fleet")
    assert "siren (see `siren sim aggregators`; default: siren)" in fleet
    assert "default: sign_flip)" in fleet
    assert "fraction of malicious boards (default: 0.4)" in fleet
    assert "default: fedavg" not in fleet
    run = _help(capsys, "sim", "run")
    assert "default: fedavg)" in run
    assert "fleet; default: none)" in run
    assert "fraction of malicious boards (default: 0)" in run


def test_the_header_counts_the_attackers() -> None:
    from firmware_sim.engine import SimConfig
    from firmware_sim.options import describe_attack

    demo = SimConfig(clients=10, aggregator="fedavg", attack="sign_flip", malicious=0.4)
    assert describe_attack(demo) == "attack sign_flip by 4 of 10 boards"
    assert describe_attack(SimConfig(attack="none")) == "attack none"


def test_the_header_gives_sirens_penalty_threshold() -> None:
    from firmware_sim.engine import SimConfig
    from firmware_sim.options import describe_siren_threshold

    assert describe_siren_threshold(SimConfig(aggregator="siren", rounds=10)) == (
        " (ban above C_p = 4 penalties)"  # int(0.45 * 10)
    )
    assert describe_siren_threshold(SimConfig(aggregator="siren", rounds=3)) == (
        " (ban above C_p = 1 penalty)"  # a short run bans at the second penalty
    )
    explicit = SimConfig(aggregator="siren", rounds=3, aggregator_params={"c_p": 2})
    assert describe_siren_threshold(explicit) == " (ban above C_p = 2 penalties)"
    assert describe_siren_threshold(SimConfig(aggregator="median")) == ""


# -- 3. and 4. every option is checked before anything loads, in one line -----------------------


def _run_cli(argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run ``siren ARGV`` in a fresh interpreter; report its exit code, stderr and which heavy
    libraries it had imported by the end."""
    code = (
        "import sys\n"
        "from siren_cli.main import main\n"
        f"rc = main({argv!r})\n"
        "heavy = [m for m in ('tensorflow', 'keras', 'sklearn') if m in sys.modules]\n"
        "print('HEAVY', ','.join(heavy), file=sys.stderr)\n"
        "sys.exit(rc)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
    )
    *lines, heavy = proc.stderr.strip().splitlines()
    assert heavy.startswith("HEAVY"), proc.stderr
    return proc.returncode, "\n".join(lines), heavy[len("HEAVY") :].strip()


BAD_OPTIONS = [
    (["--aggregator", "krum", "--agg-param", "f=9"], "krum needs K >= 2f+3 = 21 clients"),
    (["--aggregator", "krum", "--agg-param", "f=abc"], "f must be an integer, got 'abc'"),
    (["--aggregator", "krum"], "aggregator 'krum' needs parameter(s) f"),
    (["--aggregator", "siren", "--agg-param", "c_z=1"], "unknown siren parameter(s) c_z"),
    (["--aggregator", "bulyan", "--agg-param", "f=2"], "bulyan needs K >= 4f+3 = 11"),
    (
        ["--attack", "sign_flip", "--malicious", "0.3", "--attack-param", "boost=abc"],
        "parameter 'boost' must be a number, got 'abc'",
    ),
    (["--model", "siren-cnn"], "model 'siren-cnn' needs images of at least 10x10"),
    (["--batch-size", "0"], "batch size must be >= 1"),
    (["--device", "GPU"], "--device GPU: unknown aggregation device 'GPU'"),
    (["--device", "cuda:x"], "--device cuda:x: device 'cuda:x': expected cuda:N"),
    (
        ["--partition", "classes", "--classes-per-board", "11"],
        "--classes-per-board must be in [1, 10]",
    ),
]


@pytest.mark.parametrize(("options", "message"), BAD_OPTIONS)
def test_sim_run_refuses_bad_options_before_loading_anything(
    tmp_path: Path, options: list[str], message: str
) -> None:
    argv = ["sim", "run", "--dataset", "digits", *options, "--out", str(tmp_path / "out")]
    code, err, heavy = _run_cli(argv, tmp_path)
    assert code == 2
    assert err.startswith("siren: error: ") and "\n" not in err, err  # one line
    assert message in err
    assert heavy == ""  # neither TensorFlow nor the data was loaded
    assert not (tmp_path / "out").exists()


def test_sim_fleet_refuses_bad_options_before_starting_anything(tmp_path: Path) -> None:
    for options, message in [
        (["--agg-param", "c_s=2"], "c_s must be in [0, 1], got 2.0"),
        (["--broker", "mosquito"], "--broker 'mosquito': expected auto, mosquitto, amqtt"),
        (["--broker", "nohost:99999"], "HOST:PORT of a running broker with a port in 1..65535"),
        (["--linger", "30"], "--linger keeps the dashboard up after the run: give --api-port"),
        (["--ray", "local", "--ray-worker-cpus", "-1"], "--ray-worker-cpus must be a number >= 0"),
    ]:
        argv = ["sim", "fleet", "--dataset", "digits", *options, "--out", str(tmp_path / "out")]
        code, err, heavy = _run_cli(argv, tmp_path)
        assert (code, heavy) == (2, ""), (options, err)
        assert err.startswith("siren: error: ") and "\n" not in err and message in err, err
        assert not (tmp_path / "out").exists()  # no key, no broker, no process


def test_a_model_too_big_for_the_images_is_one_line_without_terminal_codes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        ["sim", "run", "--dataset", "digits", "--model", "siren-cnn", "--out", str(tmp_path)]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "\x1b" not in err
    assert "it was made for 28x28 (Fashion-MNIST)); digits images are 8x8" in err
    assert "use --model digits-cnn or digits-mlp or dspo-mlp, or --dataset fashion-mnist" in err


# -- 6. the header says what auto picked; an unusable SIREN_DATA_DIR is reported ----------------


def test_sim_run_header_says_which_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "no-data"
    empty.mkdir()
    monkeypatch.setenv("SIREN_DATA_DIR", str(empty))
    code = main(
        ["sim", "run", "--dataset", "digits", "--clients", "2", "--rounds", "1",
         "--out", str(tmp_path / "run")]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0
    assert "dataset digits (scikit-learn's bundled 8x8 digits)" in captured.out
    assert "SIREN_DATA_DIR" not in captured.err  # digits never look for Fashion-MNIST
    assert json.loads((tmp_path / "run" / "history.json").read_text())["fleet"]["dataset"] == (
        "digits"
    )


def test_an_unusable_siren_data_dir_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from models.datasets import FASHION_MNIST_FILES, data_dir_problem, describe_dataset

    monkeypatch.delenv("SIREN_DATA_DIR", raising=False)
    assert data_dir_problem() is None
    monkeypatch.setenv("SIREN_DATA_DIR", str(tmp_path / "missing"))
    missing = tmp_path / "missing"
    assert data_dir_problem() == f"SIREN_DATA_DIR={missing} is not a directory; it is ignored"
    monkeypatch.setenv("SIREN_DATA_DIR", str(tmp_path))
    assert "holds none of the Fashion-MNIST files" in (data_dir_problem() or "")
    names = list(FASHION_MNIST_FILES.values())
    for name in names[:2]:
        (tmp_path / name).write_bytes(b"")
    problem = data_dir_problem() or ""
    assert f"holds only {names[0]}, {names[1]} (missing: {names[2]}, {names[3]}" in problem
    for name in names[2:]:
        (tmp_path / name).write_bytes(b"")
    assert data_dir_problem() is None
    assert describe_dataset("auto") == f"fashion-mnist (auto) from {tmp_path}"
    assert describe_dataset("digits") == "digits (scikit-learn's bundled 8x8 digits)"
    monkeypatch.setattr("models.datasets.fashion_mnist_search_paths", lambda: [tmp_path / "x"])
    assert describe_dataset("auto").startswith("digits (auto: Fashion-MNIST is not installed")


def test_sim_run_warns_about_an_unusable_siren_data_dir_before_the_run(tmp_path: Path) -> None:
    argv = ["sim", "run", "--clients", "3", "--rounds", "1", "--train-samples", "300",
            "--test-samples", "100", "--out", str(tmp_path / "run")]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "siren_cli.main", *argv],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO), "SIREN_DATA_DIR": str(tmp_path / "nothing")},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.startswith(
        f"warning: SIREN_DATA_DIR={tmp_path / 'nothing'} is not a directory; it is ignored\n"
    )
    header = proc.stdout.splitlines()[0]
    assert "attack none, dataset " in header
    assert "dataset fashion-mnist (auto) from " in header or "dataset digits (auto: " in header


def test_siren_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("siren ") and out.count("\n") == 1


# -- 7. the dashboard may outlive the run ----------------------------------------------------------


def test_the_dashboard_lingers_only_when_asked_or_watched() -> None:
    # By default: until Ctrl-C for a terminal, not at all for a script or a pipe.
    assert linger_seconds(None, 8080, interactive=True) == math.inf
    assert linger_seconds(None, 8080, interactive=False) == 0.0
    assert linger_seconds(None, None, interactive=True) == 0.0  # no dashboard, nothing to serve
    # --linger says it explicitly, terminal or not.
    assert linger_seconds(30.0, 8080, interactive=False) == 30.0
    assert linger_seconds(0.0, 8080, interactive=True) == 0.0
    assert linger_seconds(math.inf, 8080, interactive=False) == math.inf
    with pytest.raises(CommandError, match="give --api-port"):
        linger_seconds(30.0, None, interactive=True)
    with pytest.raises(CommandError, match="--linger must be >= 0"):
        linger_seconds(-1.0, 8080, interactive=True)


def test_a_fleet_round_line_names_the_reasons_of_refused_messages() -> None:
    assert describe_rejections({}) == ""
    assert describe_rejections({"buffered": 0}) == ""
    assert describe_rejections({"stale_round": 1, "buffered": 2}) == (
        "  rejected 3 (buffered 2, stale_round 1)"
    )


def test_siren_runs_whose_bans_are_unreliable_say_why() -> None:
    from firmware_sim.engine import SimConfig
    from firmware_sim.options import siren_c_p, siren_notes
    from models.datasets import TRAIN_SIZES, load_digits

    assert TRAIN_SIZES["digits"] == len(load_digits().y_train)
    small = SimConfig(dataset="digits", clients=50, rounds=5, aggregator="siren")
    notes = siren_notes(small, siren_c_p(small))
    assert len(notes) == 2
    assert "about 3 local images" in notes[0] and "C_p = 2:" in notes[1]
    paper = SimConfig(dataset="fashion-mnist", clients=10, rounds=40, aggregator="siren")
    assert siren_notes(paper, siren_c_p(paper)) == []
    assert siren_notes(SimConfig(dataset="digits", clients=50, aggregator="fedavg")) == []


def test_ctrl_c_keeps_the_finished_rounds_of_sim_run(tmp_path: Path) -> None:
    import signal

    out = tmp_path / "run"
    argv = [sys.executable, "-m", "siren_cli.main", "sim", "run", "--dataset", "digits"]
    proc = subprocess.Popen(
        [*argv, "--clients", "3", "--rounds", "100000", "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        # A runner started in the background may ignore SIGINT, and its children inherit that
        # (Python then installs no Ctrl-C handler): the command gets the default, as in a shell.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.split("/")[0].split() == ["round", "3"]:
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "holds the finished rounds" in err
    history = json.loads((out / "history.json").read_text())
    assert history["summary"]["interrupted"] is True
    assert len(history["rounds"]) >= 3


def test_sim_run_never_replaces_a_fleet_run_and_removes_only_its_own_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet_run = tmp_path / "fleet-run"
    key = _fake_run(fleet_run)
    argv = ["sim", "run", "--dataset", "digits", "--clients", "2", "--rounds", "1"]
    assert main([*argv, "--out", str(fleet_run), "--overwrite"]) == 2
    assert "holds a fleet run" in capsys.readouterr().err and key.exists()
    mine = tmp_path / "mine"
    assert main([*argv, "--out", str(mine)]) == 0
    (mine / "notes.txt").write_text("kept")
    assert main([*argv, "--out", str(mine), "--overwrite"]) == 0
    assert (mine / "notes.txt").read_text() == "kept" and (mine / "history.json").exists()


def test_an_attack_drawn_by_class_is_checked_before_overwrite_removes_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    argv = ["sim", "run", "--dataset", "digits", "--clients", "10", "--rounds", "1",
            "--partition", "classes", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    before = (out / "history.json").read_text()
    attack = ["--attack", "targeted_label_flip", "--attack-param", "source=1",
              "--attack-param", "target=7", "--attack-param", "holding_class=1"]  # fmt: skip
    assert main([*argv, *attack, "--malicious", "0.8", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "boards holding class 1 were asked for" in err and err.count("\n") == 1
    assert (out / "history.json").read_text() == before
    outside = ["--attack", "label_flip", "--attack-param", "holding_class=12"]
    for command in ("run", "fleet"):
        bad = ["sim", command, "--dataset", "digits", *outside, "--malicious", "0.1"]
        assert main([*bad, "--out", str(tmp_path / command)]) == 2
        assert "'holding_class' must be a class" in capsys.readouterr().err


def test_an_explicit_honest_fleet_is_accepted() -> None:
    import argparse

    from firmware_sim.cli import add_fleet_options, add_run_options
    from firmware_sim.options import config_from_args

    parser = argparse.ArgumentParser()
    add_run_options(parser, aggregator="siren", attack="sign_flip", malicious=0.4)
    add_fleet_options(parser)
    config = config_from_args(parser.parse_args(["--attack", "none", "--malicious", "0"]))
    assert config.malicious == 0.0
    with pytest.raises(CommandError, match="choose the boards of an attack"):
        config_from_args(parser.parse_args(["--attack", "none", "--malicious", "0.3"]))
