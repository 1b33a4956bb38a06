"""What the image does when it boots: the first-boot script, its units, networking (pure texts).

Files written into every image (:func:`image_files`):

* ``/usr/local/sbin/siren-firstboot`` and ``siren-firstboot.service``: at every boot that finds
  something on the boot partition (``siren-bundle/``, ``siren-wifi.conf``,
  ``siren-authorized_keys``) it installs it: the bundle with the bundle's own ``install.sh``
  (which creates the service account, copies the bundle to ``/opt/siren/<id>`` and starts the
  board's systemd unit), then overwrites and deletes the bundle's secrets and removes the bundle
  from the boot partition. Every step is logged to the journal, the console and
  ``siren-firstboot.log`` on the boot partition (readable on any computer). Before installing,
  the clock is moved forward to when the card was prepared (a Raspberry Pi 4 has no real-time
  clock: until NTP answers it would start at the image's build time, before the bundle's
  certificates are valid).
* ``/usr/local/sbin/siren-grow-root`` and its unit: on first boot, the root partition and
  filesystem grow to the whole card.
* ``siren-ssh-hostkeys.service``: SSH host keys are made on the board (none are in the image),
  before ``ssh.service`` starts; SSH is off unless a public key was given.
* systemd-networkd: DHCP on every wired or USB network interface (and on ``wlan0`` when Wi-Fi
  settings are given); ``network-online.target`` is reached when any one link is up.
"""

from __future__ import annotations

import dataclasses

from image.layout import (
    BUNDLE_DIR,
    FIRSTBOOT_LOG,
    PREPARED_AT_FILE,
    SSH_KEYS_FILE,
    WIFI_FILE,
)

FIRMWARE_DIR = "/boot/firmware"
STATE_DIR = "/var/lib/siren-image"
#: Default host name of a board before its bundle names it.
DEFAULT_HOSTNAME = "siren-board"
#: Secret files of a bundle (edge_client.provision.SECRET_FILES), overwritten before deletion.
BUNDLE_SECRETS = ("keys/private.key", "mqtt.password", "client.key")


