"""The operator's Kubernetes client: JSON in, JSON out, on kubernetes_asyncio's authenticated session.

kubernetes_asyncio loads the kubeconfig or the in-cluster service account and signs requests;
the typed models are skipped (every object here is a plain dict, as kopf hands them over), and
errors come back as `KubeError` with the API server's status code and reason.
"""

from __future__ import annotations

import json
import os
from typing import Any
from urllib.parse import quote, urlencode

from kubernetes_asyncio import client, config

Obj = dict[str, Any]

MERGE = "application/merge-patch+json"
_PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy")
JSON_PATCH = "application/json-patch+json"


class KubeError(Exception):
    """A non-2xx answer: `status` (HTTP code), `reason` (e.g. "AlreadyExists", "Conflict")."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status, self.reason, self.message = status, reason, message


def path(group: str, version: str, plural: str, namespace: str = "", name: str = "", sub: str = "") -> str:
    base = f"/apis/{group}/{version}" if group else f"/api/{version}"
    if namespace:
        base += f"/namespaces/{quote(namespace)}"
    base += f"/{plural}"
    if name:
        base += f"/{quote(name)}"
    if sub:
        base += f"/{sub}"
    return base


class Kube:
    """One authenticated session; `await Kube.connect()`, `await kube.close()`."""

    def __init__(self, api: client.ApiClient) -> None:
        self.api = api
        self.requests = 0

    @classmethod
    async def connect(cls) -> Kube:
        if os.environ.get("KUBERNETES_SERVICE_HOST") and not os.environ.get("KUBECONFIG"):
            config.load_incluster_config()  # type: ignore[no-untyped-call]
        else:
            await config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None)
        api = client.ApiClient()
        session = getattr(api.rest_client, "pool_manager", None)
        if session is not None and not any(os.environ.get(v) for v in _PROXY_VARIABLES):
            # kubernetes_asyncio's session trusts the environment, so aiohttp reads ~/.netrc and the
            # proxy variables on every request (a tenth of the operator's CPU in a burst); with no
            # proxy configured there is nothing to find there.
            session._trust_env = False
        return cls(api)

    async def close(self) -> None:
        await self.api.close()

    async def request(
        self, method: str, url: str, body: Any = None, *, query: dict[str, str] | None = None, content_type: str = ""
    ) -> Obj:
        headers = {"Accept": "application/json", "Content-Type": content_type or "application/json"}
        if query:
            url += "?" + urlencode(query)
        self.requests += 1
        resp = await self.api.call_api(
            url,
            method,
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
            _preload_content=False,
            _return_http_data_only=True,
        )
        try:
            text = await resp.text()
        finally:
            resp.release()
        data: Obj = json.loads(text) if text else {}
        if resp.status >= 400:
            raise KubeError(resp.status, str(data.get("reason", resp.reason)), str(data.get("message", text[:200])))
        return data

    async def get(self, url: str) -> Obj | None:
        """The object, or None when it does not exist."""
        try:
            return await self.request("GET", url)
        except KubeError as e:
            if e.status == 404:
                return None
            raise

    async def create(self, collection_url: str, obj: Obj) -> tuple[Obj, bool]:
        """Create; when the name is taken, the existing object. Returns (object, created)."""
        try:
            return await self.request("POST", collection_url, obj), True
        except KubeError as e:
            if e.status != 409 or e.reason != "AlreadyExists":
                raise
        existing = await self.get(f"{collection_url}/{quote(obj['metadata']['name'])}")
        if existing is None:  # deleted in between: try once more
            return await self.request("POST", collection_url, obj), True
        return existing, False

    async def patch(self, url: str, patch: Any, *, content_type: str = MERGE) -> Obj:
        return await self.request("PATCH", url, patch, content_type=content_type)

    async def put(self, url: str, body: Any) -> Obj:
        return await self.request("PUT", url, body)

    async def delete(
        self, url: str, *, propagation: str = "Background", uid: str = "", resource_version: str = ""
    ) -> bool:
        """Delete; False when it was already gone. With `resource_version`, a 409 if it changed since."""
        options: Obj = {"propagationPolicy": propagation}
        pre = {k: v for k, v in (("uid", uid), ("resourceVersion", resource_version)) if v}
        if pre:
            options["preconditions"] = pre
        try:
            await self.request("DELETE", url, options)
            return True
        except KubeError as e:
            if e.status == 404:
                return False
            raise
