"""Boot the SD-card image under QEMU and watch its board join a fleet (``siren bench image-boot``).

What a board owner does with ``siren image``, on this machine:

1. ``siren image build`` (or an image given with ``--image``); ``siren image check`` of its
   Raspberry Pi boot files (static: QEMU hands kernel, initrd and device tree to the guest
   itself, so the Pi's own boot chain of ``bootcode.bin``/``start*.elf``/``config.txt`` does not
   run);
2. ``siren deploy init`` for two boards; the generated TLS-only Mosquitto, the coordinator
   (SIREN, digits) and board-001 (simulated from its bundle) run on the host;
3. a copy of the image, one GiB larger than built (a card bigger than the image: first boot grows
   the root filesystem), gets board-000's bundle with ``siren image add-bundle``;
4. ``qemu-system-aarch64`` boots the copy's own kernel, initrd and ``cmdline.txt`` (software
   emulation). The guest's network is QEMU's user-mode network with ``restrict=on``: it reaches
   nothing but the broker, through one forwarding rule (``guestfwd``) from ``10.0.2.100:PORT``
   inside the guest to the broker's loopback port, relayed by a small program QEMU starts for
   each connection. No traffic leaves the machine; in particular the first boot installs the
   bundle without PyPI;
5. the check follows the console (first boot, root growth) and the coordinator's database
   (board-000's updates) until ``--rounds`` rounds closed, then powers the guest off and reads
   the card: the bundle and its private key are gone from the boot partition, the key is
   installed at 0600 in the root filesystem, the partition grew.

Machines: ``-M virt`` by default (``--machine raspi3b`` tries the Raspberry Pi 3 model with the
image's own device tree): QEMU 7.2 has no Raspberry Pi 4 model, and its ``raspi3b`` has a fixed
1 GiB of memory (the board's TensorFlow process peaked at 546 MiB there with the digits MLP;
the project's docs ask for 2 GB boards), USB networking only, no real-time clock, and it is
slower (``benchmarks/results/image-raspi3b.md``: the board's first update 574 s after power-on,
against 283 s on ``virt``). ``virt`` runs
the same kernel, initrd and root filesystem with a Cortex-A72 (the Pi 4's core), 2 GiB and
virtio disk and network.

Every timing inside the guest is emulated (QEMU TCG on an x86-64 host): not board figures.
Results: ``benchmarks/results/image.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import help_description

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
EMULATED = (
    "Timings inside the guest are emulated (QEMU system emulation, TCG, on a shared x86-64 "
    "host): they are not board figures."
)
GUEST_BOARD = "board-000"
HOST_BOARD = "board-001"
#: The broker's address inside the guest (QEMU forwards it to the host's loopback).
GUEST_BROKER_IP = "10.0.2.100"
#: Host tools of the check -> Debian package.
CHECK_TOOLS = {
    "qemu-system-aarch64": "qemu-system-arm",
    "mosquitto": "mosquitto",
    "openssl": "openssl",
    "debugfs": "e2fsprogs",
    "sfdisk": "fdisk",
    "mcopy": "mtools",
}
#: Console lines that mark the guest's progress, in the order they are expected.
MILESTONES = {
    "kernel started": r"Booting Linux on physical CPU",
    "systemd started": r"systemd\[1\]: systemd \d+",
    "root filesystem grown": r"siren-grow-root: .* grown from",
    "first boot: installing the bundle": r"siren-firstboot: installing board",
    "first boot: board installed and started": r"siren-firstboot: board \S+ installed and started",
    "board service started": r"Started siren-board-board-000",
    "board: TensorFlow loaded, alarm in LiteRT": r"board-000: SIREN alarm runs in",
}

RELAY = r"""
import os, select, socket, sys
sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
fds = [0, sock.fileno()]
while True:
    ready, _, _ = select.select(fds, [], [])
    if 0 in ready:
        data = os.read(0, 65536)
        if not data:
            sock.shutdown(socket.SHUT_WR)
            fds.remove(0)
        else:
            sock.sendall(data)
    if sock.fileno() in ready:
        data = sock.recv(65536)
        if not data:
            break
        os.write(1, data)
