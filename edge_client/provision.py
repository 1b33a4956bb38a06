"""Provisioning: a self-contained bundle that turns a Raspberry Pi or Jetson into one board.

A bundle is one directory (copy it to the board, e.g. with ``scp -r``, and run its
``install.sh`` there as root)::

    board.toml                 the board's settings, every key commented
    keys/private.key           its Ed25519 private key (0600), never leaves the board
    keys/public.key            its public key (registered in the coordinator's allow-list)
    keys/client_id
    coordinator.pub            the coordinator's public key, pinned: only globals it signed count
    ca.crt                     the broker's CA certificate (the board verifies the broker with it)
    mqtt.password              its MQTT password (0600), or, with mutual TLS,
    client.crt, client.key     its client certificate and key (0600)
    state/                     where the board keeps its model and pending update
    data.npz                   its private data (placed by the operator, or a demo shard)
    siren-board-<id>.service   systemd unit (restarted on failure, down once the run is over)
    install.sh                 installs all of this (idempotent; what SETUP.md describes)
    requirements-board.txt     the libraries a board installs
    model-litert.zip           the model's LiteRT training artifact (litert boards: no TensorFlow)
    siren_edge_board-*.whl     the board program (when the bundle was made by ``siren deploy``)
    SETUP.md                   the same steps by hand, for Raspberry Pi OS 64-bit and JetPack 6

and registers the board's public key in the coordinator's allow-list when one is given.
"""

from __future__ import annotations

import os
import secrets
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from edge_client.config import (
    AlarmSettings,
    BoardConfig,
    BrokerSettings,
    DataSettings,
    TrainingSettings,
)
from edge_client.errors import EdgeClientError
from protocol.keys import (
    PRIVATE_KEY_FILE,
    AllowList,
    generate_signing_key,
    key_fingerprint,
    resolve_verify_key,
    save_key_pair,
    save_verify_key,
)
from protocol.topics import is_valid_id

#: Exit status of ``siren client run`` for a configuration it cannot use (systemd does not
#: restart the unit for it: restarting would not help).
CONFIG_EXIT_STATUS = 2

#: Libraries a board installs besides the board program (PEP 508 requirements).
BOARD_REQUIREMENTS = (
    "numpy>=1.26",
    "tensorflow-cpu>=2.16; platform_machine == 'x86_64' or platform_machine == 'AMD64'",
    "tensorflow>=2.16; platform_machine != 'x86_64' and platform_machine != 'AMD64'",
    "ai-edge-litert>=1.2",
    "pynacl>=1.5",
    "paho-mqtt>=2.0",
    "tomli>=2.0; python_version < '3.11'",
)

#: What a board with the ``litert`` training backend installs: the same without TensorFlow.
LITERT_BOARD_REQUIREMENTS = tuple(r for r in BOARD_REQUIREMENTS if not r.startswith("tensorflow"))


class ProvisionError(EdgeClientError):
    """A bundle cannot be written (existing bundle, bad id, missing files)."""


@dataclass(frozen=True)
class Bundle:
    """What :func:`provision_board` wrote."""

    directory: Path
    config: Path
    public_key_fingerprint: str
    service: Path
    setup: Path
    allow_list: Path | None
    install: Path | None = None


@dataclass(frozen=True)
class Placement:
    """Where a bundle goes on its board.

    Attributes
    ----------
    install_dir : str
        Parent of the board's home (``<install_dir>/<client id>``).
    user : str
        The system account the board program runs as.
    venv : str
        The virtual environment of the board program.
    """

    install_dir: str = "/opt/siren"
    user: str = "siren"
    venv: str = "/opt/siren/venv"

    def home(self, client_id: str) -> str:
        """The board's home: its bundle, keys, configuration and state."""
        return f"{self.install_dir}/{client_id}"


