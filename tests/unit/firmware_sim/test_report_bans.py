"""Run summaries count honest boards banned and attackers missed."""

from __future__ import annotations

from firmware_sim.report import ban_outcome, format_ban_outcome


def _rounds(*banned: list[int]) -> list[dict]:
    return [
        {"round": i + 1, "decision": {"rule": "siren", "banned": b}} for i, b in enumerate(banned)
    ]


def test_rules_that_never_ban_have_no_outcome():
    rounds = [{"round": 1, "decision": {"rule": "krum"}}, {"round": 2}]
    assert ban_outcome(rounds, [1, 2]) is None
    assert format_ban_outcome(None) is None


def test_final_bans_are_split_into_honest_boards_and_missed_attackers():
    # Board 5 (honest) was banned in round 2 and readmitted; board 3 (honest) stays banned;
    # attackers 2 and 4 are banned, attacker 7 never.
    outcome = ban_outcome(_rounds([], [2, 5], [2, 3, 4]), [2, 4, 7])
    assert outcome == {
        "banned": [2, 3, 4],
        "ever_banned": [2, 3, 4, 5],
        "honest_banned": [3],
        "honest_banned_count": 1,
        "honest_ever_banned": [3, 5],
        "attackers_missed": [7],
        "attackers_missed_count": 1,
    }
    assert format_ban_outcome(outcome) == (
        "banned [2, 3, 4]: 1 honest board banned [3], 1 of 3 attackers missed [7]; "
        "honest boards banned and readmitted: [5]"
    )


def test_a_clean_outcome_and_an_unknown_fleet():
    clean = ban_outcome(_rounds([], [2, 4]), [2, 4])
    assert clean is not None and clean["honest_banned_count"] == 0
    assert (
        format_ban_outcome(clean)
        == "banned [2, 4]: 0 honest boards banned, 0 of 2 attackers missed"
    )
    unknown = ban_outcome(_rounds([1]), None)
    assert unknown == {"banned": [1], "ever_banned": [1]}
    assert format_ban_outcome(unknown) == "banned [1] (malicious boards unknown)"


def test_an_honest_fleet_counts_no_attackers():
    honest = ban_outcome(_rounds([], [3]), [])
    assert format_ban_outcome(honest) == "banned [3]: 1 honest board banned [3] (no attackers)"
