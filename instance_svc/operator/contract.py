"""The contract between instance_svc's kubevirt runtime, the instance operator and the manifests.

One source of truth for names: the CRDs in k8s/crds/ and docs/kubernetes.md ("Contract") say the
same things in YAML and prose; every Python reader and writer of these resources imports them from
here instead of spelling a string twice.
"""

from __future__ import annotations

from typing import Final

# -- Our resources: group cyberdesk.io, served version v1alpha1, all namespaced. -------------------
GROUP: Final = "cyberdesk.io"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"

INSTANCE_KIND: Final = "CyberdeskInstance"
INSTANCE_PLURAL: Final = "cyberdeskinstances"
TEMPLATE_KIND: Final = "CyberdeskTemplate"
TEMPLATE_PLURAL: Final = "cyberdesktemplates"
SNAPSHOT_KIND: Final = "CyberdeskSnapshot"
SNAPSHOT_PLURAL: Final = "cyberdesksnapshots"
WARM_POOL_KIND: Final = "CyberdeskWarmPool"
WARM_POOL_PLURAL: Final = "cyberdeskwarmpools"

# Where everything lives when no setting says otherwise (k8s/base/namespace.yaml).
DEFAULT_NAMESPACE: Final = "cyberdesk"

# -- KubeVirt's resources the operator writes or reads. ----------------------------------------------
KUBEVIRT_GROUP: Final = "kubevirt.io"
KUBEVIRT_VERSION: Final = "v1"
VM_PLURAL: Final = "virtualmachines"
VMI_PLURAL: Final = "virtualmachineinstances"
SUBRESOURCES_GROUP: Final = "subresources.kubevirt.io"  # PUT .../virtualmachineinstances/<name>/pause|unpause
SNAPSHOT_GROUP: Final = "snapshot.kubevirt.io"
SNAPSHOT_VERSION: Final = "v1beta1"
VM_SNAPSHOT_PLURAL: Final = "virtualmachinesnapshots"
VM_SNAPSHOT_CONTENT_PLURAL: Final = "virtualmachinesnapshotcontents"
VM_RESTORE_PLURAL: Final = "virtualmachinerestores"
POOL_GROUP: Final = "pool.kubevirt.io"
POOL_VERSION: Final = "v1beta1"
VM_POOL_PLURAL: Final = "virtualmachinepools"
CDI_GROUP: Final = "cdi.kubevirt.io"
CDI_VERSION: Final = "v1beta1"

# -- kopf's peering resources (k8s/crds/kopf-peering.yaml): only one operator replica acts. --------
PEERING_GROUP: Final = "kopf.dev"
PEERING_VERSION: Final = "v1"
PEERING_PLURAL: Final = "kopfpeerings"
CLUSTER_PEERING_PLURAL: Final = "clusterkopfpeerings"
PEERING_NAME: Final = "cyberdesk-instance-operator"

# -- Labels. ---------------------------------------------------------------------------------------
# On the CyberdeskInstance (written by instance_svc) and copied by the operator onto everything it
# makes for the instance: list an instance's or a tenant's objects with a label selector.
LABEL_TENANT: Final = "cyberdesk.io/tenant"
LABEL_INSTANCE: Final = "cyberdesk.io/instance"
# On every VM, its launcher pod (spec.template.metadata.labels) and its Secret: the VM's name. The
# per-VM NetworkPolicy selects the pod by it.
LABEL_VM: Final = "cyberdesk.io/vm"
# On unclaimed warm-pool members only (removed at the claim): the pool, and "starting" or "ready".
LABEL_POOL: Final = "cyberdesk.io/pool"
LABEL_POOL_STATE: Final = "cyberdesk.io/pool-state"
POOL_STATE_STARTING: Final = "starting"
POOL_STATE_READY: Final = "ready"
# On CyberdeskSnapshots and their VirtualMachineSnapshots: the instance snapshotted.
LABEL_SNAPSHOT: Final = "cyberdesk.io/snapshot"
# The standard labels (k8s/base): VM pods are the component "guest-agent"; the NetworkPolicy of a VM
# lets in only the components below, on the agent port.
LABEL_NAME: Final = "app.kubernetes.io/name"
LABEL_COMPONENT: Final = "app.kubernetes.io/component"
LABEL_PART_OF: Final = "app.kubernetes.io/part-of"
LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"
APP_NAME: Final = "cyberdesk"
COMPONENT_GUEST_AGENT: Final = "guest-agent"
COMPONENT_GATEWAY: Final = "gateway"
COMPONENT_INSTANCE_SVC: Final = "instance-svc"
COMPONENT_OPERATOR: Final = "instance-operator"
AGENT_CLIENT_COMPONENTS: Final = (COMPONENT_GATEWAY, COMPONENT_INSTANCE_SVC, COMPONENT_OPERATOR)
MANAGED_BY: Final = "cyberdesk-instance-operator"