def systemd_unit(client_id: str, place: Placement) -> str:
    """A systemd service running ``siren client run`` for one board.

    Restarted when it fails (a crash, a lost broker it gave up on), not when it exits 0 (the
    run is finished: the unit stays down) or 2 (a configuration it cannot use). The board may
    write only its ``state`` folder, which the bundle and ``install.sh`` create.
    """
    home = place.home(client_id)
    return "\n".join(
        [
            "[Unit]",
            f"Description=siren-edge board {client_id}",
            "After=network-online.target",
            "Wants=network-online.target",
            "",
            "[Service]",
            "Type=simple",
            f"User={place.user}",
            f"WorkingDirectory={home}",
            f"ExecStart={place.venv}/bin/siren client run --config {home}/board.toml",
            "Restart=on-failure",
            "RestartSec=10",
            f"RestartPreventExitStatus={CONFIG_EXIT_STATUS}",
            "Environment=TF_CPP_MIN_LOG_LEVEL=2",
            "NoNewPrivileges=true",
            "ProtectSystem=strict",
            "ProtectHome=true",
            "PrivateTmp=true",
            f"ReadWritePaths={home}/state",
            "",
            "[Install]",
            "WantedBy=multi-user.target",
            "",
        ]
    )


def requirements_text(backend: str = "keras") -> str:
    """``requirements-board.txt``: the board's libraries, one PEP 508 line each (no TensorFlow
    for a board with the ``litert`` training backend)."""
    reqs = LITERT_BOARD_REQUIREMENTS if backend == "litert" else BOARD_REQUIREMENTS
    return "# what a siren-edge board installs besides the board program\n" + "".join(
        f"{req}\n" for req in reqs
    )


#: Files of a bundle readable by the board's account alone.
SECRET_FILES = ("keys/private.key", "mqtt.password", "client.key")


