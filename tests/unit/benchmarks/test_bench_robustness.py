"""The robustness grid runner: cells, Byzantine bounds, resumption and the summary table."""

from __future__ import annotations

import json

import pytest

from benchmarks.robustness import (
    PAPER_TABLES,
    PRESETS,
    TAIL_ROUNDS,
    Cell,
    aggregator_params,
    cell_command,
    core_groups,
    defender_budget,
    detection_rates,
    finished_cells,
    grid,
    main,
    overview,
    parse_distribution,
    shown_command,
    summarize,
    tail_range,
    with_finished,
)


def test_grid_has_baselines_then_attack_cells():
    cells = grid(["fedavg", "krum"], ["sign_flip"], [0.4, 0.8], ["iid"])
    assert cells[:2] == [Cell("fedavg", "none", 0.0, "iid"), Cell("krum", "none", 0.0, "iid")]
    assert len(cells) == 2 + 2 * 2
    # Naming the baselines as an attack lists them once.
    assert grid(["fedavg"], ["none"], [0.0], ["iid"]) == [Cell("fedavg", "none", 0.0, "iid")]


def test_rules_get_the_true_byzantine_count_or_the_largest_their_bound_allows():
    # K=10, 40% -> f=4: Krum needs K >= 2f+3 = 11 > 10, so it gets f=3; 20% -> f=2 as is.
    krum40 = Cell("krum", "sign_flip", 0.4, "iid")
    assert aggregator_params(krum40, 10) == {"f": 3}
    assert defender_budget(krum40, 10) == 3
    assert aggregator_params(Cell("krum", "sign_flip", 0.2, "iid"), 10) == {"f": 2}
    assert defender_budget(Cell("krum", "sign_flip", 0.2, "iid"), 10) is None
    # Trimmed mean needs K > 2 beta: 80% of 10 -> beta=8 is capped at 4.
    assert aggregator_params(Cell("trimmed_mean", "sign_flip", 0.8, "iid"), 10) == {"beta": 4}
    # Krum cannot run on 2 boards at all (K >= 3 even for f=0).
    assert aggregator_params(Cell("krum", "sign_flip", 0.4, "iid"), 2) is None
    assert aggregator_params(Cell("fedavg", "sign_flip", 0.8, "iid"), 10) == {}
    cmd = cell_command(Cell("krum", "sign_flip", 0.2, "iid"), {"clients": 10}, "out", 0)
    assert cmd is not None
    assert cmd[cmd.index("--agg-param") + 1] == "f=2"
    assert cmd[cmd.index("--malicious") + 1] == "0.2"


def test_smoke_grid_runs_resumes_and_summarizes(tmp_path, capsys):
    argv = [
        "--preset",
        "smoke",
        "--defenses",
        "fedavg,median",
        "--attacks",
        "",
        "--distributions",
        "iid",
        "--results",
        str(tmp_path),
    ]
    assert main([*argv, "--jobs", "2"]) == 0
    first = capsys.readouterr().out
    assert first.count(": done") == 2
    assert (tmp_path / "smoke" / "fedavg__none__0__iid" / "history.json").exists()
    recorded = json.loads((tmp_path / "smoke" / "fedavg__none__0__iid" / "cell.json").read_text())
    assert recorded["threads"] == 1 and len(recorded["cpus"]) == 1
    assert "{results}/smoke/fedavg__none__0__iid" in recorded["command"]
    assert not any(str(tmp_path) in arg for arg in recorded["command"])
    assert main(argv) == 0  # everything finished: nothing is run again
    second = capsys.readouterr().out
    assert " in " not in second.split("| distribution")[0]
    table = (tmp_path / "smoke" / "README.md").read_text()
    assert "| iid | none | 0% | median |" in table


def test_every_cell_gets_one_core_of_its_own():
    groups = core_groups(2)
    assert len(groups) == 2
    assert all(g is not None and len(g) == 1 for g in groups)
    assert not groups[0] & groups[1]  # type: ignore[operator]
    single = core_groups(1)
    assert len(single) == 1 and single[0] is not None and len(single[0]) == 1


def test_malicious_index_section_links_only_finished_cells(tmp_path):
    from benchmarks.robustness import malicious_index_links

    done = Cell("siren", "sign_flip", 0.4, "iid")
    unfinished = Cell("siren", "label_flip", 0.4, "iid")
    for cell in (done, unfinished):
        (tmp_path / cell.key).mkdir()
        (tmp_path / cell.key / "malicious_index.png").write_bytes(b"png")
    (tmp_path / done.key / "history.json").write_text('{"rounds": []}')
    section = malicious_index_links([done, unfinished], tmp_path)
    assert f"({done.key}/malicious_index.png)" in section
    assert unfinished.key not in section
    assert malicious_index_links([unfinished], tmp_path) == ""


