"""The cloud-config that gives a VM's guest agent its token, TLS material and environment.

It travels in the VM's Secret (key `userdata`, read by KubeVirt's cloudInitNoCloud.secretRef), never
inline in the VirtualMachine object, where anyone allowed to read VMs would see the token. The
guest image's systemd unit (k8s/guest-image) reads contract.GUEST_ENV_FILE as its EnvironmentFile.
"""

from __future__ import annotations

from typing import Any

import yaml

from instance_svc.operator import contract


def environment(*, port: int, instance_id: str, disk_mib: int, desktop: bool) -> dict[str, str]:
    """What the agent reads (guest_agent.config), with the guest's paths."""
    env = {
        "CYBERDESK_AGENT_LISTEN": f"0.0.0.0:{port}",
        "CYBERDESK_AGENT_TOKEN_FILE": contract.GUEST_TOKEN_FILE,
        "CYBERDESK_AGENT_TLS_CERT": contract.GUEST_TLS_CERT_FILE,
        "CYBERDESK_AGENT_TLS_KEY": contract.GUEST_TLS_KEY_FILE,
        # Empty for a warm-pool member: the claim binds it (ConfigureAgent).
        "CYBERDESK_AGENT_INSTANCE_ID": instance_id,
        "CYBERDESK_AGENT_DISK_MIB": str(disk_mib),
    }
    if desktop:
        env["DISPLAY"] = ":99"
    return env


def render(
    *, token: str, cert_pem: str, key_pem: str, port: int, instance_id: str, disk_mib: int, desktop: bool
) -> str:
    """The `#cloud-config` text (valid for `cloud-init schema`)."""
    env = environment(port=port, instance_id=instance_id, disk_mib=disk_mib, desktop=desktop)
    secret_file = {"owner": "root:root", "permissions": "0600"}
    config: dict[str, Any] = {
        "write_files": [
            {"path": contract.GUEST_TOKEN_FILE, "content": token, **secret_file},
            {"path": contract.GUEST_TLS_CERT_FILE, "content": cert_pem, **secret_file},
            {"path": contract.GUEST_TLS_KEY_FILE, "content": key_pem, **secret_file},
            {
                "path": contract.GUEST_ENV_FILE,
                "content": "".join(f"{k}={v}\n" for k, v in env.items()),
                **secret_file,
            },
        ],
        # The unit is enabled in the image and ordered after cloud-init; restarting it here makes a
        # restored disk (whose agent already ran with an older token) pick up this VM's files.
        "runcmd": [["systemctl", "restart", contract.AGENT_UNIT]],
    }
    text: str = yaml.safe_dump(config, sort_keys=False, width=1_000_000)
    return "#cloud-config\n" + text
