"""The arm64 root's pure parts (mirror parsing, completeness, command lines, pip settings), and,
marked ``arm64``, commands inside a built root (skipped unless it exists and we are root)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import arm64_root as ar

ONE_LINE = """\
# deb http://old.example/debian bookworm main
deb [arch=amd64 signed-by=/usr/share/keyrings/k.gpg] http://mirror.example/debian/ bookworm main
deb-src http://src.example/debian bookworm main
deb http://security.debian.org/debian-security bookworm-security main
"""

DEB822 = """\
Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main

Types: deb deb-src
URIs: http://off.example/debian
Suites: bookworm
Enabled: no
"""


def test_root_path_prefers_explicit_then_env_then_default(tmp_path):
    env = {ar.ROOT_ENV: str(tmp_path / "from-env"), "HOME": "/home/x"}
    assert ar.root_path(tmp_path / "explicit", env) == tmp_path / "explicit"
    assert ar.root_path(None, env) == tmp_path / "from-env"
    default = ar.root_path(None, {})
    assert default == Path("~/.cache/siren-edge/arm64-bookworm").expanduser()
    assert "~" not in str(default)


def test_one_line_sources_skip_options_comments_and_keep_order():
    entries = ar.parse_one_line_sources(ONE_LINE)
    assert entries == [
        ("deb", "http://mirror.example/debian/", ("bookworm",)),
        ("deb-src", "http://src.example/debian", ("bookworm",)),
        ("deb", "http://security.debian.org/debian-security", ("bookworm-security",)),
    ]
    assert ar.choose_mirror(entries, "bookworm") == "http://mirror.example/debian"


def test_deb822_stanzas_ignore_comments_and_disabled_ones():
    entries = ar.parse_deb822_sources(DEB822)
    assert entries == [
        ("deb", "http://deb.debian.org/debian", ("bookworm", "bookworm-updates")),
        ("deb", "http://deb.debian.org/debian-security", ("bookworm-security",)),
    ]
    assert ar.choose_mirror(entries, "bookworm") == "http://deb.debian.org/debian"


def test_choose_mirror_needs_the_suite_and_a_binary_archive():
    security_only = [("deb", "http://security.debian.org/debian-security", ("bookworm-security",))]
    assert ar.choose_mirror(security_only, "bookworm") is None
    src_only = [("deb-src", "http://m.example/debian", ("bookworm",))]
    assert ar.choose_mirror(src_only, "bookworm") is None
    updates = [("deb", "http://m.example/debian", ("bookworm-updates",))]
    assert ar.choose_mirror(updates, "bookworm") == "http://m.example/debian"
    other_scheme = [("deb", "cdrom:[Debian]/", ("bookworm",))]
    assert ar.choose_mirror(other_scheme, "bookworm") is None
    assert ar.choose_mirror(updates, "trixie") is None


def test_find_debian_mirror_reads_only_files_apt_reads(tmp_path):
    d = tmp_path / "sources.list.d"
    d.mkdir()
    (d / "a.list.disabled").write_text("deb http://disabled.example/debian bookworm main\n")
    (d / "other.list").write_text("deb https://packages.example/apt cloud-sdk main\n")
    (d / "debian.sources").write_text(DEB822)
    assert ar.find_debian_mirror(tmp_path) == "http://deb.debian.org/debian"
    (tmp_path / "sources.list").write_text(ONE_LINE)  # sources.list comes first
    assert ar.find_debian_mirror(tmp_path) == "http://mirror.example/debian"


def test_find_debian_mirror_without_entry_says_what_to_pass(tmp_path):
    with pytest.raises(ar.Arm64RootError, match="--mirror"):
        ar.find_debian_mirror(tmp_path, "bookworm")


def test_marker_must_match_suite_arch_variant_and_include_the_packages():
    spec = ar.RootSpec()
    good = ar.marker_content(spec, "http://m/debian", 250.0)
    assert ar.marker_satisfies(good, spec)
    assert ar.marker_satisfies(dict(good, mirror="http://elsewhere/debian"), spec)
    assert ar.marker_satisfies(dict(good, include=[*good["include"], "git"]), spec)
    assert not ar.marker_satisfies(None, spec)
    assert not ar.marker_satisfies(dict(good, arch="armhf"), spec)
    assert not ar.marker_satisfies(dict(good, suite="trixie"), spec)
    assert not ar.marker_satisfies(dict(good, format=ar.MARKER_FORMAT + 1), spec)
    assert not ar.marker_satisfies(dict(good, include=["python3"]), spec)
    wider = ar.RootSpec(include=(*spec.include, "git"))
    assert not ar.marker_satisfies(good, wider)


def test_a_root_without_its_marker_is_not_complete(tmp_path):
    root = tmp_path / "arm64-bookworm"
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/python3").write_text("")
    assert not ar.is_complete(root)  # debootstrap output alone: interrupted before the marker
    (root / "etc").mkdir()
    (root / ar.MARKER).write_text("{not json")
    assert not ar.is_complete(root)
    (root / ar.MARKER).write_text(json.dumps(ar.marker_content(ar.RootSpec(), "m", 1.0)))
    assert ar.is_complete(root)
    marker = ar.read_marker(root)
    assert marker is not None and marker["mirror"] == "m"
    (root / "usr/bin/python3").unlink()
    assert not ar.is_complete(root)


def test_partial_build_is_a_hidden_sibling():
    root = Path("/cache/siren-edge/arm64-bookworm")
    tmp = ar.partial_path(root, 42)
    assert tmp == Path("/cache/siren-edge/.arm64-bookworm.partial-42")
    assert tmp.parent == root.parent and tmp != root


def test_debootstrap_command_line():
    cmd = ar.debootstrap_command(Path("/t/root"), "http://deb.debian.org/debian")
    assert cmd == [
        "debootstrap",
        "--arch=arm64",
        "--variant=minbase",
        "--include=python3,python3-venv,python3-pip,ca-certificates",
        "bookworm",
        "/t/root",
        "http://deb.debian.org/debian",
    ]


def test_chroot_command_clears_the_environment_and_sets_user_and_cwd():
    cmd = ar.chroot_command(
        Path("/r"),
        ["python3", "-c", "print(1)"],
        env={"PATH": "/usr/bin", "HOME": "/home/b"},
        userspec="1001:1001",
        groups=[1001, 27],
        cwd="/opt/siren",
    )
    assert cmd == [
        "chroot",
        "--userspec=1001:1001",
        "--groups=1001,27",
        "/r",
        "/usr/bin/env",
        "-i",
        "-C",
        "/opt/siren",
        "PATH=/usr/bin",
        "HOME=/home/b",
        "python3",
        "-c",
        "print(1)",
    ]
    plain = ar.chroot_command(Path("/r"), ["true"], env={})
    assert plain == ["chroot", "/r", "/usr/bin/env", "-i", "true"]


def test_chroot_command_rejects_empty_argv_and_bad_env_names():
    with pytest.raises(ValueError, match="argv is empty"):
        ar.chroot_command(Path("/r"), [], env={})
    with pytest.raises(ValueError, match="'A=B'"):
        ar.chroot_command(Path("/r"), ["true"], env={"A=B": "x"})


def test_root_env_forwards_pip_variables_and_extra_wins():
    pip = ar.PipSettings(env=(("PIP_DEFAULT_TIMEOUT", "180"),))
    env = ar.root_env(home="/home/b", extra={"LANG": "en_GB.UTF-8"}, pip=pip)
    assert env["HOME"] == "/home/b" and env["PATH"] == ar.ROOT_PATH
    assert env["PIP_DEFAULT_TIMEOUT"] == "180" and env["LANG"] == "en_GB.UTF-8"


def test_user_lookup_reads_the_roots_passwd_and_group(tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/passwd").write_text(
        "root:x:0:0:root:/root:/bin/bash\nsiren:x:999:998::/var/lib/siren:/usr/sbin/nologin\n"
    )
    (tmp_path / "etc/group").write_text("root:x:0:\nsiren:x:998:\ngpio:x:997:pi,siren\n")
    assert ar.resolve_user(tmp_path, "siren") == ("999:998", [997, 998], "/var/lib/siren")
    with pytest.raises(ar.Arm64RootError, match="no user 'board'"):
        ar.resolve_user(tmp_path, "board")


def test_binfmt_entry_parsing():
    text = (
        "enabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\nflags: PF\noffset 0\n"
        "magic 7f454c46\nmask ffffffff\n"
    )
    entry = ar.parse_binfmt_entry(text)
    assert entry.enabled and entry.fix_binary
    assert entry.interpreter == "/usr/libexec/qemu-binfmt/aarch64-binfmt-P"
    off = ar.parse_binfmt_entry("disabled\ninterpreter /usr/bin/qemu-aarch64-static\nflags: \n")
    assert not off.enabled and not off.fix_binary


def test_interpreter_copied_only_without_fix_binary_flag(tmp_path):
    host_interp = tmp_path / "qemu-aarch64"
    host_interp.write_text("#!qemu")
    root = tmp_path / "root"
    root.mkdir()
    ar.install_interpreter(root, ar.BinfmtEntry(True, str(host_interp), "PF"))
    assert not (root / str(host_interp).lstrip("/")).exists()
    ar.install_interpreter(root, ar.BinfmtEntry(True, str(host_interp), "P"))
    assert (root / str(host_interp).lstrip("/")).read_text() == "#!qemu"


def test_mountinfo_decodes_escapes_and_mounts_under_respects_path_boundaries():
    info = (
        "22 1 0:21 / / rw shared:1 - ext4 /dev/vda rw\n"
        "40 22 0:5 / /c/arm64\\040root/proc rw - proc proc rw\n"
        "41 22 0:6 / /c/arm64\\040root/dev rw - devtmpfs udev rw\n"
        "42 22 0:7 / /c/arm64\\040root2/proc rw - proc proc rw\n"
    )
    assert ar.parse_mountinfo(info)[1] == "/c/arm64 root/proc"
    assert ar.mounts_under(Path("/c/arm64 root"), info) == [
        "/c/arm64 root/proc",
        "/c/arm64 root/dev",
    ]
    assert ar.mounts_under(Path("/c/other"), info) == []


def test_session_holders_nest_and_forget_dead_processes(tmp_path):
    path = ar.holders_path(tmp_path / "root")
    assert path == tmp_path / ".root.sessions"
    live = {10, 11}
    alive = live.__contains__
    assert ar.update_holders(path, add=10, alive=alive) == [10]
    assert ar.update_holders(path, add=10, alive=alive) == [10, 10]  # nested in one process
    assert ar.update_holders(path, add=11, alive=alive) == [10, 10, 11]
    assert ar.update_holders(path, remove=10, alive=alive) == [10, 11]
    live.discard(10)  # killed with -9: its entries no longer keep the mounts
    assert ar.update_holders(path, alive=alive) == [11]
    assert ar.update_holders(path, remove=11, alive=alive) == []  # last one out: unmount
    assert not path.exists()


def test_pip_settings_collect_configs_named_files_dirs_and_env(tmp_path):
    mirror = tmp_path / "pypi"
    (mirror / "simple").mkdir(parents=True)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("torch<=2\n")
    cert = tmp_path / "ca.crt"
    cert.write_text("pem")
    system = tmp_path / "pip.conf"
    system.write_text(f"[global]\nconstraint = {constraints}\ncert = {cert}\ntimeout = 60\n")
    home = tmp_path / "home"
    (home / ".config/pip").mkdir(parents=True)
    (home / ".config/pip/pip.conf").write_text(
        f"[global]\nfind-links = {wheels}\n"
        f"extra-index-url = file://{mirror}/simple https://pypi.example/simple\n"
        "[install]\nindex-url = https://pypi.org/simple\n"
    )
    env = {"PIP_DEFAULT_TIMEOUT": "180", "PIP_FIND_LINKS": str(wheels), "PATH": "/bin"}
    settings = ar.pip_settings(env=env, home=home, system_configs=[system, tmp_path / "absent"])
    assert settings.config_files == (
        (system, str(system)),
        (home / ".config/pip/pip.conf", "/root/.config/pip/pip.conf"),
    )
    assert set(settings.files) == {constraints, cert}
    # the file:// .../simple index binds its parent (the files it links to live beside it)
    assert settings.directories == (wheels, mirror)
    assert settings.env == (("PIP_DEFAULT_TIMEOUT", "180"), ("PIP_FIND_LINKS", str(wheels)))


def test_pip_settings_with_nothing_configured(tmp_path):
    settings = ar.pip_settings(env={}, home=tmp_path, system_configs=[])
    assert settings == ar.PipSettings()


def test_sync_host_config_places_pip_files_inside_the_root(tmp_path):
    conf = tmp_path / "user.conf"
    conf.write_text("[global]\n")
    constraints = tmp_path / "c.txt"
    constraints.write_text("x<1\n")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/resolv.conf").symlink_to("../run/systemd/resolve/stub-resolv.conf")
    pip = ar.PipSettings(config_files=((conf, "/root/.config/pip/pip.conf"),), files=(constraints,))
    ar.sync_host_config(root, pip)
    assert (root / "root/.config/pip/pip.conf").read_text() == "[global]\n"
    assert (root / str(constraints).lstrip("/")).read_text() == "x<1\n"
    if Path("/etc/resolv.conf").exists():
        resolv = root / "etc/resolv.conf"
        assert not resolv.is_symlink()  # a dangling symlink in the root is replaced by a file
        assert resolv.read_text() == Path("/etc/resolv.conf").resolve().read_text()


def test_copy_project_leaves_out_venvs_git_runs_and_caches(tmp_path):
    src = tmp_path / "proj"
    for rel in ("pkg/__pycache__", ".venv/bin", ".git", "runs/r1", "x.egg-info", "pkg/sub"):
        (src / rel).mkdir(parents=True)
    (src / "pyproject.toml").write_text("[project]\nname='p'\n")
    (src / "pkg/sub/m.py").write_text("X = 1\n")
    (src / "pkg/__pycache__/m.pyc").write_text("")
    root = tmp_path / "root"
    root.mkdir()
    target = ar.copy_project(src, root, "/opt/siren/src")
    assert target == root / "opt/siren/src"
    kept = sorted(str(p.relative_to(target)) for p in target.rglob("*"))
    assert kept == ["pkg", "pkg/sub", "pkg/sub/m.py", "pyproject.toml"]
    with pytest.raises(ar.Arm64RootError, match="not a Python project"):
        ar.copy_project(tmp_path / "root", root)


def test_missing_tools_name_their_debian_packages():
    missing = ar.missing_tools(lambda tool: None if tool in ("debootstrap", "chroot") else "/x")
    assert missing == {"debootstrap": "debootstrap", "chroot": "coreutils"}
    assert ar.HOST_TOOLS["qemu-aarch64-static"] == "qemu-user-static"
    assert ar.HOST_TOOLS["update-binfmts"] == "binfmt-support"


def test_cpu_lists_and_the_aarch64_cpuinfo_shown_inside():
    assert ar.parse_cpu_list("0-3,6\n") == [0, 1, 2, 3, 6]
    assert ar.parse_cpu_list("0") == [0]
    text = ar.aarch64_cpuinfo([0, 1])
    assert text.count("processor\t: ") == 2 and "processor\t: 1\n" in text
    assert text.count("CPU implementer\t: 0x41") == 2  # ARM Ltd, as pytorch/cpuinfo expects
    assert "CPU part\t: 0xd08" in text and "vendor_id" not in text


def test_du_parsing_and_sizes():
    assert ar.parse_du("2251799813\t/root/.cache/x/opt/siren/venv\n") == 2251799813
    with pytest.raises(ValueError, match="unexpected du output"):
        ar.parse_du("du: cannot access")
    assert ar.format_bytes(512) == "512 B"
    assert ar.format_bytes(1536) == "1.5 KiB"
    assert ar.format_bytes(2.2 * 2**30) == "2.2 GiB"


def test_report_says_timings_are_emulated():
    build = ar.BuildReport(Path("/r"), True, "http://m/debian", 0.1, 3 * 2**30)
    install = ar.InstallReport("/opt/siren/venv", ("tensorflow>=2.16",), 5.0, 180.0, 2**31)
    result = {
        "machine": "aarch64",
        "python": "3.11.2",
        "import_tf_s": 40.0,
        "tensorflow": "2.21.0",
        "keras": "3.0",
        "ai_edge_litert": "2.3.0",
        "numpy": "2.0",
        "train_s": 10.0,
        "train_accuracy": 0.9,
        "convert_s": 5.0,
        "tflite_bytes": 2000,
        "import_litert_s": 0.5,
        "litert_s": 0.01,
        "litert_max_abs_diff": 1e-6,
        "litert_accuracy": 0.9,
        "process_s": 70.0,
    }
    text = ar.format_report(
        build, install, result, [("tensorflow", 2**30)], {"debootstrap_s": "250"}
    )
    assert "**Every timing below is emulated**" in text
    assert "| pip install (1 requirements) | 180 s |" in text
    assert "reused (debootstrap took 250 s when it was built)" in text
    assert "| tensorflow | 1.0 GiB |" in text and "TensorFlow 2.21.0" in text
    assert "1.0 GiB without the venv, 3.0 GiB with it" in text
    again = ar.format_report(
        build, dataclasses.replace(install, created=False), result, [], {"debootstrap_s": "250"}
    )
    assert "| create the venv | existed |" in again
    assert "| pip install (1 requirements), venv already populated | 180 s |" in again


def test_cli_run_takes_the_command_after_the_separator():
    args = ar.build_parser().parse_args(
        ["--root", "/r", "run", "--user", "siren", "--env", "A=1", "--", "uname", "-m"]
    )
    assert args.root == "/r" and args.user == "siren" and args.env == ["A=1"]
    assert args.argv == ["--", "uname", "-m"]
    assert ar._env_pairs(["A=1", "B=x=y"]) == {"A": "1", "B": "x=y"}
    with pytest.raises(SystemExit):
        ar._env_pairs(["novalue"])


# --------------------------------------------------------------------------------------------
# inside a built root


@pytest.fixture(scope="module")
def built_root() -> Path:
    root = ar.root_path()
    if not ar.is_complete(root):
        pytest.skip(f"no built arm64 root at {root} (python -m benchmarks.arm64_root build)")
    if os.geteuid() != 0 or ar.missing_tools():
        pytest.skip("running inside the arm64 root needs root and qemu-user-static/binfmt-support")
    ar.ensure_binfmt()
    return root


@pytest.mark.arm64
def test_root_runs_aarch64_python_with_tls_and_unmounts(built_root):
    with ar.session(built_root):
        assert ar.mounts_under(built_root)  # /proc, /sys, /dev while inside
        machine = ar.run_in_root(built_root, ["uname", "-m"], capture=True).stdout.strip()
        probe = ar.run_in_root(
            built_root,
            ["python3", "-c", "import ssl; print(ssl.create_default_context().cert_store_stats())"],
            capture=True,
        )
        cpuinfo = ar.run_in_root(built_root, ["cat", "/proc/cpuinfo"], capture=True).stdout
        failed = ar.run_in_root(built_root, ["false"], check=False)
    assert machine == "aarch64"
    assert "'x509_ca': 0" not in probe.stdout
    assert "CPU implementer\t: 0x41" in cpuinfo and "vendor_id" not in cpuinfo
    assert failed.returncode == 1
    assert not ar.mounts_under(built_root)  # everything unmounted afterwards


@pytest.mark.arm64
def test_a_background_program_is_the_process_we_can_kill(built_root):
    with ar.session(built_root):
        proc = ar.start_in_root(
            built_root,
            ["python3", "-c", "import os, time; print(os.getpid(), flush=True); time.sleep(60)"],
            user="nobody",
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        inner_pid = int(proc.stdout.readline())
        proc.kill()  # SIGKILL, as a crashed board
        assert proc.wait(timeout=30) == -9
    assert inner_pid == proc.pid  # chroot and env exec'd: no wrapper process in between


@pytest.mark.arm64
def test_overlapping_sessions_keep_mounts_until_the_last_one_closes(built_root):
    root = str(built_root)
    with ar.session(built_root):
        with ar.session(built_root):
            pass
        assert ar.mounts_under(built_root)  # the inner session left them to the outer one
        other = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.arm64_root", "--root", root, "run", "--",
             "sh", "-c", "sleep 4; head -1 /proc/cpuinfo"],
            stdout=subprocess.PIPE, text=True, cwd=Path(ar.__file__).parents[1],
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while ar.holders_path(built_root).read_text().count("\n") < 2:
            assert time.monotonic() < deadline and other.poll() is None
            time.sleep(0.1)
    out, _ = other.communicate(timeout=120)  # still ran with /proc after we closed ours
    assert other.returncode == 0 and out.startswith("processor")
    assert not ar.mounts_under(built_root)
    assert not ar.holders_path(built_root).exists()


@pytest.mark.arm64
def test_commands_run_as_another_user_with_only_the_given_environment(built_root, monkeypatch):
    monkeypatch.setenv("SIREN_HOST_ONLY", "leak")
    with ar.session(built_root):
        out = ar.run_in_root(
            built_root,
            ["sh", "-c", 'echo "$(id -u) $HOME $MARK ${SIREN_HOST_ONLY:-none}"'],
            user="nobody",
            env={"MARK": "m"},
            capture=True,
        ).stdout.split()
        with pytest.raises(ar.Arm64RootError, match="exited 3"):
            ar.run_in_root(built_root, ["sh", "-c", "exit 3"], capture=True)
    assert out == ["65534", "/nonexistent", "m", "none"]


def _fake_host(monkeypatch, script: str) -> None:
    """Stand-ins for root privileges, binfmt, debootstrap and the probe inside the new root."""
    monkeypatch.setattr(ar, "require_host", lambda: None)
    monkeypatch.setattr(ar, "ensure_binfmt", lambda: ar.BinfmtEntry(True, "/q", "PF"))
    monkeypatch.setattr(
        ar, "debootstrap_command", lambda target, m, s: ["sh", "-c", script, str(target)]
    )
    monkeypatch.setattr(ar, "session", lambda root, **kw: contextlib.nullcontext(ar.PipSettings()))
    probe = subprocess.CompletedProcess([], 0, stdout="aarch64 3.11.2 140\n", stderr="")
    monkeypatch.setattr(ar, "run_in_root", lambda *a, **kw: probe)
    monkeypatch.setattr(ar, "du_bytes", lambda path: 1)


def test_an_interrupted_build_is_never_reused_and_is_cleared_by_the_next(tmp_path, monkeypatch):
    root = tmp_path / "arm64-bookworm"
    # debootstrap dies after unpacking: the partial sibling stays, the root does not appear
    _fake_host(monkeypatch, 'mkdir -p "$0/usr/bin" && touch "$0/usr/bin/python3" && exit 1')
    with pytest.raises(ar.Arm64RootError, match="debootstrap failed"):
        ar.build_root(root, mirror="http://m/debian", log=lambda *a: None)
    assert not root.exists() and not ar.is_complete(root)
    assert [p.name for p in tmp_path.glob(".arm64-bookworm.partial-*")]
    # the next build removes the stale partial, finishes, and only then renames into place
    _fake_host(monkeypatch, 'mkdir -p "$0/usr/bin" "$0/etc" && touch "$0/usr/bin/python3"')
    report = ar.build_root(root, mirror="http://m/debian", log=lambda *a: None)
    assert not report.reused and ar.is_complete(root)
    assert not list(tmp_path.glob(".arm64-bookworm.partial-*"))
    marker = ar.read_marker(root)
    assert marker is not None and marker["mirror"] == "http://m/debian"
    # complete: reused without running debootstrap again
    _fake_host(monkeypatch, "exit 1")
    assert ar.build_root(root, mirror="http://m/debian", log=lambda *a: None).reused