def test_siren_cells_name_their_profile():
    def command(defense: str) -> list[str]:
        cmd = cell_command(Cell(defense, "sign_flip", 0.4, "iid"), {"clients": 10}, "o", 0)
        assert cmd is not None and cmd[cmd.index("--aggregator") + 1] == "siren"
        return cmd

    relative = command("siren_relative")
    assert relative[relative.index("--alarm-rule") + 1] == "relative"
    assert relative[relative.index("--siren-profile") + 1] == "paper-text"
    plain = command("siren")
    assert "--alarm-rule" not in plain
    assert plain[plain.index("--siren-profile") + 1] == "authors"
    printed = command("siren_paper_text_no_wa")
    assert printed[printed.index("--siren-profile") + 1] == "paper-text"
    assert "weight_analysis=False" in printed


def test_fang_krum_attacker_simulates_krum_with_the_defenders_f():
    # Ten boards, four attackers: Krum's bound caps the defender at f=3; the attacker must
    # tune its crafted update for that f, not for its own count.
    cmd = cell_command(Cell("krum", "fang_krum", 0.4, "iid"), {"clients": 10}, "o", 0)
    assert cmd is not None
    at = cmd.index("--attack-param")
    assert cmd[at + 1] == "krum_f=3"
    assert "--attack-param" not in cell_command(
        Cell("median", "fang_krum", 0.4, "iid"), {"clients": 10}, "o", 0
    )
    assert "--attack-param" not in cell_command(
        Cell("krum", "fang_trim", 0.4, "iid"), {"clients": 10}, "o", 0
    )


def _fake_cell(root, cell, accuracy):
    out = root / cell.key
    out.mkdir(parents=True)
    summary = {"final_test_accuracy": accuracy, "best_test_accuracy": accuracy}
    (out / "history.json").write_text(json.dumps({"rounds": [{}], "summary": summary}))


def test_overview_shows_the_baseline_and_the_worst_attack_per_fraction(tmp_path):
    cells = grid(["fedavg", "median"], ["sign_flip", "label_flip"], [0.4], ["iid", "noniid"])
    assert overview(cells, tmp_path) == ""  # nothing finished
    results = {
        ("fedavg", "none"): 0.82,
        ("median", "none"): 0.81,
        ("fedavg", "sign_flip"): 0.02,
        ("fedavg", "label_flip"): 0.69,
        ("median", "sign_flip"): 0.77,
    }
    for cell in cells:
        if cell.distribution == "iid" and (cell.defense, cell.attack) in results:
            _fake_cell(tmp_path, cell, results[(cell.defense, cell.attack)])
    table = overview(cells, tmp_path)
    lines = table.splitlines()
    assert lines[0] == (
        "| defense | iid, no attack | iid, 40%: worst | noniid, no attack | noniid, 40%: worst |"
    )
    assert "| fedavg | 82.00% | 2.00% (sign_flip) |  |  |" in lines
    # median's label-flip cell has not run: its worst so far is marked as partial
    assert "| median | 81.00% | 77.00% (sign_flip), 1 of 2 run |  |  |" in lines


def test_summary_counts_honest_boards_banned_and_attackers_missed(tmp_path):
    siren = Cell("siren", "sign_flip", 0.4, "iid")
    krum = Cell("krum", "sign_flip", 0.4, "iid")
    for cell, decision in ((siren, {"rule": "siren", "banned": [2, 3, 4]}), (krum, {})):
        out = tmp_path / cell.key
        out.mkdir()
        summary = {
            "final_test_accuracy": 0.8,
            "best_test_accuracy": 0.8,
            "malicious_ids": [2, 4, 7],
        }
        rounds = [{"decision": {"rule": "siren", "banned": []}}, {"decision": decision}]
        if cell is krum:
            rounds = [{"decision": {"rule": "krum"}}]
        (out / "history.json").write_text(json.dumps({"rounds": rounds, "summary": summary}))
    lines = summarize([siren, krum], tmp_path, 10).splitlines()
    assert "| honest banned | attackers missed |" in lines[0]
    siren_row = next(line for line in lines if "| siren |" in line)
    assert "| 1 (3) | 1 of 3 (7) |" in siren_row
    krum_row = next(line for line in lines if "| krum (f=3) |" in line)
    assert "| 80.00% | 80.00% |  |  |  |  |  |" in krum_row


def test_summary_shows_the_range_of_the_last_rounds(tmp_path):
    cell = Cell("median", "label_flip", 0.4, "iid")
    out = tmp_path / cell.key
    out.mkdir()
    # A run that alternates between two accuracies from round 3 on, and ends on a low round.
    accs = [0.70, 0.80] + [0.85 if t % 2 else 0.45 for t in range(3, 15)]
    rounds = [{"test_accuracy": a} for a in accs]
    summary = {"final_test_accuracy": accs[-1], "best_test_accuracy": max(accs)}
    (out / "history.json").write_text(json.dumps({"rounds": rounds, "summary": summary}))
    lines = summarize([cell], tmp_path, 10).splitlines()
    assert f"| last {TAIL_ROUNDS} rounds |" in lines[0]
    assert "| 45.00% | 85.00% | 45.0–85.0%, mean 65.0% |" in lines[2]
    assert tail_range({"rounds": [{"test_accuracy": None}]}) == ""