def install_script(client_id: str, place: Placement, service: str, backend: str = "keras") -> str:
    """``install.sh`` of a bundle: exactly the steps of SETUP.md, idempotent.

    Run as root on the board from the unpacked bundle. ``--no-systemd`` skips installing and
    starting the unit (a chroot or a container without systemd: start its ``ExecStart`` as the
    service user instead); ``--no-venv`` skips the virtual environment; ``--python PATH`` picks
    the interpreter the venv is made with.
    """
    home = place.home(client_id)
    secrets_list = " ".join(SECRET_FILES)
    libraries = (
        "(LiteRT, NumPy, ...: about 100 MB the first"
        if backend == "litert"
        else "(TensorFlow, LiteRT, ...: about 1.6 GB the first"
    )
    return f"""#!/bin/sh
# Install siren-edge board {client_id}: service account, files, virtual environment, systemd unit.
# Idempotent: running it again repairs permissions and upgrades nothing that is installed.
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
HOME_DIR={home}
SERVICE_USER={place.user}
VENV={place.venv}
UNIT={service}
PYTHON=python3
SYSTEMD=1
VENV_STEP=1
while [ $# -gt 0 ]; do
  case "$1" in
    --no-systemd) SYSTEMD=0 ;;
    --no-venv) VENV_STEP=0 ;;
    --python) shift; PYTHON="$1" ;;
    *) echo "install.sh: unknown option $1 (known: --no-systemd --no-venv --python PATH)" >&2
       exit 2 ;;
  esac
  shift
done
if [ "$(id -u)" != 0 ]; then
  echo "install.sh: run as root (sudo sh install.sh)" >&2
  exit 1
fi

echo "1/4 service account $SERVICE_USER"
if ! id -u "$SERVICE_USER" >/dev/null 2>&1; then
  useradd --system --home-dir {place.install_dir} --no-create-home \\
    --shell /usr/sbin/nologin "$SERVICE_USER"
fi
# Raspberry Pi: vcgencmd (the throttling figure of the board's telemetry) needs group video.
if [ "$SERVICE_USER" != root ] && getent group video >/dev/null 2>&1; then
  usermod -a -G video "$SERVICE_USER"
fi

echo "2/4 files in $HOME_DIR"
mkdir -p "$HOME_DIR/state"
if [ "$HERE" != "$HOME_DIR" ]; then
  cp -R "$HERE"/. "$HOME_DIR"/
fi
chown -R "$SERVICE_USER": "$HOME_DIR"
chmod 0750 "$HOME_DIR"
chmod 0700 "$HOME_DIR/keys" "$HOME_DIR/state"
for f in {secrets_list}; do
  if [ -e "$HOME_DIR/$f" ]; then chmod 0600 "$HOME_DIR/$f"; fi
done

if [ "$VENV_STEP" = 1 ]; then
  echo "3/4 virtual environment $VENV"
  if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
  fi
  if command -v runuser >/dev/null 2>&1 && \\
      ! runuser -u "$SERVICE_USER" -- "$VENV/bin/python" -c pass 2>/dev/null; then
    echo "install.sh: $SERVICE_USER cannot run $VENV/bin/python (it points to an interpreter in" >&2
    echo "  a folder $SERVICE_USER may not enter, e.g. a pyenv build under /root): remove $VENV" >&2
    echo "  and run install.sh again with --python /usr/bin/python3" >&2
    exit 1
  fi
  echo "    installing the board's libraries {libraries}"
  echo "    time, from PyPI; nothing again when they are there)"
  "$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar on \\
    -r "$HOME_DIR/requirements-board.txt"
  WHEEL=$(ls "$HOME_DIR"/siren_edge_board-*.whl 2>/dev/null | tail -n 1 || true)
  if [ -n "$WHEEL" ]; then
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q --no-deps \\
      --force-reinstall "$WHEEL"
  elif [ ! -x "$VENV/bin/siren" ]; then
    echo "install.sh: no board wheel in the bundle: install the board program into $VENV" >&2
    echo "  ($VENV/bin/pip install --no-deps /path/to/siren-edge) and run install.sh again" >&2
    exit 1
  fi
else
  echo "3/4 virtual environment: skipped (--no-venv)"
fi

if [ "$SYSTEMD" = 1 ] && [ -d /run/systemd/system ]; then
  echo "4/4 systemd unit $UNIT"
  install -m 0644 "$HOME_DIR/$UNIT" "/etc/systemd/system/$UNIT"
  systemctl daemon-reload
  systemctl enable "$UNIT"
  # restart, not start: a running board picks up a new bundle (rotated key, new credentials)
  systemctl restart "$UNIT"
  echo "started: journalctl -u $UNIT -f"
else
  echo "4/4 systemd unit: not installed (no systemd here, or --no-systemd); start the board with"
  echo "  runuser -u $SERVICE_USER -- $VENV/bin/siren client run --config $HOME_DIR/board.toml"
fi
"""


#: SETUP.md's "Which boards" for a board with the ``litert`` training backend.
_LITERT_BOARDS = """## Which boards

This board trains with LiteRT alone (`backend = "litert"` in `[training]`): its model's
training step is in `model-litert.zip`, and TensorFlow is not installed. 64-bit Linux on
aarch64 (or x86-64) with Python 3.10 or newer and an `ai-edge-litert` (or `tflite-runtime`)
wheel; 512 MB of RAM is the aim (the board process stays far below TensorFlow's ~700 MB):
Raspberry Pi 3, 4, 5 or Zero 2 W with Raspberry Pi OS 64-bit, or NVIDIA Jetson with JetPack 6.
"""


def setup_notes(client_id: str, place: Placement, service: str, backend: str = "keras") -> str:
    """SETUP.md of a bundle: what ``install.sh`` does, step by step, for Raspberry Pi OS 64-bit
    and JetPack 6 (``backend``: the board's training backend)."""
    home = place.home(client_id)
    user, venv = place.user, place.venv
    notes = _setup_notes(client_id, place, service, home, user, venv)
    if backend != "litert":
        return notes
    start = notes.index("## Which boards")
    end = notes.index("## 1. Service account")
    notes = notes[:start] + _LITERT_BOARDS + "\n" + notes[end:]
    return notes.replace(
        "`requirements-board.txt` lists TensorFlow (PyPI's aarch64 `tensorflow` wheel), LiteRT",
        "`requirements-board.txt` lists no TensorFlow (this board trains in LiteRT): LiteRT",
    )


