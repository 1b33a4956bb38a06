"""The boot partition of an image file (or of a card, by its device) through ``mtools``.

Nothing is mounted: ``sfdisk --json`` gives the partition table, and ``mtools`` reads and
writes the FAT filesystem at the boot partition's offset (``-i IMAGE@@OFFSET``). This works on
an image file before it is written and on an unmounted card (``/dev/sdX``, as root).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from image.errors import ImageError
from image.layout import (
    BUNDLE_DIR,
    PREPARED_AT_FILE,
    SSH_KEYS_FILE,
    WIFI_FILE,
    Partition,
    find_boot_partition,
    parse_sfdisk_json,
)

#: Host tools used on boot partitions -> the Debian package providing each.
CARD_TOOLS = {"sfdisk": "fdisk", "mcopy": "mtools", "mdir": "mtools", "mmd": "mtools",
              "mdeltree": "mtools", "minfo": "mtools"}  # fmt: skip
#: Files a directory must hold to be a board bundle.
BUNDLE_FILES = ("install.sh", "board.toml", "keys/client_id", "keys/public.key")


def require_tools(tools: dict[str, str]) -> None:
    """Raise :class:`ImageError` naming the Debian packages of every missing tool."""
    missing = {t: p for t, p in tools.items() if shutil.which(t) is None}
    if missing:
        pkgs = " ".join(sorted(set(missing.values())))
        raise ImageError(
            f"missing host tools {sorted(missing)}: install them with `apt-get install {pkgs}`"
        )


def _mtools_env() -> dict[str, str]:
    # No ~/.mtoolsrc surprises; an image's FAT geometry is not a floppy's.
    return {**os.environ, "MTOOLS_SKIP_CHECK": "1", "MTOOLSRC": "/dev/null"}


def run_mtools(argv: Sequence[str], *, stdout_bytes: bool = False) -> subprocess.CompletedProcess:
    """Run one mtools command; raise :class:`ImageError` with its message when it fails."""
    proc = subprocess.run(list(argv), capture_output=True, env=_mtools_env(), check=False)
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()
        raise ImageError(f"{argv[0]} failed (exit {proc.returncode}): {err[-600:]}")
    return proc


def partitions(image: Path) -> list[Partition]:
    """The partition table of an image file or a card."""
    require_tools({"sfdisk": "fdisk"})
    proc = subprocess.run(
        ["sfdisk", "--json", str(image)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise ImageError(f"{image}: no partition table ({proc.stderr.strip()[-300:]})")
    try:
        return parse_sfdisk_json(proc.stdout)
    except ValueError as exc:
        raise ImageError(f"{image}: {exc}") from exc


def boot_target(image: Path) -> str:
    """The mtools drive of the image's boot partition: ``IMAGE@@OFFSET``."""
    try:
        boot = find_boot_partition(partitions(image))
    except ValueError as exc:
        raise ImageError(f"{image}: {exc}") from exc
    return f"{image}@@{boot.offset}"


def list_boot(image: Path, folder: str = "") -> list[str]:
    """Names in a folder of the boot partition (the top by default)."""
    require_tools(CARD_TOOLS)
    proc = run_mtools(["mdir", "-b", "-i", boot_target(image), f"::/{folder}"])
    names = []
    for line in proc.stdout.decode(errors="replace").splitlines():
        name = line.strip().rstrip("/").rsplit("/", 1)[-1]
        if name and name not in (".", ".."):
            names.append(name)
    return names


def read_boot_file(image: Path, name: str) -> bytes:
    """The content of a file of the boot partition (``name`` relative to its top)."""
    require_tools(CARD_TOOLS)
    return bytes(run_mtools(["mcopy", "-n", "-i", boot_target(image), f"::/{name}", "-"]).stdout)


def boot_exists(image: Path, name: str) -> bool:
    """Whether a file or folder exists on the boot partition."""
    drive = boot_target(image)
    proc = subprocess.run(
        ["mdir", "-b", "-i", drive, f"::/{name}"], capture_output=True, env=_mtools_env(),
        check=False,
    )  # fmt: skip
    return proc.returncode == 0


def free_bytes(image: Path) -> int:
    """Free space of the boot partition (from ``mdir``'s last line)."""
    proc = run_mtools(["mdir", "-i", boot_target(image), "::/"])
    for line in reversed(proc.stdout.decode(errors="replace").splitlines()):
        if "bytes free" in line:
            return int("".join(c for c in line.split("bytes free")[0] if c.isdigit()))
    raise ImageError(f"{image}: mdir printed no free space")


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def check_bundle(bundle: Path) -> str:
    """The board id of a bundle directory, after checking it is one.

    Raises
    ------
    ImageError
        When a file of :data:`BUNDLE_FILES` is missing, or it holds no private key.
    """
    missing = [f for f in BUNDLE_FILES if not (bundle / f).is_file()]
    if missing:
        raise ImageError(
            f"{bundle} is not a board bundle (missing {missing}); make bundles with "
            "`siren deploy init` or `siren deploy add-board`"
        )
    if not (bundle / "keys/private.key").is_file():
        raise ImageError(f"{bundle}: no keys/private.key (a board cannot sign its updates)")
    return (bundle / "keys/client_id").read_text().strip()


def put_file(image: Path, data: bytes, name: str) -> None:
    """Write ``data`` to ``name`` on the boot partition (replacing it)."""
    with tempfile.NamedTemporaryFile() as tmp:
        tmp.write(data)
        tmp.flush()
        run_mtools(["mcopy", "-o", "-i", boot_target(image), tmp.name, f"::/{name}"])


def add_bundle(
    image: Path,
    bundle: Path,
    *,
    replace: bool = False,
    wifi_conf: str | None = None,
    ssh_keys: str | None = None,
    now: float | None = None,
) -> str:
    """Copy a board bundle to the boot partition of an image (or unmounted card).

    The bundle goes to ``siren-bundle/`` with ``.prepared-at`` (the time now, in seconds since
    the epoch: the first boot's clock starts no earlier). Optional Wi-Fi settings and SSH
    public keys go next to it. Returns the board id.

    Raises
    ------
    ImageError
        Not a bundle, a bundle already there without ``replace``, not enough space, tools
        missing.
    """
    require_tools(CARD_TOOLS)
    board = check_bundle(bundle)
    drive = boot_target(image)
    if boot_exists(image, BUNDLE_DIR):
        if not replace:
            raise ImageError(
                f"{image} already holds a bundle in {BUNDLE_DIR}/ (pass --replace to overwrite it)"
            )
        run_mtools(["mdeltree", "-i", drive, f"::/{BUNDLE_DIR}"])
    need = _tree_bytes(bundle) + 64 * 1024
    free = free_bytes(image)
    if need > free:
        raise ImageError(f"the bundle needs {need} bytes, the boot partition has {free} free")
    run_mtools(["mmd", "-i", drive, f"::/{BUNDLE_DIR}"])
    entries = sorted(p for p in bundle.iterdir())
    if entries:
        run_mtools(["mcopy", "-s", "-m", "-i", drive, *map(str, entries), f"::/{BUNDLE_DIR}/"])
    stamp = int(time.time() if now is None else now)
    put_file(image, f"{stamp}\n".encode(), f"{BUNDLE_DIR}/{PREPARED_AT_FILE}")
    if wifi_conf is not None:
        put_file(image, wifi_conf.encode(), WIFI_FILE)
    if ssh_keys is not None:
        put_file(image, ssh_keys.encode(), SSH_KEYS_FILE)
    return board