"""


def _say(line: str) -> None:
    print(f"[image-boot] {line}", flush=True)


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _siren() -> list[str]:
    return [sys.executable, "-m", "siren_cli.main"]


def missing_tools() -> dict[str, str]:
    """Host tools of the check that are not installed -> their Debian packages."""
    return {t: p for t, p in CHECK_TOOLS.items() if shutil.which(t) is None}


def qemu_command(
    machine: str,
    *,
    kernel: Path,
    initrd: Path,
    dtb: Path | None,
    append: str,
    disk: Path,
    relay: Sequence[str],
    broker_port: int,
    console: Path,
    qmp: Path,
    memory_mib: int,
    smp: int,
) -> list[str]:
    """The ``qemu-system-aarch64`` command line booting ``disk`` on ``machine`` (``virt`` or
    ``raspi3b``) with user-mode networking restricted to one forwarded port."""
    fwd = f"guestfwd=tcp:{GUEST_BROKER_IP}:{broker_port}-cmd:{' '.join(relay)}"
    net = f"user,id=net0,restrict=on,{fwd}"
    cmd = ["qemu-system-aarch64", "-M", machine, "-kernel", str(kernel), "-initrd", str(initrd),
           "-append", append, "-display", "none", "-monitor", "none",
           "-serial", f"file:{console}", "-qmp", f"unix:{qmp},server=on,wait=off",
           "-no-reboot", "-netdev", net]  # fmt: skip
    if machine == "virt":
        cmd += ["-cpu", "cortex-a72", "-smp", str(smp), "-m", str(memory_mib),
                "-drive", f"file={disk},format=raw,if=none,id=disk0,cache=writeback",
                "-device", "virtio-blk-pci,drive=disk0",
                "-device", "virtio-net-pci,netdev=net0,romfile=", "-rtc", "base=utc"]  # fmt: skip
    elif machine == "raspi3b":
        if dtb is None:
            raise ValueError("raspi3b needs the image's bcm2837-rpi-3-b.dtb")
        cmd += ["-dtb", str(dtb), "-m", "1G", "-smp", "4",
                "-drive", f"file={disk},format=raw,if=sd",
                "-device", "usb-net,netdev=net0"]  # fmt: skip
    else:
        raise ValueError(f"machine must be virt or raspi3b, got {machine!r}")
    return cmd


def guest_cmdline(cmdline_txt: str, machine: str) -> str:
    """The image's own ``cmdline.txt``, plus the serial console QEMU records (last, so it is
    ``/dev/console``) and the journal forwarded to it (so the board's log is on the console)."""
    serial = "ttyAMA0"  # PL011 on virt and on raspi3b's first UART
    return (
        " ".join(cmdline_txt.split())
        + f" console={serial},115200 systemd.journald.forward_to_console=1"
        + " systemd.log_color=0"
    )


def next_power_of_two(n: int) -> int:
    """The smallest power of two ``>= n`` (QEMU's SD card model needs such sizes)."""
    return 1 << max(0, (n - 1).bit_length())


def _qmp(sock_path: Path, command: str) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(sock_path))
        s.recv(65536)
        s.sendall(b'{"execute": "qmp_capabilities"}\n')
        s.recv(65536)
        s.sendall(json.dumps({"execute": command}).encode() + b"\n")
        s.recv(65536)


def _debugfs(disk: Path, offset: int, request: str) -> str:
    proc = subprocess.run(
        ["debugfs", "-R", request, f"{disk}?offset={offset}"], capture_output=True, text=True,
        check=False,
    )  # fmt: skip
    return proc.stdout