# -- Annotations. ----------------------------------------------------------------------------------
# On a CyberdeskInstance, written by instance_svc: the CreateInstance request_id (idempotency key).
ANNOTATION_REQUEST_ID: Final = "cyberdesk.io/request-id"
# On a VM: the uid of the CyberdeskInstance it serves (checked before adopting an existing VM of the
# same name, so a VM of a deleted instance of the same name is never taken over).
ANNOTATION_INSTANCE_UID: Final = "cyberdesk.io/instance-uid"
# On VMs and Secrets: the operator replica that wrote them (CYBERDESK_OPERATOR_ID, default host-pid).
ANNOTATION_WRITTEN_BY: Final = "cyberdesk.io/written-by"

# -- Finalizer the operator puts on CyberdeskInstances and CyberdeskSnapshots. ----------------------
FINALIZER: Final = "cyberdesk.io/operator"

# -- The per-VM Secret: named SECRET_NAME_FORMAT.format(vm=<vm name>); status.agentSecret names it. --
SECRET_NAME_FORMAT: Final = "{vm}-agent"
SECRET_KEY_TOKEN: Final = "token"  # the agent's bearer token (ASCII, 43 characters)
SECRET_KEY_CA: Final = "ca.crt"  # PEM of the per-VM CA that signed tls.crt: what a client trusts
SECRET_KEY_TLS_CERT: Final = "tls.crt"  # the agent's certificate (PEM), for agentServerName
SECRET_KEY_TLS_KEY: Final = "tls.key"  # its private key (PEM)
SECRET_KEY_USERDATA: Final = "userdata"  # the cloud-config KubeVirt's cloudInitNoCloud.secretRef reads
# The name the agent's certificate carries (and the client checks): AGENT_SERVER_NAME_FORMAT.format(vm=...).
AGENT_SERVER_NAME_FORMAT: Final = "{vm}.agent.cyberdesk.internal"
DEFAULT_AGENT_PORT: Final = 49983

# Paths inside the guest, written by cloud-init from the Secret; the agent's systemd unit (k8s/guest)
# reads AGENT_ENV_FILE as its EnvironmentFile.
GUEST_CONFIG_DIR: Final = "/etc/cyberdesk"
GUEST_TOKEN_FILE: Final = "/etc/cyberdesk/agent/token"
GUEST_TLS_CERT_FILE: Final = "/etc/cyberdesk/agent/tls.crt"
GUEST_TLS_KEY_FILE: Final = "/etc/cyberdesk/agent/tls.key"
GUEST_ENV_FILE: Final = "/etc/cyberdesk/agent.env"
AGENT_UNIT: Final = "cyberdesk-agent.service"