def firstboot_script() -> str:
    """``/usr/local/sbin/siren-firstboot`` (POSIX sh, run as root by its unit)."""
    secrets = " ".join(BUNDLE_SECRETS)
    return f"""#!/bin/sh
# siren-edge image: install what was put on the boot partition (first boot, or any boot that
# finds a new bundle there). Logs to the journal, the console and {FIRSTBOOT_LOG} on the boot
# partition.
set -u
FW={FIRMWARE_DIR}
BUNDLE="$FW/{BUNDLE_DIR}"
WIFI="$FW/{WIFI_FILE}"
SSHKEYS="$FW/{SSH_KEYS_FILE}"
LOG="$FW/{FIRSTBOOT_LOG}"
STATE={STATE_DIR}

say() {{
  echo "siren-firstboot: $*"
  printf '%s %s\\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >> "$LOG" 2>/dev/null || true
}}

# Overwrite a secret before deleting it, so the freed FAT clusters hold no copy (flash wear
# levelling may still keep old blocks: treat a card that carried a bundle as sensitive).
wipe() {{
  if [ -f "$1" ]; then
    shred -z -u "$1" 2>/dev/null || rm -f "$1"
  fi
}}

is_number() {{
  case "$1" in ''|*[!0-9]*) return 1 ;; *) return 0 ;; esac
}}

mkdir -p "$STATE"
if ! mountpoint -q "$FW"; then
  echo "siren-firstboot: $FW is not mounted: nothing to install"
  exit 0
fi

# 1. The clock: no earlier than when the card was prepared (see the module's documentation).
floor=0
if [ -f "$BUNDLE/{PREPARED_AT_FILE}" ]; then
  v=$(tr -cd 0-9 < "$BUNDLE/{PREPARED_AT_FILE}")
  if is_number "$v" && [ "$v" -gt "$floor" ]; then floor=$v; fi
fi
if [ -d "$BUNDLE" ]; then
  v=$(find "$BUNDLE" -type f -printf '%T@\\n' 2>/dev/null | cut -d. -f1 | sort -n | tail -n 1)
  if is_number "$v" && [ "$v" -gt "$floor" ]; then floor=$v; fi
fi
if [ -f "$BUNDLE/ca.crt" ] && command -v openssl >/dev/null 2>&1; then
  start=$(openssl x509 -noout -startdate -in "$BUNDLE/ca.crt" 2>/dev/null | cut -d= -f2)
  v=$(date -u -d "$start" +%s 2>/dev/null || true)
  if is_number "$v" && [ "$v" -gt "$floor" ]; then floor=$v; fi
fi
now=$(date -u +%s)
if [ "$floor" -gt "$now" ]; then
  if date -u -s "@$floor" >/dev/null; then
    say "clock moved forward to $(date -u +%Y-%m-%dT%H:%M:%SZ), when the card was" \
      "prepared (NTP corrects it once reachable)"
  fi
fi

# 2. Wi-Fi settings (siren image add-bundle --wifi-ssid ... writes them, key already hashed).
if [ -f "$WIFI" ]; then
  install -d -m 0755 /etc/wpa_supplicant
  install -m 0600 "$WIFI" /etc/wpa_supplicant/wpa_supplicant-wlan0.conf
  wipe "$WIFI"
  systemctl enable wpa_supplicant@wlan0.service >/dev/null 2>&1 || true
  systemctl restart --no-block wpa_supplicant@wlan0.service || true
  say "Wi-Fi settings installed for wlan0 and removed from the boot partition"
fi

# 3. SSH public keys: root may log in with them; the SSH server is enabled.
if [ -f "$SSHKEYS" ]; then
  install -d -m 0700 /root/.ssh
  cat "$SSHKEYS" >> /root/.ssh/authorized_keys
  chmod 0600 /root/.ssh/authorized_keys
  rm -f "$SSHKEYS"
  systemctl enable ssh.service >/dev/null 2>&1 || true
  systemctl start --no-block ssh.service || true
  say "SSH server enabled; root logs in with the keys of {SSH_KEYS_FILE}"
fi

# 4. The board's bundle, installed by its own install.sh.
if [ -f "$BUNDLE/install.sh" ]; then
  id=$(head -n 1 "$BUNDLE/keys/client_id" 2>/dev/null | tr -cd 'A-Za-z0-9_.-')
  if [ -n "$id" ]; then
    echo "$id" > /etc/hostname
    hostname "$id" 2>/dev/null || true
    if grep -q '^127\\.0\\.1\\.1' /etc/hosts; then
      sed -i "s/^127\\.0\\.1\\.1.*/127.0.1.1\\t$id/" /etc/hosts
    else
      printf '127.0.1.1\\t%s\\n' "$id" >> /etc/hosts
    fi
  fi
  say "installing board ${{id:-(no keys/client_id)}} from the boot partition with its install.sh"
  rm -f "$STATE/install.status"
  {{ sh "$BUNDLE/install.sh" 2>&1; echo $? > "$STATE/install.status"; }} | tee -a "$LOG"
  status=$(cat "$STATE/install.status" 2>/dev/null || echo 1)
  if [ "$status" != 0 ]; then
    say "install.sh FAILED (exit $status): the bundle stays on the boot partition;" \
      "see the lines above, fix it, reboot"
    sync
    exit 1
  fi
  for f in {secrets}; do wipe "$BUNDLE/$f"; done
  rm -rf "$BUNDLE"
  sync
  echo "$id" > "$STATE/board"
  say "board $id installed and started (journalctl -u siren-board-$id); its private" \
    "key and the whole bundle were removed from the boot partition"
fi
sync
exit 0
"""


def firstboot_unit() -> str:
    """``siren-firstboot.service``: runs the script when the boot partition holds something."""
    return f"""[Unit]
Description=siren-edge image: install a board bundle from the boot partition
RequiresMountsFor={FIRMWARE_DIR}
After=local-fs.target siren-grow-root.service
ConditionPathExists=|{FIRMWARE_DIR}/{BUNDLE_DIR}/install.sh
ConditionPathExists=|{FIRMWARE_DIR}/{WIFI_FILE}
ConditionPathExists=|{FIRMWARE_DIR}/{SSH_KEYS_FILE}

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/siren-firstboot
StandardOutput=journal+console
StandardError=journal+console
TimeoutStartSec=infinity

[Install]
WantedBy=multi-user.target
"""