def test_pdrr_fallback_defenses_pass_the_safeguard_and_keep_the_krum_attackers_f():
    cmd = cell_command(
        Cell("pdrr_krum_fallback", "fang_krum", 0.4, "noniid"), {"clients": 10}, "o", 0
    )
    assert cmd is not None and cmd[cmd.index("--aggregator") + 1] == "pdrr_krum"
    assert "fallback=True" in cmd and "f=3" in cmd and "krum_f=3" in cmd
    plain = cell_command(Cell("pdrr_krum", "fang_krum", 0.4, "noniid"), {"clients": 10}, "o", 0)
    assert plain is not None and not any(a.startswith("fallback") for a in plain)


def test_distributions_name_the_non_iid_degree():
    assert parse_distribution("iid") == ("iid", None)
    assert parse_distribution("noniid") == ("noniid", None)
    assert parse_distribution("noniid-p0.9") == ("noniid", 0.9)
    assert parse_distribution("classes2") == ("classes2", None)
    for bad in ("noniid-p", "noniid-p1.5", "noniid-pX", "dirichlet", "classes", "classes0"):
        with pytest.raises(ValueError, match="unknown distribution"):
            parse_distribution(bad)


def test_the_dspo_preset_runs_dspos_table_2_setting():
    preset = PRESETS["dspo"]
    cell = Cell("dspo_score", "random_label_flip", 0.4, "noniid-p0.9")
    cmd = cell_command(cell, preset, "o", 0)
    assert cmd is not None

    def opt(name: str) -> str:
        return cmd[cmd.index(name) + 1]

    assert (opt("--partition"), opt("--noniid-p")) == ("noniid", "0.9")
    assert (opt("--clients"), opt("--rounds"), opt("--local-epochs")) == ("20", "100", "2")
    assert (opt("--optimizer"), opt("--learning-rate"), opt("--model")) == (
        "sgd",
        "0.2",
        "dspo-mlp",
    )
    assert (opt("--attack"), opt("--malicious")) == ("random_label_flip", "0.4")
    # m = 8 of k = 20: Krum's bound (k >= 2f + 3) holds, so it is told the true count.
    assert aggregator_params(Cell("krum", "random_label_flip", 0.4, "noniid-p0.1"), 20) == {"f": 8}
    numbers, meaning = PAPER_TABLES["dspo"]
    assert numbers[("dspo_vote", "random_label_flip", 40, "noniid-p0.1")] == 87.98
    assert numbers[("fedavg", "none", 0, "noniid-p0.9")] == 86.00
    assert "DSPO" in meaning


def test_a_preset_brings_its_own_grid_and_paper_column(tmp_path, capsys):
    root = tmp_path / "dspo"
    cell = Cell("dspo_vote", "random_label_flip", 0.4, "noniid-p0.1")
    (root / cell.key).mkdir(parents=True)
    rounds = [{"round": 1, "test_accuracy": 0.88}]
    summary = {"final_test_accuracy": 0.88, "best_test_accuracy": 0.88}
    (root / cell.key / "history.json").write_text(
        json.dumps({"rounds": rounds, "summary": summary})
    )
    assert main(["--preset", "dspo", "--results", str(tmp_path), "--summary-only"]) == 0
    readme = (root / "README.md").read_text()
    row = next(
        line
        for line in readme.splitlines()
        if "| dspo_vote |" in line and "40%" in line and "noniid-p0.1" in line
    )
    assert "| 88.00% |" in row and "| 87.98% | +0.02 |" in row
    assert "| noniid-p0.9 | none | 0% | krum | not run |" in readme
    assert "DSPO's Table 2" in readme and "C_c=4%" not in readme
    with pytest.raises(SystemExit):
        main(["--preset", "dspo", "--distributions", "noniid-p2", "--summary-only"])
    assert "unknown distribution" in capsys.readouterr().err