def _build_image(out: Path) -> tuple[float, str]:
    t0 = time.monotonic()
    proc = subprocess.run(
        [*_siren(), "image", "build", "--out", str(out)], cwd=REPO, capture_output=True,
        text=True, check=False,
    )  # fmt: skip
    (out.parent / "build.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"siren image build failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return time.monotonic() - t0, proc.stdout


def run_check(args: argparse.Namespace) -> dict[str, Any]:
    """Run the whole check; return what was measured (``problems`` lists failed checks)."""
    from benchmarks.board_aarch64 import Processes, query_readonly, wait_for
    from deploy.checks import check_broker
    from firmware_sim.broker import free_ports
    from image import card
    from image.layout import BUNDLE_DIR, FIRSTBOOT_LOG, find_boot_partition, parse_config_txt

    facts: dict[str, Any] = {"machine": args.machine, "milestones": {}, "steps": {}}
    base = Path(tempfile.mkdtemp(prefix="siren-image-boot-", dir=args.workdir))
    base.chmod(0o755)  # Mosquitto's own account must reach the broker folder
    procs = Processes(base)
    try:
        if args.image is None:
            _say("building the image with `siren image build` (cached root reused if present)")
            image = base / "siren-board.img"
            seconds, out = _build_image(image)
            facts["build_seconds"], facts["build_stdout"] = seconds, out
        else:
            image = args.image.absolute()
        manifest_path = image.with_name(image.name + ".manifest.json")
        facts["manifest"] = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
        xz = image.with_name(image.name + ".xz")
        if not facts["manifest"].get("xz_bytes") and xz.exists():
            # compressed after the build (``xz -k``): measure that file
            from image.assemble import sha256_file

            facts["manifest"]["xz_bytes"] = xz.stat().st_size
            facts["manifest"]["xz_sha256"] = sha256_file(xz)
        check = subprocess.run([*_siren(), "image", "check", str(image)], cwd=REPO,
                               capture_output=True, text=True, check=False)  # fmt: skip
        facts["image_check"] = (check.returncode, check.stdout.strip())

        dep = base / "deployment"
        broker_port, api_port = free_ports(2)
        init = [
            *_siren(), "deploy", "init", str(dep), "--run", "image", "--boards", "2",
            "--broker-host", GUEST_BROKER_IP, "--hostname", "127.0.0.1",
            "--coordinator-host", "127.0.0.1", "--broker-port", str(broker_port),
            "--bind", "127.0.0.1", "--rounds", str(args.rounds), "--aggregator", "siren",
            "--dataset", "digits", "--api-port", str(api_port), "--round-timeout", "0",
        ]  # fmt: skip
        subprocess.run(init, check=True, cwd=REPO, capture_output=True)
        # board-001 runs on the host: it reaches the broker at the loopback address (also in
        # the broker's certificate), not at the guest's forwarded one.
        host_toml = dep / "boards" / HOST_BOARD / "board.toml"
        host_toml.write_text(
            host_toml.read_text().replace(f'host = "{GUEST_BROKER_IP}"', 'host = "127.0.0.1"')
        )
        mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        procs.spawn("mosquitto", [mosquitto, "-c", str(dep / "broker" / "mosquitto.conf")])
        wait_for(lambda: _port_open(broker_port), 30, "the broker")
        findings = check_broker(
            (dep / "broker" / "mosquitto.conf").resolve(), "127.0.0.1", broker_port,
            dep / "coordinator" / "ca.crt", pids=[procs.procs["mosquitto"].pid],
        )  # fmt: skip
        facts["broker_checks"] = [(f.ok, f.what) for f in findings]
        coord_toml = dep / "coordinator" / "coord.toml"
        procs.spawn("coordinator", [*_siren(), "coordinator", "run", "--config", str(coord_toml)],
                    cwd=REPO)  # fmt: skip
        procs.spawn(HOST_BOARD, [*_siren(), "client", "run", "--config", str(host_toml)],
                    cwd=REPO)  # fmt: skip

        disk = base / "card.img"
        subprocess.run(["cp", "--sparse=always", str(image), str(disk)], check=True)
        size = image.stat().st_size + 1024 * 2**20
        if args.machine == "raspi3b":
            size = next_power_of_two(size)
        with open(disk, "r+b") as f:
            f.truncate(size)
        facts["card_bytes"] = size
        table_before = card.partitions(disk)
        t0 = time.monotonic()
        subprocess.run([*_siren(), "image", "add-bundle", str(disk),
                        str(dep / "boards" / GUEST_BOARD)], check=True, cwd=REPO,
                       capture_output=True)  # fmt: skip
        facts["steps"]["siren image add-bundle"] = time.monotonic() - t0

        config = card.read_boot_file(disk, "config.txt").decode()
        lines = parse_config_txt(config)
        kname = [v for s, k, v in lines if k == "kernel"][-1]
        iname = [v.split()[0] for s, k, v in lines if k == "initramfs"][-1]
        kernel, initrd = base / kname, base / iname
        kernel.write_bytes(card.read_boot_file(disk, kname))
        initrd.write_bytes(card.read_boot_file(disk, iname))
        dtb = None
        if args.machine == "raspi3b":
            dtb = base / "bcm2837-rpi-3-b.dtb"
            dtb.write_bytes(card.read_boot_file(disk, dtb.name))
        cmdline_txt = card.read_boot_file(disk, "cmdline.txt").decode()
        append = guest_cmdline(cmdline_txt, args.machine)
        relay = base / "relay.py"
        relay.write_text(RELAY)
        console, qmp = base / "console.log", base / "qmp.sock"
        cmd = qemu_command(
            args.machine, kernel=kernel, initrd=initrd, dtb=dtb, append=append, disk=disk,
            relay=[sys.executable, str(relay), str(broker_port)], broker_port=broker_port,
            console=console, qmp=qmp, memory_mib=args.memory, smp=args.smp,
        )  # fmt: skip
        facts["qemu_command"] = cmd
        facts["kernel_files"] = (kname, iname, cmdline_txt.strip())
        _say(f"booting {disk.name} on -M {args.machine}: console in {console}")
        facts["load"] = {"start": round(os.getloadavg()[0], 1)}
        t_boot = time.monotonic()
        wall_boot = time.time()
        procs.spawn("qemu", ["nice", "-n", "10", *cmd])
        db = dep / "coordinator" / "coordinator.sqlite"
        deadline = t_boot + args.timeout
        milestones: dict[str, float] = facts["milestones"]
        rounds: list[tuple[Any, ...]] = []
        while time.monotonic() < deadline:
            text = console.read_text(errors="replace") if console.exists() else ""
            for name, pattern in MILESTONES.items():
                if name not in milestones and re.search(pattern, text):
                    milestones[name] = time.monotonic() - t_boot
                    _say(f"{milestones[name]:6.0f} s  {name}")
            mine = query_readonly(db, "SELECT round, received_at FROM updates WHERE client = ? "
                          "ORDER BY round", (GUEST_BOARD,))  # fmt: skip
            if mine and "board-000 joined: first update admitted" not in milestones:
                milestones["board-000 joined: first update admitted"] = mine[0][1] - wall_boot
                _say(f"{mine[0][1] - wall_boot:6.0f} s  board-000's first update admitted")
            rounds = query_readonly(db, "SELECT round, opened_at, closed_at, record FROM rounds "
                            "WHERE status = 'closed' ORDER BY round")  # fmt: skip
            if len(rounds) >= args.rounds:
                break
            if procs.procs["qemu"].poll() is not None:
                facts["qemu_exit"] = procs.procs["qemu"].returncode
                _say(f"QEMU exited early (status {facts['qemu_exit']}): see the console log")
                break
            time.sleep(2)
        facts["boot_to_rounds_seconds"] = time.monotonic() - t_boot
        facts["load"]["end"] = round(os.getloadavg()[0], 1)
        facts["rounds"] = [
            {"round": r, "seconds": c - o, "accuracy": json.loads(rec).get("test_accuracy")}
            for r, o, c, rec in rounds
        ]
        facts["updates"] = query_readonly(
            db, "SELECT round, client FROM updates ORDER BY round, client"
        )
        coord = procs.procs["coordinator"]
        finished = len(rounds) >= args.rounds
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: coord.poll() is not None, 300 if finished else 1, "the coordinator")
        facts["coordinator_exit"] = coord.returncode
        summary = [ln for ln in procs.log("coordinator").read_text().splitlines()
                   if ln.startswith("run image finished")]  # fmt: skip
        facts["coordinator_summary"] = summary[-1] if summary else ""
        # The run is over: the board exits 0 and its unit stays down. Power the guest off.
        time.sleep(10 if finished else 0)
        qemu = procs.procs["qemu"]
        t_off = time.monotonic()
        try:
            _qmp(qmp, "system_powerdown")
            wait_for(lambda: qemu.poll() is not None, 180, "the guest to power off")
            facts["poweroff"] = f"clean, {time.monotonic() - t_off:.0f} s after the power button"
        except (OSError, TimeoutError) as exc:
            facts["poweroff"] = f"not clean ({exc}); QEMU stopped"
            procs.stop("qemu")
        text = console.read_text(errors="replace") if console.exists() else ""
        facts["console_tail"] = text[-6000:]
        facts["board_console"] = [
            ln for ln in text.splitlines() if "siren-board" in ln or "siren-firstboot" in ln
            or "siren-grow-root" in ln
        ][:80]  # fmt: skip
        # What the card holds now.
        names = card.list_boot(disk)
        facts["bundle_left_on_fat"] = BUNDLE_DIR in names
        facts["firstboot_log"] = (
            card.read_boot_file(disk, FIRSTBOOT_LOG).decode(errors="replace")
            if FIRSTBOOT_LOG in names else ""
        )  # fmt: skip
        table_after = card.partitions(disk)
        facts["root_partition_mib"] = (table_before[1].bytes / 2**20, table_after[1].bytes / 2**20)
        root_offset = table_after[1].offset
        key = f"/opt/siren/{GUEST_BOARD}/keys/private.key"
        facts["installed_key_stat"] = _debugfs(disk, root_offset, f"stat {key}")[:600]
        facts["passwd_siren"] = [
            ln for ln in _debugfs(disk, root_offset, "cat /etc/passwd").splitlines()
            if ln.startswith("siren:")
        ]  # fmt: skip
        facts["hostname"] = _debugfs(disk, root_offset, "cat /etc/hostname").strip()
        facts["machine_id"] = _debugfs(disk, root_offset, "cat /etc/machine-id").strip()
        boot = find_boot_partition(table_after)
        facts["boot_partition"] = (boot.start, boot.bytes)
        host_board = procs.procs[HOST_BOARD]
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: host_board.poll() is not None, 120 if finished else 1, HOST_BOARD)
    finally:
        procs.stop_all()
        if args.keep:
            _say(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    _check(facts, args.rounds)
    return facts


def _check(facts: dict[str, Any], rounds: int) -> None:
    problems = []
    if "qemu_exit" in facts:
        problems.append(f"QEMU exited before the rounds were done (status {facts['qemu_exit']})")
    if len(facts.get("rounds", [])) < rounds:
        problems.append(f"{len(facts.get('rounds', []))} of {rounds} rounds closed")
    guest_rounds = {r for r, c in facts.get("updates", []) if c == GUEST_BOARD}
    if len(guest_rounds) < min(rounds, 2):
        problems.append(f"board-000 (in QEMU) sent updates in rounds {sorted(guest_rounds)}")
    if facts.get("image_check", (1, ""))[0] != 0:
        problems.append("siren image check failed")
    if facts.get("bundle_left_on_fat"):
        problems.append("the bundle is still on the boot partition")
    stat = facts.get("installed_key_stat", "")
    if "Mode:  0600" not in stat:
        problems.append("the installed private key is not at mode 0600")
    before, after = facts.get("root_partition_mib", (0, 0))
    if after <= before:
        problems.append(f"the root partition did not grow ({before:.0f} -> {after:.0f} MiB)")
    if not all(ok for ok, _ in facts.get("broker_checks", [])):
        problems.append("broker checks")
    if "installed and started" not in facts.get("firstboot_log", ""):
        problems.append("siren-firstboot.log does not say the board was installed")
    if not facts.get("machine_id"):
        problems.append("the booted board has no machine id")
    facts["problems"] = problems


def write_results(facts: dict[str, Any], out: Path, argv: Sequence[str]) -> str:
    """The Markdown result file."""
    mib = 2**20
    m = facts.get("manifest", {})
    steps = m.get("steps_seconds", {})
    stages = m.get("root_stage_seconds", {})
    debs = m.get("debian_packages", {})
    pys = m.get("python_packages", {})
    key_debs = ["linux-image-arm64", "raspi-firmware", "firmware-brcm80211", "systemd",
                "openssh-server", "python3", "python3.11", "wpasupplicant"]  # fmt: skip
    key_kernel = [k for k in debs if k.startswith("linux-image-6")]
    key_pys = ["tensorflow", "ai-edge-litert", "keras", "numpy", "pynacl", "paho-mqtt",
               "siren-edge-board"]  # fmt: skip
    log = facts.get("firstboot_log", "").strip().splitlines()
    log_lines = [ln for ln in log if not ln.startswith("Requirement already satisfied")]
    pip_lines = len(log) - len(log_lines)
    load = facts.get("load", {})
    lines = [
        "# Raspberry Pi SD-card image: build, and first boot under QEMU",
        "",
        f"**{EMULATED}**",
        "",
        f"Command: `siren bench image-boot {' '.join(argv)}` on a shared 2-core "
        f"{platform.machine()} host. The image was built by `siren image build` (Debian "
        f"{m.get('suite', 'bookworm')} arm64 from {m.get('mirror', '?')}, kernel "
        f"{m.get('kernel', '?')}), a copy one GiB larger got board-000's bundle with "
        "`siren image add-bundle`, and `qemu-system-aarch64 -M "
        f"{facts['machine']}` booted the copy's own kernel, initrd and `cmdline.txt`. The "
        "coordinator (SIREN, digits), the TLS-only Mosquitto and board-001 ran on the host; "
        "the guest reached the broker only through one QEMU user-mode forwarding rule "
        "(`restrict=on`: nothing else, no Internet, no PyPI).",
        "",
        f"Host load average (1 min) at the start of the boot and at the end: "
        f"{load.get('start', '?')}, {load.get('end', '?')} (two cores shared with other jobs).",
        "",
        "Outcome: "
        + (
            "**all checks passed**"
            if not facts["problems"]
            else "**FAILED**: " + "; ".join(facts["problems"])
        ),
        "",
        "## Build",
        "",
        "| step | time |",
        "|---|---:|",
        *(
            f"| root stage {k} (emulated, cached afterwards) | {v:.0f} s |"
            for k, v in stages.items()
        ),
        # the manifest keeps its keys sorted: the total (xz included) goes last
        *(
            f"| {k} | {v:.0f} s |"
            for k, v in sorted(steps.items(), key=lambda kv: kv[0] == "total")
        ),
        "",
        f"- image: {m.get('raw_bytes', 0) / mib:.0f} MiB raw, "
        + (f"{m['xz_bytes'] / mib:.0f} MiB with xz" if m.get("xz_bytes") else "not compressed")
        + f"; files in the root filesystem: {m.get('root_content_bytes', 0) / mib:.0f} MiB",
        f"- SHA-256 of this build: `{m.get('sha256', '?')}` (raw), "
        f"`{m.get('xz_sha256', '?')}` (xz)",
        f"- partitions: FAT32 boot at sector {m.get('layout', {}).get('boot_start')} "
        f"({m.get('layout', {}).get('boot_sectors', 0) * 512 / mib:.0f} MiB), ext4 root at sector "
        f"{m.get('layout', {}).get('root_start')} "
        f"({m.get('layout', {}).get('root_sectors', 0) * 512 / mib:.0f} MiB; grown on first boot)",
        "",
        "## Package versions (all in the image's manifest)",
        "",
        *(f"- {k}: {debs[k]}" for k in [*key_kernel, *key_debs] if k in debs),
        *(f"- {k} (venv): {pys[k]}" for k in key_pys if k in pys),
        f"- {len(debs)} Debian packages, {len(pys)} Python distributions in the venv",
        "",
        "## Raspberry Pi boot files (static checks)",
        "",
        "QEMU passes kernel, initrd and device tree to the guest itself: the Pi's boot chain "
        "(`bootcode.bin`, `start*.elf`, `config.txt`, `cmdline.txt`) does not run there and "
        "is checked statically by `siren image check`:",
        "",
        "```",
        facts["image_check"][1],
        "```",
        "",
        f"## First boot under QEMU -M {facts['machine']} (emulated)",
        "",
        f"QEMU: `{' '.join(facts['qemu_command'])}`",
        "",
        "| milestone | seconds after QEMU started |",
        "|---|---:|",
        *(f"| {k} | {v:.0f} |" for k, v in facts["milestones"].items()),
        "",
        f"Rounds ({len(facts['rounds'])} closed; round 1 waited for the guest to boot):",
        "",
        "| round | time | accuracy |",
        "|---|---:|---:|",
        *(
            f"| {r['round']} | {r['seconds']:.0f} s | {100 * (r['accuracy'] or 0):.2f}% |"
            for r in facts["rounds"]
        ),
        "",
        f"- updates admitted: {', '.join(f'r{r}:{c}' for r, c in facts['updates'])}",
        f"- coordinator: `{facts.get('coordinator_summary', '')}` "
        f"(exit {facts.get('coordinator_exit')})",
        f"- guest power-off: {facts.get('poweroff')}",
        "",
        "## The card after the run",
        "",
        f"- bundle left on the boot partition: {facts.get('bundle_left_on_fat')}",
        f"- root partition: {facts['root_partition_mib'][0]:.0f} MiB as built, "
        f"{facts['root_partition_mib'][1]:.0f} MiB after first boot (card "
        f"{facts['card_bytes'] / mib:.0f} MiB)",
        f"- host name: `{facts.get('hostname')}`; machine id made at first boot: "
        f"`{facts.get('machine_id')}`; service account: `{facts.get('passwd_siren')}`",
        "- installed private key (debugfs `stat`):",
        "",
        "```",
        facts.get("installed_key_stat", "").strip()[:400],
        "```",
        "",
        "`siren-firstboot.log` on the boot partition (pip's `Requirement already satisfied` "
        f"lines left out: {pip_lines}, one per installed library; none downloaded):",
        "",
        "```",
        "\n".join(log_lines)[-3000:],
        "```",
        "",
    ]
    text = "\n".join(lines)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check and write the result file."""
    p = argparse.ArgumentParser(
        prog="siren bench image-boot", description=help_description(__doc__)
    )
    p.add_argument("--image", type=Path, help="a built image (default: build one now)")
    p.add_argument("--machine", choices=("virt", "raspi3b"), default="virt")
    p.add_argument("--rounds", type=int, default=3, help="rounds of the run (default 3)")
    p.add_argument("--memory", type=int, default=2048, help="guest memory, MiB (virt only)")
    p.add_argument("--smp", type=int, default=2, help="guest cores (virt only)")
    p.add_argument("--timeout", type=float, default=5400, help="seconds for boot and rounds")
    p.add_argument("--workdir", type=Path, default=None, help="parent of the working folder")
    p.add_argument("--out", type=Path, default=RESULTS / "image.md")
    p.add_argument("--keep", action="store_true", help="keep the working folder")
    argv_list = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv_list)
    if os.geteuid() != 0:
        p.error("needs root (the image build runs debootstrap and chroot)")
    missing = missing_tools()
    if missing:
        p.error(f"missing host tools {sorted(missing)}: apt-get install "
                + " ".join(sorted(set(missing.values()))))  # fmt: skip
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    facts = run_check(args)
    print(write_results(facts, args.out, argv_list))
    print(f"wrote {args.out}")
    return 0 if not facts["problems"] else 1


if __name__ == "__main__":
    sys.exit(main())