def grow_root_script() -> str:
    """``/usr/local/sbin/siren-grow-root``: the root partition and filesystem fill the card."""
    return f"""#!/bin/sh
# siren-edge image: grow the root partition to the end of the card and the filesystem with it.
set -eu
STAMP={STATE_DIR}/root-grown
ROOTDEV=$(findmnt -n -o SOURCE /)
NAME=$(basename "$ROOTDEV")
PART=$(cat "/sys/class/block/$NAME/partition")
DISK=/dev/$(basename "$(readlink -f "/sys/class/block/$NAME/..")")
before=$(( $(blockdev --getsize64 "$ROOTDEV") / 1048576 ))
echo ", +" | sfdisk --no-reread --no-tell-kernel -q -N "$PART" "$DISK"
partx -u -n "$PART" "$DISK"
resize2fs "$ROOTDEV" >/dev/null 2>&1
after=$(( $(blockdev --getsize64 "$ROOTDEV") / 1048576 ))
mkdir -p {STATE_DIR}
touch "$STAMP"
echo "siren-grow-root: $ROOTDEV on $DISK grown from $before MiB to $after MiB"
"""


def grow_root_unit() -> str:
    """``siren-grow-root.service`` (once: a stamp file records that it ran)."""
    return f"""[Unit]
Description=siren-edge image: grow the root filesystem to the whole card
After=local-fs.target
Before=siren-firstboot.service
ConditionPathExists=!{STATE_DIR}/root-grown

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/siren-grow-root
StandardOutput=journal+console
StandardError=journal+console

[Install]
WantedBy=multi-user.target
"""


def ssh_hostkeys_unit() -> str:
    """``siren-ssh-hostkeys.service``: each board makes its own SSH host keys."""
    return """[Unit]
Description=siren-edge image: SSH host keys of this board
Before=ssh.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=ssh.service
"""


def wired_network() -> str:
    """systemd-networkd: DHCP on wired and USB network interfaces."""
    return "[Match]\nName=eth* en* usb*\n\n[Network]\nDHCP=yes\n"


def wireless_network() -> str:
    """systemd-networkd: DHCP on ``wlan0`` (wpa_supplicant@wlan0 associates)."""
    return "[Match]\nName=wlan*\n\n[Network]\nDHCP=yes\n"


def wait_online_dropin() -> str:
    """``network-online.target`` once any link is up (not every interface: a Pi on Ethernet
    has an idle ``wlan0``), within two minutes."""
    return (
        "[Service]\nExecStart=\n"
        "ExecStart=/usr/lib/systemd/systemd-networkd-wait-online --any --timeout=120\n"
    )


def hosts_text(hostname: str) -> str:
    """``/etc/hosts``."""
    return (
        "127.0.0.1\tlocalhost\n"
        f"127.0.1.1\t{hostname}\n"
        "::1\t\tlocalhost ip6-localhost ip6-loopback\n"
        "ff02::1\t\tip6-allnodes\nff02::2\t\tip6-allrouters\n"
    )


@dataclasses.dataclass(frozen=True)
class ImageFile:
    """A file the image build writes into the root filesystem."""

    path: str
    text: str
    mode: int = 0o644


#: Units enabled in every image.
ENABLED_UNITS = (
    "siren-firstboot.service",
    "siren-grow-root.service",
    "siren-ssh-hostkeys.service",
    "systemd-networkd.service",
    "systemd-networkd-wait-online.service",
    "systemd-resolved.service",
    "systemd-timesyncd.service",
)


def image_files(hostname: str = DEFAULT_HOSTNAME) -> list[ImageFile]:
    """Every file :mod:`image.assemble` writes into an image's root filesystem (besides
    ``fstab``, Wi-Fi and SSH settings, which depend on the build's options)."""
    return [
        ImageFile("/usr/local/sbin/siren-firstboot", firstboot_script(), 0o755),
        ImageFile("/etc/systemd/system/siren-firstboot.service", firstboot_unit()),
        ImageFile("/usr/local/sbin/siren-grow-root", grow_root_script(), 0o755),
        ImageFile("/etc/systemd/system/siren-grow-root.service", grow_root_unit()),
        ImageFile("/etc/systemd/system/siren-ssh-hostkeys.service", ssh_hostkeys_unit()),
        ImageFile("/etc/systemd/network/20-siren-wired.network", wired_network()),
        ImageFile("/etc/systemd/network/30-siren-wlan.network", wireless_network()),
        ImageFile(
            "/etc/systemd/system/systemd-networkd-wait-online.service.d/siren-any.conf",
            wait_online_dropin(),
        ),
        ImageFile("/etc/hostname", hostname + "\n"),
        ImageFile("/etc/hosts", hosts_text(hostname)),
    ]