def _setup_notes(
    client_id: str, place: Placement, service: str, home: str, user: str, venv: str
) -> str:
    return f"""# Setting up board `{client_id}`

This bundle holds the board's private key: copy it to the board only, over a trusted channel
(e.g. `scp -r`), and keep `keys/private.key` (and `mqtt.password` or `client.key`) readable by
`{user}` alone.

**Short way:** on the board, from the copied bundle, run `sudo sh install.sh`. It performs the
steps below and is safe to run again. The rest of this file is the same, by hand.

## Which boards

64-bit Linux on aarch64 with Python 3.10 or newer and 2 GB of RAM or more (the board process
peaks at about 700 MB, TensorFlow's): Raspberry Pi 4 or 5 with Raspberry Pi OS 64-bit
(Bookworm, Python 3.11), or NVIDIA Jetson with JetPack 6 (Ubuntu 22.04, Python 3.10). The
32-bit Raspberry Pi OS is not supported (TensorFlow publishes no armv7l wheels); JetPack 5
ships Python 3.8, which is too old.

## 1. Service account

```bash
sudo useradd --system --home-dir {place.install_dir} --no-create-home \\
  --shell /usr/sbin/nologin {user}
sudo usermod -a -G video {user}   # Raspberry Pi: lets vcgencmd report throttling
```

Each round the board reports what its hardware exposes (CPU time, peak memory, SoC temperature,
Raspberry Pi throttling, Jetson power rails) in its status message; a sensor it cannot read is
reported as absent. It logs which sensors it found when it starts.

## 2. Files

```bash
sudo mkdir -p {home}/state && sudo cp -R ./. {home}/
sudo chown -R {user}: {home}
sudo chmod 0750 {home} && sudo chmod 0700 {home}/keys {home}/state
sudo chmod 0600 {home}/keys/private.key {home}/mqtt.password   # or client.key with mutual TLS
```

`board.toml` (every key commented) reads the board's data from `data.npz` next to it: arrays
`x_train`, `y_train`, `x_test`, `y_test` (float32 images, integer labels); `x_test` is the
board's local test split, which the SIREN alarm evaluates and training never sees.

## 3. Python environment

Wheels are installed once, with network access; nothing is downloaded while the board runs.

### Raspberry Pi OS 64-bit (Bookworm)

```bash
sudo apt-get install -y python3-venv
sudo python3 -m venv {venv}
sudo {venv}/bin/pip install -r {home}/requirements-board.txt
sudo {venv}/bin/pip install --no-deps {home}/siren_edge_board-*.whl
```

`requirements-board.txt` lists TensorFlow (PyPI's aarch64 `tensorflow` wheel), LiteRT
(`ai-edge-litert`), PyNaCl, paho-mqtt and NumPy: nothing of the coordinator's or the simulator's
stack. If no `ai-edge-litert` wheel exists for the board's Python, install `tflite-runtime`
instead (its last release, 2.14.0, needs `numpy<2`); the alarm, and LiteRT training, then run
through it (or through Keras with `backend = "keras"` in `[alarm]`). The board logs which
alarm backend it uses when it starts.

### NVIDIA Jetson (JetPack 6)

```bash
sudo apt-get install -y python3-venv python3-pip
sudo python3 -m venv {venv}
sudo {venv}/bin/pip install -r {home}/requirements-board.txt
sudo {venv}/bin/pip install --no-deps {home}/siren_edge_board-*.whl
```

This installs PyPI's `tensorflow` aarch64 wheel, which trains on the Jetson's CPU cores. NVIDIA
also publishes GPU builds of TensorFlow per JetPack release (NVIDIA's "Installing TensorFlow
for Jetson Platform"); one of them can replace it when its version is 2.16 or newer.

## 4. Start

```bash
sudo install -m 0644 {home}/{service} /etc/systemd/system/{service}
sudo systemctl daemon-reload && sudo systemctl enable {service} && sudo systemctl restart {service}
journalctl -u {service} -f
```

Without systemd (a container, a chroot): `sudo runuser -u {user} -- {venv}/bin/siren client run
--config {home}/board.toml`.

The board keeps its state in `{home}/state`: after a power cut or a restart it continues the
run (its pending update is resent byte for byte; the coordinator counts it once). When the run
is over the board exits with status 0 and the unit stays down. To take part in a new run, put
the new run's bundle in place (or change `run` in `board.toml`) and archive the old state with
`sudo -u {user} {venv}/bin/siren client reset --config {home}/board.toml`, then
`sudo systemctl restart {service}`.
"""


