"""First-boot script and unit texts; enabling units without systemctl; scrubbing a root of the
build host's files; sparse copies (no arm64 root needed)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from image import firstboot as fb
from image.assemble import (
    copy_sparse,
    disable_unit,
    enable_unit,
    find_leftovers,
    parse_install_section,
    scrub,
)
from image.errors import ImageError
from image.layout import BUNDLE_DIR, FIRSTBOOT_LOG

SCRIPTS = [fb.firstboot_script(), fb.grow_root_script()]


@pytest.mark.parametrize("text", SCRIPTS, ids=["firstboot", "grow-root"])
def test_scripts_are_valid_posix_sh(text: str, tmp_path: Path) -> None:
    script = tmp_path / "s.sh"
    script.write_text(text)
    shell = shutil.which("dash") or "sh"
    proc = subprocess.run([shell, "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert text.startswith("#!/bin/sh\n")


def test_firstboot_installs_with_the_bundles_own_install_sh_then_removes_secrets() -> None:
    text = fb.firstboot_script()
    run = text.index('sh "$BUNDLE/install.sh"')
    check = text.index('if [ "$status" != 0 ]', run)
    wipe = text.index('for f in keys/private.key mqtt.password client.key; do wipe "$BUNDLE/$f"')
    remove = text.index('rm -rf "$BUNDLE"')
    assert run < check < wipe < remove  # secrets are removed only after a successful install
    assert "exit 1" in text[check:wipe]  # a failed install keeps the bundle for the next boot
    assert f"/boot/firmware/{BUNDLE_DIR}" not in text  # the folder is named once, via $FW
    assert f'LOG="$FW/{FIRSTBOOT_LOG}"' in text
    assert "shred -z -u" in text
    assert text.index("date -u -s") < run  # the clock moves before TLS is needed


def test_firstboot_unit_runs_only_when_something_waits_on_the_boot_partition() -> None:
    unit = fb.firstboot_unit()
    conds = [ln for ln in unit.splitlines() if ln.startswith("ConditionPathExists=")]
    assert len(conds) == 3 and all(c.startswith("ConditionPathExists=|") for c in conds)
    assert "RequiresMountsFor=/boot/firmware" in unit
    assert "StandardOutput=journal+console" in unit
    assert parse_install_section(unit)["WantedBy"] == ["multi-user.target"]


def test_image_files_hold_no_identity() -> None:
    files = fb.image_files()
    paths = [f.path for f in files]
    assert len(paths) == len(set(paths))
    joined = "".join(f.text for f in files)
    assert "PRIVATE KEY" not in joined and "board-000" not in joined
    assert {f.path: f.mode for f in files}["/usr/local/sbin/siren-firstboot"] == 0o755
    assert "--any" in fb.wait_online_dropin()


def _unit(root: Path, rel: str, text: str) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


def test_enable_unit_like_systemctl(tmp_path: Path) -> None:
    _unit(
        tmp_path,
        "usr/lib/systemd/system/a.service",
        "[Unit]\n[Install]\nWantedBy=multi-user.target\nAlias=b.service\nAlso=c.socket\n",
    )
    _unit(tmp_path, "usr/lib/systemd/system/c.socket", "[Install]\nWantedBy=sockets.target\n")
    _unit(tmp_path, "usr/lib/systemd/system/t@.service", "[Install]\nWantedBy=multi-user.target\n")
    made = enable_unit(tmp_path, "a.service")
    etc = tmp_path / "etc/systemd/system"
    assert os.readlink(etc / "multi-user.target.wants/a.service") == (
        "/usr/lib/systemd/system/a.service"
    )
    assert os.readlink(etc / "b.service") == "/usr/lib/systemd/system/a.service"
    assert (etc / "sockets.target.wants/c.socket").is_symlink()
    assert len(made) == 3
    enable_unit(tmp_path, "t@wlan0.service")
    assert os.readlink(etc / "multi-user.target.wants/t@wlan0.service").endswith("/t@.service")
    removed = disable_unit(tmp_path, "a.service")
    assert sorted(removed) == ["/etc/systemd/system/b.service",
                               "/etc/systemd/system/multi-user.target.wants/a.service"]  # fmt: skip
    with pytest.raises(ImageError, match="not found"):
        enable_unit(tmp_path, "missing.service")


CERT = "-----BEGIN CERTIFICATE-----\nQUJD\nREVG\n-----END CERTIFICATE-----\n"


def _dirty_root(root: Path, host_ca: Path) -> None:
    (root / "etc/ssl/certs").mkdir(parents=True)
    (root / "etc/ssl/certs/ca-certificates.crt").write_text(CERT)
    (root / "usr/local/share/ca-certificates").mkdir(parents=True)
    (root / "usr/local/share/ca-certificates/host.crt").write_text(CERT)
    (root / "etc/resolv.conf").write_text("nameserver 10.9.9.9\n")
    (root / "etc/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    (root / "etc/ssh").mkdir()
    (root / "etc/ssh/ssh_host_ed25519_key").write_text("key")
    (root / "etc/pip.conf").write_text("[global]\n")
    (root / "root/.config/pip").mkdir(parents=True)
    (root / "var/lib/apt/lists").mkdir(parents=True)
    (root / "var/lib/apt/lists/deb.debian.org_dists_bookworm_InRelease").write_text("x")
    (root / "tmp").mkdir()
    (root / "tmp/leftover").write_text("x")
    host_ca.write_text(CERT)


def test_find_leftovers_and_scrub(tmp_path: Path) -> None:
    root, host_ca = tmp_path / "root", tmp_path / "host-ca.crt"
    root.mkdir()
    _dirty_root(root, host_ca)
    found = "\n".join(find_leftovers(root, [host_ca]))
    for needle in ("resolv.conf", "host-ca.crt", "host.crt", "machine-id", "ssh_host_ed25519_key",
                   "pip.conf", "/root/.config/pip", "apt/lists"):  # fmt: skip
        assert needle in found, needle
    scrub(root, [host_ca])
    # The bundle itself is rebuilt inside the root (update-ca-certificates --fresh).
    (root / "etc/ssl/certs/ca-certificates.crt").write_text("")
    assert find_leftovers(root, [host_ca]) == []
    assert os.readlink(root / "etc/resolv.conf") == "../run/systemd/resolve/stub-resolv.conf"
    assert (root / "etc/machine-id").read_text() == ""
    assert not any((root / "tmp").iterdir())


def test_copy_sparse_keeps_holes(tmp_path: Path) -> None:
    chunk = 4096
    src, dst = tmp_path / "src", tmp_path / "dst"
    data = b"A" * chunk + bytes(3 * chunk) + b"B" * 10
    src.write_bytes(data)
    with open(dst, "wb") as f:
        f.truncate(2 * chunk + len(data))
    copy_sparse(src, dst, 2 * chunk, chunk=chunk)
    out = dst.read_bytes()
    assert out[2 * chunk :] == data and out[: 2 * chunk] == bytes(2 * chunk)