# -- CyberdeskInstance phases (status.phase). --------------------------------------------------------
PHASE_PENDING: Final = "Pending"  # accepted; nothing written yet, or waiting for its template/snapshot
PHASE_STARTING: Final = "Starting"  # VM written; VMI not running yet or its agent not answering yet
PHASE_RUNNING: Final = "Running"  # the agent answered with the token over TLS; agentEndpoint is set
PHASE_PAUSED: Final = "Paused"  # the VMI is paused (spec.paused, or the deadline with timeoutAction Pause)
PHASE_TERMINATING: Final = "Terminating"  # deletionTimestamp set; the operator is removing the VM
PHASE_EXPIRED: Final = "Expired"  # terminal: the deadline passed, the VM is deleted
PHASE_FAILED: Final = "Failed"  # terminal: could not start, or the VM vanished; see reason/message
PHASES: Final = (
    PHASE_PENDING,
    PHASE_STARTING,
    PHASE_RUNNING,
    PHASE_PAUSED,
    PHASE_TERMINATING,
    PHASE_EXPIRED,
    PHASE_FAILED,
)
TERMINAL_PHASES: Final = frozenset({PHASE_EXPIRED, PHASE_FAILED})

# Condition types of a CyberdeskInstance.
CONDITION_VM_READY: Final = "VirtualMachineReady"
CONDITION_AGENT_READY: Final = "AgentReady"
CONDITION_PAUSED: Final = "Paused"
CONDITION_WARM_POOL_CLAIMED: Final = "WarmPoolClaimed"

# Reasons (status.reason and condition reasons) the runtime may act on.
REASON_DEADLINE_REACHED: Final = "DeadlineReached"
REASON_VM_GONE: Final = "VirtualMachineGone"
REASON_VMI_FAILED: Final = "VirtualMachineFailed"
REASON_TEMPLATE_NOT_FOUND: Final = "TemplateNotFound"
REASON_SNAPSHOT_NOT_READY: Final = "SnapshotNotReady"
REASON_SNAPSHOT_NOT_FOUND: Final = "SnapshotNotFound"
REASON_INVALID_SPEC: Final = "InvalidSpec"
REASON_CLAIMED: Final = "Claimed"
REASON_WARM_POOL_EMPTY: Final = "WarmPoolEmpty"
REASON_WARM_POOL_MISMATCH: Final = "WarmPoolMismatch"
REASON_RESTORE_FAILED: Final = "RestoreFailed"
REASON_AGENT_REFUSED: Final = "AgentRefused"
REASON_WAITING_FOR_OLD_VM: Final = "WaitingForOldVirtualMachine"
REASON_SOURCE_NOT_FOUND: Final = "SourceNotFound"
REASON_SNAPSHOT_FAILED: Final = "SnapshotFailed"

# timeoutAction values.
TIMEOUT_TERMINATE: Final = "Terminate"
TIMEOUT_PAUSE: Final = "Pause"
# network.mode values.
NETWORK_NONE: Final = "None"
NETWORK_INTERNET: Final = "Internet"

# -- CyberdeskSnapshot phases. ---------------------------------------------------------------------
SNAPSHOT_PHASE_PENDING: Final = "Pending"
SNAPSHOT_PHASE_IN_PROGRESS: Final = "InProgress"
SNAPSHOT_PHASE_READY: Final = "Ready"
SNAPSHOT_PHASE_FAILED: Final = "Failed"

# Egress an instance never gets, whatever its policy says (the NetworkPolicy's `except` list):
# private and shared ranges (pods, services, nodes), loopback, link-local with the cloud metadata
# address 169.254.169.254, and their IPv6 counterparts.
DENIED_EGRESS_V4: Final = (
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "224.0.0.0/4",
    "240.0.0.0/4",
)
DENIED_EGRESS_V6: Final = ("::1/128", "fc00::/7", "fe80::/10", "ff00::/8")


def secret_name(vm_name: str) -> str:
    """The Secret holding a VM's agent token, TLS material and cloud-init user data."""
    return SECRET_NAME_FORMAT.format(vm=vm_name)


def agent_server_name(vm_name: str) -> str:
    """The DNS name in a VM agent's certificate."""
    return AGENT_SERVER_NAME_FORMAT.format(vm=vm_name)
