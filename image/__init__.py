"""Flashable Raspberry Pi SD-card images that join a siren-edge fleet on first boot.

``siren image build`` writes one image for every board: Debian bookworm arm64 (``debootstrap``,
Debian's ``linux-image-arm64`` and ``raspi-firmware``, the recipe of Debian's own Raspberry Pi
images), systemd, wired DHCP (Wi-Fi optional), the board program's virtual environment with
TensorFlow and LiteRT (the lean board install), and a first-boot unit. No board identity is in
the image: a board's bundle (``siren deploy``) is copied onto the FAT boot partition after
flashing (``siren image add-bundle``, or any file manager), and the first boot installs it with
the bundle's own ``install.sh``, removes its secrets from the FAT partition and starts the board.

The image is assembled without mounting anything: the root filesystem is built in a directory
and written with ``mkfs.ext4 -d``, the boot partition with ``mkfs.vfat`` and ``mtools``, the
partition table with ``sfdisk``. This package writes files for the board side from the host
side, so it sits above ``edge_client`` like ``deploy`` (DESIGN.md §2).

Modules: :mod:`image.layout` (partition maths, boot-file texts and checks: pure),
:mod:`image.firstboot` (the first-boot script and the units written into the image: pure),
:mod:`image.root` (the cached arm64 root, built under QEMU user emulation),
:mod:`image.assemble` (staging, scrubbing, filesystems, the image file),
:mod:`image.card` (reading and writing the boot partition of an image file with mtools).
"""
