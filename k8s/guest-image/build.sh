#!/usr/bin/env bash
# Build a Cyberdesk guest disk: Debian 12 (bookworm) with the guest agent baked in, started at boot
# by systemd, configured per VM by cloud-init from the VM's Secret. README.md beside this file
# explains every step and how the result becomes a KubeVirt containerDisk (Containerfile).
#
# Usage: k8s/guest-image/build.sh [--desktop] BASE_IMAGE OUTPUT
#   BASE_IMAGE  Debian's official "genericcloud" amd64 qcow2 image of bookworm (download it with its
#               SHA512SUMS and check it first; this script never downloads anything itself)
#   OUTPUT      the finished qcow2 (sparse, compressed), e.g. out/disk.qcow2
#   --desktop   also install the desktop stack (Xvfb, a window manager, xdotool) and enable its
#               units: the image of the template "desktop"
#
# Needs on the build machine: virt-customize and virt-sparsify (Debian: libguestfs-tools),
# qemu-img (qemu-utils), git, and network access for apt and pip inside the image. /dev/kvm makes
# it fast; without it libguestfs emulates (LIBGUESTFS_BACKEND=direct, slow but works).
set -euo pipefail

desktop=0
if [ "${1:-}" = "--desktop" ]; then
  desktop=1
  shift
fi
if [ "$#" -ne 2 ]; then
  sed -n '6,11p' "$0" >&2
  exit 2
fi
base=$1
output=$2
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)

# What the VM runs: the agent and, for it, its command-line tools; nothing to log in with (the only
# way in is the agent, so openssh-server is removed and no default user is made: 99-cyberdesk.cfg).
packages=(python3 python3-venv ca-certificates bash coreutils procps iproute2 less curl git e2fsprogs util-linux)
desktop_packages=(xvfb x11-utils xdotool matchbox-window-manager)
if [ "$desktop" = 1 ]; then
  packages+=("${desktop_packages[@]}")
fi
install_list=$(IFS=,; echo "${packages[*]}")

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The same two distributions the platform image installs (k8s/Containerfile): the SDK one, for
# cyberdesk_proto, and the servers' one, for guest_agent and cyberdesk_common. Only committed
# files go in (git archive): no local state, no secrets, no .venv.
git -C "$root" archive --format=tar --prefix=src/ HEAD \
  pyproject.toml README.md sdk/python cyberdesk cyberdesk_proto cyberdesk_common cyberdesk_stack \
  gateway_svc instance_svc billing_svc guest_agent >"$work/src.tar"

cp --sparse=always "$base" "$work/disk.qcow2"
qemu-img resize "$work/disk.qcow2" 6G

customize=(
  virt-customize -a "$work/disk.qcow2"
  --update
  --install "$install_list"
  --uninstall openssh-server
  # The tenant's user, as in a local sandbox (uid 1000, home /home/user): the agent and every
  # command it runs are this user.
  --run-command 'useradd --create-home --uid 1000 --user-group --shell /bin/bash user'
  --mkdir /opt/cyberdesk
  --upload "$work/src.tar:/opt/cyberdesk/src.tar"
  --run-command 'cd /opt/cyberdesk && tar -xf src.tar && rm src.tar'
  --run-command 'python3 -m venv /opt/cyberdesk/venv'
  --run-command '/opt/cyberdesk/venv/bin/pip install --no-cache-dir /opt/cyberdesk/src/sdk/python /opt/cyberdesk/src'
  --run-command 'rm -rf /opt/cyberdesk/src'
  --mkdir /usr/local/libexec/cyberdesk
  --upload "$here/agent_launch.py:/usr/local/libexec/cyberdesk/agent-launch"
  --chmod '0755:/usr/local/libexec/cyberdesk/agent-launch'
  --upload "$here/data-disk.sh:/usr/local/libexec/cyberdesk/data-disk"
  --chmod '0755:/usr/local/libexec/cyberdesk/data-disk'
  --upload "$here/cyberdesk-data.service:/etc/systemd/system/cyberdesk-data.service"
  --upload "$here/cyberdesk-agent.service:/etc/systemd/system/cyberdesk-agent.service"
  --upload "$here/99-cyberdesk.cfg:/etc/cloud/cloud.cfg.d/99-cyberdesk.cfg"
  --upload "$here/60-cyberdesk.conf:/etc/sysctl.d/60-cyberdesk.conf"
  --mkdir /etc/cyberdesk/agent
  --chmod '0700:/etc/cyberdesk/agent'
  --run-command 'systemctl enable cyberdesk-data.service cyberdesk-agent.service'
)
if [ "$desktop" = 1 ]; then
  customize+=(
    --upload "$here/cyberdesk-desktop.service:/etc/systemd/system/cyberdesk-desktop.service"
    --upload "$here/cyberdesk-wm.service:/etc/systemd/system/cyberdesk-wm.service"
    --run-command 'systemctl enable cyberdesk-desktop.service cyberdesk-wm.service'
  )
fi
customize+=(
  # Every VM made from the disk is new to cloud-init (it runs again with that VM's Secret) and gets
  # a machine id of its own.
  --run-command 'cloud-init clean --logs --seed'
  --truncate /etc/machine-id
)
"${customize[@]}"

mkdir -p "$(dirname "$output")"
virt-sparsify --compress "$work/disk.qcow2" "$output"
echo "built $output"
