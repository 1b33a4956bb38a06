"""Boot partitions of image files through mtools: a small image made like ``siren image build``
makes one, a bundle added and read back (skipped without sfdisk, dosfstools and mtools)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from image import card
from image.assemble import copy_sparse, make_boot_fs
from image.errors import ImageError
from image.layout import BUNDLE_DIR, PREPARED_AT_FILE, WIFI_FILE, plan_layout, sfdisk_script

MIB = 2**20
TOOLS = ("sfdisk", "mkfs.vfat", "fsck.vfat", "mcopy", "mdir", "mmd", "mdeltree")
pytestmark = pytest.mark.skipif(
    any(shutil.which(t) is None for t in TOOLS),
    reason="needs sfdisk (fdisk), mkfs.vfat (dosfstools) and mtools",
)


def _image(tmp_path: Path) -> Path:
    layout = plan_layout(8 * MIB, 64 * MIB)
    files = tmp_path / "boot"
    files.mkdir()
    (files / "config.txt").write_text("arm_64bit=1\n")
    (files / "cmdline.txt").write_text("root=LABEL=SIRENROOT rootwait\n")
    make_boot_fs(files, tmp_path / "boot.vfat", layout.boot.bytes, 0x12345678)
    img = tmp_path / "card.img"
    with open(img, "wb") as f:
        f.truncate(layout.total_bytes)
    subprocess.run(["sfdisk", "-q", "--no-reread", "--no-tell-kernel", str(img)],
                   input=sfdisk_script(layout, 1), text=True, check=True,
                   capture_output=True)  # fmt: skip
    copy_sparse(tmp_path / "boot.vfat", img, layout.boot.offset)
    return img


def _bundle(tmp_path: Path, board: str = "board-007") -> Path:
    b = tmp_path / board
    (b / "keys").mkdir(parents=True)
    (b / "state").mkdir()
    (b / "install.sh").write_text("#!/bin/sh\n")
    (b / "board.toml").write_text("client_id = 'x'\n")
    (b / "keys/client_id").write_text(board + "\n")
    (b / "keys/public.key").write_text("00")
    (b / "keys/private.key").write_text("secret")
    (b / "siren_edge_board-0.1.0-py3-none-any.whl").write_bytes(b"PK" * 1000)
    return b


def test_read_boot_files_of_an_image(tmp_path: Path) -> None:
    img = _image(tmp_path)
    assert set(card.list_boot(img)) >= {"config.txt", "cmdline.txt"}
    assert card.read_boot_file(img, "cmdline.txt") == b"root=LABEL=SIRENROOT rootwait\n"
    assert card.free_bytes(img) > 50 * MIB


def test_add_bundle_copies_it_with_the_preparation_time(tmp_path: Path) -> None:
    img = _image(tmp_path)
    board = card.add_bundle(img, _bundle(tmp_path), now=1_700_000_000, wifi_conf="network={}\n")
    assert board == "board-007"
    names = set(card.list_boot(img, BUNDLE_DIR))
    assert {"install.sh", "board.toml", "keys", "state",
            "siren_edge_board-0.1.0-py3-none-any.whl", PREPARED_AT_FILE} <= names  # fmt: skip
    assert card.read_boot_file(img, f"{BUNDLE_DIR}/keys/private.key") == b"secret"
    assert card.read_boot_file(img, f"{BUNDLE_DIR}/{PREPARED_AT_FILE}") == b"1700000000\n"
    assert card.read_boot_file(img, WIFI_FILE) == b"network={}\n"
    with pytest.raises(ImageError, match="already holds a bundle"):
        card.add_bundle(img, _bundle(tmp_path, "board-008"))
    card.add_bundle(img, tmp_path / "board-008", replace=True)
    assert card.read_boot_file(img, f"{BUNDLE_DIR}/keys/client_id") == b"board-008\n"


def test_add_bundle_refuses_what_is_not_a_bundle(tmp_path: Path) -> None:
    img = _image(tmp_path)
    b = _bundle(tmp_path)
    (b / "install.sh").unlink()
    with pytest.raises(ImageError, match=r"not a board bundle.*install\.sh"):
        card.add_bundle(img, b)
    (b / "install.sh").write_text("")
    (b / "keys/private.key").unlink()
    with pytest.raises(ImageError, match=r"private\.key"):
        card.add_bundle(img, b)


def test_a_file_without_partition_table_is_refused(tmp_path: Path) -> None:
    plain = tmp_path / "plain.img"
    plain.write_bytes(bytes(MIB))
    with pytest.raises(ImageError, match="partition table"):
        card.list_boot(plain)