def _write_secret(path: Path, text: str | bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(text.encode("ascii") if isinstance(text, str) else text)
    os.chmod(path, 0o600)


def provision_board(
    out: Path,
    *,
    client_id: str,
    run: str,
    index: int,
    broker_host: str,
    coordinator_key: str | os.PathLike[str],
    broker_port: int = 8883,
    ca_cert: Path | None = None,
    system_ca: bool = False,
    allow_list: Path | None = None,
    rounds: int = 0,
    seed: int = 0,
    training: TrainingSettings | None = None,
    alarm: AlarmSettings | None = None,
    data: DataSettings | None = None,
    place: Placement | None = None,
    password: str | None = None,
    client_cert: tuple[Path, Path] | None = None,
    wheel: Path | None = None,
    artifact: Path | None = None,
    force: bool = False,
) -> Bundle:
    """Write a board bundle into ``out`` (see the module docstring).

    Parameters
    ----------
    out : Path
        Bundle directory.
    client_id, run, index : str, str, int
        The board's identity and position in the fleet.
    broker_host, broker_port : str, int
        The TLS listener boards connect to.
    coordinator_key : path or str
        The coordinator's public key (file, key directory, or 64 hex digits).
    ca_cert : Path, optional
        The broker's CA certificate, copied into the bundle and pinned by the board. Required
        unless ``system_ca`` (a broker certificate from a public CA, verified against the
        board's system store).
    allow_list : Path, optional
        The coordinator's allow-list; the board's public key is added to it.
    rounds, seed : int
        Run length and seed.
    training, alarm, data : settings, optional
        Training hyper-parameters, alarm, and data source (default: ``data.npz`` in the bundle).
    place : Placement, optional
        Where the bundle lives on the board, the service user and the virtual environment.
    password : str, optional
        The board's MQTT password (default: a new random one).
    client_cert : (Path, Path), optional
        Mutual TLS: the board's client certificate and key, copied in (then no password).
    wheel : Path, optional
        The board program's wheel, copied into the bundle for ``install.sh``.
    artifact : Path, optional
        The model's LiteRT training artifact, copied into the bundle as
        :data:`~models.litert_artifact.ARTIFACT_FILE`; required when ``training.backend`` is
        ``litert`` (the board then installs and imports no TensorFlow).
    force : bool
        Replace an existing bundle's key pair.

    Raises
    ------
    ProvisionError
        On an invalid id, an existing bundle without ``force``, a missing CA or file.
    """
    place = place or Placement()
    if not is_valid_id(client_id):
        raise ProvisionError(
            f"invalid client id {client_id!r}: use 1-64 characters from [A-Za-z0-9_.-], "
            "starting with a letter or digit"
        )
    if not is_valid_id(run):
        raise ProvisionError(
            f"invalid run id {run!r}: use 1-64 characters from [A-Za-z0-9_.-], "
            "starting with a letter or digit"
        )
    if (out / "keys" / PRIVATE_KEY_FILE).exists() and not force:
        raise ProvisionError(f"{out} already holds a board key; pass --force to replace it")
    if ca_cert is None and not system_ca:
        raise ProvisionError(
            "a bundle needs the broker's CA certificate (--ca-cert), or the board cannot verify "
            "the broker: create it first (`siren deploy init` does everything in order, or "
            "`siren coordinator broker-config --self-signed`), or pass --system-ca when the "
            "broker's certificate comes from a public CA"
        )
    training = training or TrainingSettings()
    if training.backend == "litert" and artifact is None:
        raise ProvisionError(
            "a board with the litert training backend needs the model's LiteRT training artifact "
            "(--artifact; `siren client export-litert` writes one)"
        )
    for path in (ca_cert, *(client_cert or ()), wheel, artifact):
        if path is not None and not Path(path).exists():
            raise ProvisionError(f"{path} does not exist")
    try:
        coordinator = resolve_verify_key(coordinator_key)
    except Exception as exc:
        raise ProvisionError(f"coordinator key: {exc}") from None
    out.mkdir(parents=True, exist_ok=True)
    key = generate_signing_key()
    allow_path = None
    if allow_list is not None:
        allow = AllowList.load(allow_list, missing_ok=True)
        try:
            allow.add(client_id, key.verify_key, replace=force)
        except Exception as exc:
            raise ProvisionError(f"cannot register {client_id} in {allow_list}: {exc}") from None
        allow.save(allow_list)
        allow_path = allow_list
    save_key_pair(out / "keys", key, client_id=client_id, overwrite=force)
    save_verify_key(out / "coordinator.pub", coordinator)
    (out / "state").mkdir(mode=0o700, exist_ok=True)
    ca_path = None
    if ca_cert is not None:
        ca_path = out / "ca.crt"
        shutil.copyfile(ca_cert, ca_path)
    if training.backend == "litert":
        from models.litert_artifact import ARTIFACT_FILE

        assert artifact is not None
        if Path(artifact).resolve() != (out / ARTIFACT_FILE).resolve():
            shutil.copyfile(artifact, out / ARTIFACT_FILE)
        training = replace(training, artifact=out / ARTIFACT_FILE)
    cert_file = key_file = None
    password_file = None
    if client_cert is not None:
        cert_file, key_file = out / "client.crt", out / "client.key"
        shutil.copyfile(client_cert[0], cert_file)
        _write_secret(key_file, client_cert[1].read_bytes())
        (out / "mqtt.password").unlink(missing_ok=True)
    else:
        password_file = "mqtt.password"
        _write_secret(out / password_file, (password or secrets.token_urlsafe(24)) + "\n")
    config = BoardConfig(
        client_id=client_id,
        run=run,
        key_dir=out / "keys",
        coordinator_key=out / "coordinator.pub",
        state_dir=out / "state",
        index=index,
        rounds=rounds,
        seed=seed,
        broker=BrokerSettings(
            host=broker_host,
            port=broker_port,
            username=client_id,
            tls=True,
            ca_file=ca_path,
            cert_file=cert_file,
            key_file=key_file,
        ),
        training=training,
        alarm=alarm or AlarmSettings(),
        data=data or DataSettings(source="npz", path=out / "data.npz"),
    )
    config_path = out / "board.toml"
    config_path.write_text(
        config.to_toml(
            relative_to=out,
            password_file=password_file,
            commented=True,
            header=f"siren-edge board {client_id} of run {run} (see SETUP.md)",
        )
    )
    service_name = f"siren-board-{client_id}.service"
    service = out / service_name
    service.write_text(systemd_unit(client_id, place))
    (out / "requirements-board.txt").write_text(requirements_text(training.backend))
    if wheel is not None:
        for old in out.glob("siren_edge_board-*.whl"):
            old.unlink()
        shutil.copyfile(wheel, out / Path(wheel).name)
    install = out / "install.sh"
    install.write_text(install_script(client_id, place, service_name, training.backend))
    install.chmod(0o755)
    setup = out / "SETUP.md"
    setup.write_text(setup_notes(client_id, place, service_name, training.backend))
    return Bundle(
        out, config_path, key_fingerprint(key.verify_key), service, setup, allow_path, install
    )
