"""``siren image ...``: build a Raspberry Pi SD-card image, put a board's bundle on it, check it."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from siren_cli.errors import CommandError


def _wifi(args: argparse.Namespace) -> Any:
    from image.assemble import Wifi

    if not args.wifi_ssid:
        if args.wifi_password:
            raise CommandError("--wifi-password needs --wifi-ssid")
        return None
    if not args.wifi_password:
        raise CommandError("--wifi-ssid needs --wifi-password (WPA2, 8-63 characters)")
    return Wifi(args.wifi_ssid, args.wifi_password, args.wifi_country)


def _ssh_keys(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        text = path.read_text()
    except OSError as exc:
        raise CommandError(f"cannot read the SSH public key {path}: {exc}") from exc
    if "PRIVATE KEY" in text:
        raise CommandError(f"{path} is a private key: give the public one (.pub)")
    if not any(line.startswith(("ssh-", "ecdsa-", "sk-")) for line in text.splitlines()):
        raise CommandError(f"{path} holds no SSH public key (ssh-ed25519 ..., ssh-rsa ...)")
    return text


def _build(args: argparse.Namespace) -> int:
    from image.assemble import BuildOptions, build_image, how_to_write
    from image.errors import ImageError
    from image.layout import summarize

    try:
        options = BuildOptions(
            out=args.out,
            root_cache=args.root,
            mirror=args.mirror,
            rebuild_root=args.rebuild_root,
            hostname=args.hostname,
            ssh_keys=_ssh_keys(args.ssh_key),
            wifi=_wifi(args),
            compress=args.xz,
            xz_level=args.xz_level,
            keep_work=args.keep_work,
        )
        report = build_image(options)
    except (ImageError, ValueError) as exc:
        raise CommandError(str(exc)) from exc
    print("Raspberry Pi boot files (checked statically: QEMU does not run the Pi's boot chain):")
    print(summarize(report.findings))
    steps = ", ".join(f"{k} {v:.0f} s" for k, v in report.steps.items())
    print(f"build steps (the arm64 parts are emulated): {steps}")
    print(how_to_write(report))
    return 0


def _add_bundle(args: argparse.Namespace) -> int:
    from image.card import add_bundle
    from image.errors import ImageError
    from image.layout import wpa_supplicant_conf

    try:
        wifi = _wifi(args)
        conf = (
            wpa_supplicant_conf(wifi.ssid, wifi.passphrase, wifi.country)
            if wifi is not None
            else None
        )
        board = add_bundle(
            args.image, args.bundle, replace=args.replace, wifi_conf=conf,
            ssh_keys=_ssh_keys(args.ssh_key),
        )  # fmt: skip
    except (ImageError, ValueError) as exc:
        raise CommandError(str(exc)) from exc
    print(
        f"{args.image}: bundle of {board} copied to the boot partition (siren-bundle/); on its "
        "first boot the board installs it, removes its private key from the boot partition and "
        f"starts (journalctl -u siren-board-{board}; log in siren-firstboot.log on the boot "
        "partition). The image now holds the board's private key: write it to one card only."
    )
    return 0


def _check(args: argparse.Namespace) -> int:
    import json

    from image.card import list_boot, partitions, read_boot_file
    from image.errors import ImageError
    from image.layout import check_boot_files, required_findings, summarize

    try:
        table = partitions(args.image)
        names = list_boot(args.image)
        config = read_boot_file(args.image, "config.txt").decode(errors="replace")
        cmdline = read_boot_file(args.image, "cmdline.txt").decode(errors="replace")
    except ImageError as exc:
        raise CommandError(str(exc)) from exc
    modules: list[str] = []
    manifest = args.image.with_name(args.image.name + ".manifest.json")
    if manifest.is_file():
        modules = [json.loads(manifest.read_text()).get("kernel", "")]
    for p in table:
        print(f"partition type {p.type}: start {p.start}, {p.bytes / 2**20:.0f} MiB")
    findings = check_boot_files(names, config, cmdline, modules)
    if not modules:
        findings = [f for f in findings if "modules in the root" not in f.what]
        print("(no manifest next to the image: kernel modules not compared)")
    print(summarize(findings))
    if "siren-bundle" in names:
        print("a board bundle is waiting on the boot partition (siren-bundle/)")
    return 0 if all(f.ok for f in required_findings(findings)) else 1


def _wifi_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wifi-ssid", help="Wi-Fi network (optional; wired DHCP always works)")
    p.add_argument("--wifi-password", help="its WPA2 passphrase (stored hashed)")
    p.add_argument("--wifi-country", default="GB", help="regulatory country (default GB)")
    p.add_argument(
        "--ssh-key",
        type=Path,
        help="an SSH public key: root may log in with it (SSH stays off otherwise)",
    )


def register(sub: Any) -> None:
    """Add the ``image`` command group."""
    p = sub.add_parser(
        "image", help="Raspberry Pi SD-card images: build one, put a board's bundle on it, check it"
    )
    p.set_defaults(group_parser=p)
    s = p.add_subparsers(dest="image_command", metavar="ACTION")
    b = s.add_parser(
        "build",
        help="build an SD-card image for Raspberry Pi 4 (as root; first build ~1 h, then minutes)",
    )
    b.add_argument("--out", type=Path, default=Path("siren-board.img"),
                   help="image file (default siren-board.img; also writes .img.xz and "
                   ".img.manifest.json next to it)")  # fmt: skip
    b.add_argument("--root", type=Path, default=None,
                   help="cache folder of the arm64 root (default $SIREN_IMAGE_ROOT or "
                   "~/.cache/siren-edge/image-root-bookworm)")  # fmt: skip
    b.add_argument("--mirror", help="Debian mirror (default: the one apt uses on this machine)")
    b.add_argument("--rebuild-root", action="store_true", help="rebuild the cached root")
    b.add_argument(
        "--hostname",
        default="siren-board",
        help="host name until a bundle names the board (default siren-board)",
    )
    _wifi_options(b)
    b.add_argument("--xz", action=argparse.BooleanOptionalAction, default=True,
                   help="also write IMAGE.xz (default on)")  # fmt: skip
    b.add_argument("--xz-level", type=int, default=6, choices=range(0, 10))
    b.add_argument("--keep-work", action="store_true", help="keep the staging folder")
    b.set_defaults(func=_build)
    a = s.add_parser(
        "add-bundle", help="copy a board's bundle onto the boot partition of an image or card"
    )
    a.add_argument("image", type=Path, help="the image file (or an unmounted card: /dev/sdX)")
    a.add_argument("bundle", type=Path, help="the board's bundle folder (siren deploy)")
    a.add_argument("--replace", action="store_true", help="replace a bundle already there")
    _wifi_options(a)
    a.set_defaults(func=_add_bundle)
    c = s.add_parser("check", help="static checks of an image's Raspberry Pi boot files")
    c.add_argument("image", type=Path)
    c.set_defaults(func=_check)
