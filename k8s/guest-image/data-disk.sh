#!/bin/sh
# Mount the instance's writable disk at the tenant's home (cyberdesk-data.service, as root, at boot).
#
# A VM of a containerDisk template has a second disk, a blank DataVolume of the instance's disk_mib
# (docs/kubernetes.md): that is where the tenant's files must live, because the containerDisk is
# thrown away with the VM and a VirtualMachineSnapshot keeps only DataVolumes. On the first boot the
# disk is blank and is formatted (ext4, label cyberdesk-data); a VM restored from a snapshot finds
# it formatted and keeps what is on it. Only a disk with no signature at all is ever formatted, and
# never the disk holding /: the cloud-init seed disk and anything else with a file system are left
# alone. A VM of a dataVolume template has no such disk: the home stays on its root disk.
#
# The settings below are for the tests (tests/k8s/manifests/test_guest_image.py); the unit sets none.
set -eu

label=cyberdesk-data
devices=${CYBERDESK_DATA_DEVICES:-$(echo /dev/vd[a-z])}
home=${CYBERDESK_DATA_HOME:-/home/user}
owner=${CYBERDESK_DATA_USER:-user}
root_disk=${CYBERDESK_ROOT_DISK:-/dev/$(lsblk -no PKNAME "$(findmnt -no SOURCE /)")}

for dev in $devices; do
  [ -b "$dev" ] || continue
  [ "$dev" = "$root_disk" ] && continue
  fresh=0
  if ! blkid -p "$dev" >/dev/null 2>&1; then
    # No file system, no partition table, nothing: the blank DataVolume of a new instance.
    mkfs.ext4 -q -L "$label" -m 0 -E lazy_itable_init=1,lazy_journal_init=1 "$dev"
    fresh=1
  elif [ "$(blkid -p -o value -s LABEL "$dev" 2>/dev/null || true)" != "$label" ]; then
    continue
  fi
  mount -o nodev,nosuid "$dev" "$home"
  if [ "$fresh" = 1 ]; then
    # A new home: the image's skeleton, owned by the tenant's user.
    cp -a /etc/skel/. "$home/"
    rmdir "$home/lost+found" 2>/dev/null || true
    chown -R "$owner:" "$home"
    chmod 0750 "$home"
  fi
  if [ "$fresh" = 1 ]; then
    echo "cyberdesk-data: $dev formatted and mounted at $home"
  else
    echo "cyberdesk-data: $dev mounted at $home"
  fi
  exit 0
done
echo "cyberdesk-data: no data disk; the home stays on the root disk"
