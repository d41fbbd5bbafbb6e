"""Running the operator: kopf for one namespace, with peering so that of several replicas one acts.

kopf's peering pauses every replica but the one with the highest priority (replicas of equal
priority would all pause), so each replica takes a random priority unless
CYBERDESK_OPERATOR_PRIORITY sets one; when the active replica dies, its keep-alive expires after
CYBERDESK_OPERATOR_PEERING_LIFETIME seconds and the next one resumes. The KopfPeering object is
created here when missing (kopf only writes into an existing one).
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from typing import Any

import kopf

from cyberdesk_common.config import env_bool, env_int
from instance_svc.operator import contract
from instance_svc.operator.kube import Kube, KubeError, path
from instance_svc.operator.state import Settings

log = logging.getLogger("instance_svc.operator")


async def ensure_peering(namespace: str) -> None:
    kube = await Kube.connect()
    try:
        await kube.create(
            path(contract.PEERING_GROUP, contract.PEERING_VERSION, contract.PEERING_PLURAL, namespace),
            {
                "apiVersion": f"{contract.PEERING_GROUP}/{contract.PEERING_VERSION}",
                "kind": "KopfPeering",
                "metadata": {"name": contract.PEERING_NAME, "namespace": namespace},
            },
        )
    except KubeError as e:
        log.warning("cannot create the peering object %s (%s): replicas will not coordinate", contract.PEERING_NAME, e)
    finally:
        await kube.close()


async def run(
    *,
    stop_flag: asyncio.Event | threading.Event | None = None,
    ready_flag: asyncio.Event | threading.Event | None = None,
    memo: Any = None,
) -> None:
    """The operator until `stop_flag` (or a signal, in the main thread)."""
    from instance_svc.operator import handlers  # noqa: F401  (registers the handlers)

    settings = Settings.from_env()
    standalone = env_bool("OPERATOR_STANDALONE", False)
    priority = env_int("OPERATOR_PRIORITY", random.randint(1, 2**31 - 1))
    kopf_settings = kopf.OperatorSettings()
    kopf_settings.peering.lifetime = env_int("OPERATOR_PEERING_LIFETIME", 60, minimum=2)
    kopf_settings.peering.name = contract.PEERING_NAME
    kopf_settings.peering.priority = priority
    if not standalone:
        await ensure_peering(settings.namespace)
    log.info(
        "instance operator %s for namespace %s (priority %d%s)",
        settings.operator_id,
        settings.namespace,
        priority,
        ", standalone" if standalone else "",
    )
    await kopf.operator(
        namespaces=[settings.namespace],
        standalone=standalone,
        priority=priority,
        # A peering name makes peering mandatory (kopf waits for the peering resource to exist).
        peering_name=None if standalone else contract.PEERING_NAME,
        settings=kopf_settings,
        stop_flag=stop_flag,
        ready_flag=ready_flag,
        memo=memo if memo is not None else kopf.Memo(),
    )