def test_the_pdrr_preset_runs_each_rule_against_its_own_partial_knowledge_attack(tmp_path):
    preset = PRESETS["pdrr"]
    krum = cell_command(Cell("pdrr_krum", "fang_krum", 0.4, "noniid"), preset, "o", 0)
    assert krum is not None
    attack_params = [krum[i + 1] for i, a in enumerate(krum) if a == "--attack-param"]
    assert attack_params == ["knowledge=partial", "epsilon=1e-07", "lambda_min=1e-09", "krum_f=20"]
    trim = cell_command(Cell("trimmed_mean", "fang_trim", 0.4, "noniid"), preset, "o", 0)
    assert trim is not None and "beta=10" in trim  # PDRR's 2*beta = 20, not beta = c
    assert "knowledge=partial" in trim
    assert main(["--preset", "pdrr", "--results", str(tmp_path), "--summary-only"]) == 0
    readme = (tmp_path / "pdrr" / "README.md").read_text()
    attacked = [line for line in readme.splitlines() if "| fang_" in line]
    # The three PDRR rules and their base rules, each with its attack, and PDRR-trimmed-mean at
    # the q it first ran with.
    assert len(attacked) == 7
    assert not any("| fang_trim |" in line and "krum" in line for line in attacked)
    assert "FAR / MAR at rounds 1, 20, 50, 100" in readme


def test_detection_rates_count_honest_boards_flagged_and_attackers_missed():
    verdicts = {str(i): {} for i in range(10)}
    rounds = [
        {"round": 1, "decision": {"flagged": [2, 4, 6, 7]}, "verdicts": verdicts},
        {"round": 2, "decision": {"flagged": [0, 2, 4]}, "verdicts": verdicts},
        {"round": 3, "decision": {"rule": "krum"}, "verdicts": verdicts},
    ]
    hist = {"rounds": rounds, "summary": {"malicious_ids": [2, 4, 6, 7]}}
    assert detection_rates(hist, (1, 2, 3, 4)) == "r1 0.00/0.00, r2 0.17/0.50, r3 -, r4 -"
    assert detection_rates({"rounds": rounds, "summary": {}}, (1,)) == ""


def test_the_residual_preset_runs_table_4_of_residual_based_reweighting():
    preset = PRESETS["residual"]
    cell = Cell("residual_reweighting", "gaussian_std3", 0.1, "classes2")
    cmd = cell_command(cell, preset, "o", 0)
    assert cmd is not None

    def arg(flag: str) -> str:
        return cmd[cmd.index(flag) + 1]

    assert (arg("--model"), arg("--clients"), arg("--rounds")) == ("rr-cnn", "100", "200")
    assert (arg("--partition"), arg("--classes-per-board")) == ("classes", "2")
    assert (arg("--optimizer"), arg("--learning-rate"), arg("--batch-size")) == (
        "sgd",
        "0.01",
        "128",
    )
    assert (arg("--attack"), arg("--malicious")) == ("gaussian_noise", "0.1")
    assert "std=3.0" in cmd and "mode=multiplicative" in cmd and "delta=0.01" in cmd
    # The paper's number for the cell is Table 4's, and its 0% column is the no-attack row.
    numbers, _ = PAPER_TABLES["residual"]
    assert numbers[("residual_reweighting", "gaussian_std3", 10, "classes2")] == 92.28
    assert numbers[("fedavg", "none", 0, "classes2")] == 93.17


def test_the_summary_keeps_the_cells_earlier_runs_finished(tmp_path):
    for key, finished in (
        ("median__sign_flip__40__iid", True),
        ("siren__label_flip__80__noniid", True),
        ("krum__sign_flip__40__iid", False),  # started, not finished
        ("notes", True),
    ):
        (tmp_path / key).mkdir()
        if finished:
            (tmp_path / key / "history.json").write_text("{}")
    asked = [Cell("fltrust", "sign_flip", 0.4, "iid")]
    assert finished_cells(tmp_path) == [
        Cell("median", "sign_flip", 0.4, "iid"),
        Cell("siren", "label_flip", 0.8, "noniid"),
    ]
    assert with_finished(asked, tmp_path) == [
        Cell("fltrust", "sign_flip", 0.4, "iid"),
        Cell("median", "sign_flip", 0.4, "iid"),
        Cell("siren", "label_flip", 0.8, "noniid"),
    ]
    assert with_finished(asked, tmp_path / "absent") == asked


def test_the_quoted_command_leaves_out_the_machines_own_options() -> None:
    argv = ["--preset", "pdrr", "--no-baselines", "--results", "/some/where", "--jobs", "2"]
    assert shown_command([*argv, "--summary-only"]) == ["--preset", "pdrr", "--no-baselines"]
    assert shown_command(["--preset=k50", "--results=/x", "--jobs=1"]) == ["--preset=k50"]


def test_a_cell_stopped_by_ctrl_c_is_not_finished(tmp_path) -> None:
    from benchmarks.robustness import load_history

    cell = tmp_path / "fedavg__sign_flip__40__iid"
    cell.mkdir()
    (cell / "history.json").write_text(json.dumps({"summary": {"interrupted": True}}))
    assert load_history(cell) is None
    (cell / "history.json").write_text(json.dumps({"summary": {"interrupted": False}}))
    assert load_history(cell) == {"summary": {"interrupted": False}}
