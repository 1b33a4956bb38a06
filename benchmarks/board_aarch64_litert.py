"""The arm64 end-to-end run with litert boards (``board-aarch64 --train-backend litert``).

The same run as :mod:`benchmarks.board_aarch64`, from bundles of ``siren deploy init
--train-backend litert``: each bundle carries the model's LiteRT training artifact and a
``requirements-board.txt`` without TensorFlow, so the arm64 boards' venv (made by the bundle's
own ``install.sh``) holds no TensorFlow and the boards train and alarm in LiteRT. On top of the
run's own checks this module adds the lean board's:

* ``import tensorflow`` fails in the boards' venv;
* each arm64 board logs that its local training runs in litert;
* the venv is under :data:`VENV_LIMIT_MIB` on disk and every arm64 board process peaks under
  :data:`RSS_LIMIT_MIB` (``VmHWM`` of the emulated process, QEMU included: an upper bound).

``siren bench alarm`` inside the root runs in board mode with the bundle's artifact (the plain
mode needs TensorFlow). Results: ``benchmarks/results/board-aarch64-litert.md``.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

#: The lean board's limits: venv on disk and peak RSS of a board process, MiB.
VENV_LIMIT_MIB = 200
RSS_LIMIT_MIB = 250
#: Where the bundles are installed inside the root (``siren deploy init``'s default).
INSTALL_DIR = PurePosixPath("/opt/siren")


def training_backend(log: str) -> str:
    """The training backend a board's log names (``local training runs in litert``), or
    ``keras`` when it names none (a keras board logs nothing about it)."""
    match = re.search(r"local training runs in (\w+)", log)
    return match.group(1) if match else "keras"


def tensorflow_import(ar: Any, root: Path) -> str:
    """What ``import tensorflow`` does in the boards' venv: ``fails (<error>)`` or ``imports``."""
    proc = ar.run_in_root(
        root,
        [str(INSTALL_DIR / "venv" / "bin" / "python"), "-c", "import tensorflow"],
        capture=True,
        check=False,
        timeout=600,
    )
    if proc.returncode == 0:
        return "imports"
    last = (proc.stderr.strip().splitlines() or ["exit status " + str(proc.returncode)])[-1]
    return f"fails ({last.strip()})"


def artifact_inside(bundle: Path) -> str:
    """The training artifact's path on the board, from the bundle's ``board.toml``."""
    with (bundle / "board.toml").open("rb") as fh:
        training = tomllib.load(fh).get("training", {})
    artifact = training.get("artifact")
    if not artifact:
        raise RuntimeError(f"{bundle / 'board.toml'}: no [training] artifact (not a litert bundle)")
    path = PurePosixPath(str(artifact))
    return str(path if path.is_absolute() else INSTALL_DIR / bundle.name / path)


def bench_alarm_argv(bundle: Path, out: str, note: str) -> list[str]:
    """``siren bench alarm`` in board mode on the board's own data and artifact (no
    TensorFlow: the artifact is the bundle's, the data the board's ``data.npz``)."""
    board = INSTALL_DIR / bundle.name
    return [
        str(INSTALL_DIR / "venv" / "bin" / "siren"), "bench", "alarm", "--backends", "litert",
        "--data", str(board / "data.npz"), "--artifact", artifact_inside(bundle),
        "--rounds", "1", "--epochs", "1", "--out", out, "--note", note,
    ]  # fmt: skip


def problems(facts: dict[str, Any], arm_boards: tuple[str, ...]) -> list[str]:
    """The lean board's checks that failed (empty: all passed)."""
    found = []
    if not str(facts.get("tensorflow_import", "")).startswith("fails"):
        found.append(f"import tensorflow in the boards' venv: {facts.get('tensorflow_import')}")
    for board in arm_boards:
        backend = facts.get("train_backend", {}).get(board)
        if backend != "litert":
            found.append(f"{board}: training ran in {backend}, not litert")
    venv_mib = facts.get("sizes", {}).get("venv_bytes", 0) / 2**20
    if not 0 < venv_mib < VENV_LIMIT_MIB:
        found.append(f"boards' venv {venv_mib:.0f} MiB, limit {VENV_LIMIT_MIB} MiB")
    for board in arm_boards:
        peak = facts.get("peak_rss_kib", {}).get(board, 0) / 1024
        if not 0 < peak < RSS_LIMIT_MIB:
            found.append(f"{board}: peak RSS {peak:.0f} MiB, limit {RSS_LIMIT_MIB} MiB")
    return found


def section(facts: dict[str, Any], arm_boards: tuple[str, ...]) -> list[str]:
    """The result file's section on the lean board (Markdown lines)."""
    venv_mib = facts["sizes"]["venv_bytes"] / 2**20
    rows = [
        "## The lean board: litert training, no TensorFlow",
        "",
        "| check | measured | limit | |",
        "|---|---|---|---|",
        f"| `import tensorflow` in the boards' venv | {facts['tensorflow_import']} | must fail | "
        f"{'ok' if str(facts['tensorflow_import']).startswith('fails') else 'FAIL'} |",
        f"| boards' venv on disk (`du -s -B1`) | {venv_mib:.1f} MiB | < {VENV_LIMIT_MIB} MiB | "
        f"{'ok' if venv_mib < VENV_LIMIT_MIB else 'FAIL'} |",
    ]
    for board in arm_boards:
        peak = facts["peak_rss_kib"].get(board, 0) / 1024
        rows.append(
            f"| {board} peak RSS (VmHWM, emulated process, QEMU included) | {peak:.0f} MiB | "
            f"< {RSS_LIMIT_MIB} MiB | {'ok' if 0 < peak < RSS_LIMIT_MIB else 'FAIL'} |"
        )
    for board in arm_boards:
        backend = facts["train_backend"].get(board)
        rows.append(
            f"| {board} local training (its log) | {backend} | litert | "
            f"{'ok' if backend == 'litert' else 'FAIL'} |"
        )
    rows += [
        "",
        "The peak RSS is the emulated process's high-water mark, which under QEMU user emulation "
        "includes the emulator and its translation cache: an upper bound for a board.",
        "",
    ]
    return rows


__all__ = [
    "RSS_LIMIT_MIB",
    "VENV_LIMIT_MIB",
    "artifact_inside",
    "bench_alarm_argv",
    "problems",
    "section",
    "tensorflow_import",
    "training_backend",
]
