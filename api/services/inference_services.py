"""Every Kubernetes call of the control plane: one KServe InferenceService per task.

In cluster mode (``TASKVISION_SERVING_BACKEND=kserve``) a task's production
version is served by an InferenceService named ``tv-<task id>`` whose predictor
runs our ServingRuntime on the version's bundle (``storageUri``). A new
production version patches it; ``canaryTrafficPercent`` lets the new version
take a share of traffic first (KServe keeps the previous revision for the
rest) and removing it promotes. Deleting the task deletes the service.

Calls go through KServe's ``KServeClient`` (the kubernetes client underneath);
this module is the only place that talks to the Kubernetes API.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

GROUP, VERSION, PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"
MODEL_FORMAT = "taskvision-bundle"
MANAGED_BY, TASK_LABEL = "app.kubernetes.io/managed-by", "taskvision.io/task"


class KubernetesUnavailable(Exception):
    """The Kubernetes API could not be reached or refused the call; retry later."""


@dataclass(frozen=True)
class Endpoint:
    url: str | None
    ready: bool
    model_name: str


def service_name(task_id: str) -> str:
    """A DNS-1123 name (<= 63 characters) for the task's InferenceService."""
    return f"tv-{task_id}"[:63].lower()


class InferenceServiceManager:
    def __init__(
        self,
        *,
        namespace: str,
        runtime: str = "taskvision-predictor",
        service_account: str | None = "taskvision-predictor",
        min_replicas: int = 0,
        max_replicas: int = 1,
        kubeconfig: dict[str, Any] | str | None = None,
        client: Any | None = None,
    ) -> None:
        self.namespace = namespace
        self.runtime = runtime
        self.service_account = service_account
        self.min_replicas = min_replicas
        self.max_replicas = max_replicas
        self._kubeconfig = kubeconfig
        self._client = client

    @property
    def api(self) -> Any:
        """The kubernetes CustomObjectsApi of a KServeClient (in-cluster config, or the given kubeconfig)."""
        if self._client is None:
            from kserve import KServeClient

            if isinstance(self._kubeconfig, dict):
                self._client = KServeClient(config_dict=self._kubeconfig)
            else:
                self._client = KServeClient(config_file=self._kubeconfig)
        return self._client.api_instance

    def build(
        self, task_id: str, version: int, storage_uri: str, *, canary_percent: int | None = None
    ) -> dict[str, Any]:
        """The InferenceService object for a task version."""
        predictor: dict[str, Any] = {
            "minReplicas": self.min_replicas,
            "maxReplicas": self.max_replicas,
            "model": {
                "modelFormat": {"name": MODEL_FORMAT},
                "runtime": self.runtime,
                "storageUri": storage_uri,
                "protocolVersion": "v1",
            },
        }
        if self.service_account:
            # Carries the S3 credentials KServe's storage initializer uses to fetch the bundle.
            predictor["serviceAccountName"] = self.service_account
        if canary_percent is not None:
            predictor["canaryTrafficPercent"] = canary_percent
        return {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "InferenceService",
            "metadata": {
                "name": service_name(task_id),
                "namespace": self.namespace,
                "labels": {MANAGED_BY: "taskvision", TASK_LABEL: task_id},
                "annotations": {"taskvision.io/version": str(version)},
            },
            "spec": {"predictor": predictor},
        }

    def _call(self, what: str, method: str, *args: Any, **kwargs: Any) -> Any:
        """One API call; an unreachable API becomes KubernetesUnavailable, API errors stay ApiException."""
        from kubernetes.client.rest import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return getattr(self.api, method)(GROUP, VERSION, self.namespace, PLURAL, *args, **kwargs)
        except ApiException:
            raise
        except (HTTPError, OSError) as exc:
            raise KubernetesUnavailable(f"{what}: the Kubernetes API is unreachable ({exc})") from exc

    def _get(self, name: str) -> dict[str, Any] | None:
        from kubernetes.client.rest import ApiException

        try:
            return dict(self._call(f"get {name}", "get_namespaced_custom_object", name))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise KubernetesUnavailable(f"get {name}: {exc.status} {exc.reason}") from exc

    def deploy(
        self, task_id: str, version: int, storage_uri: str, *, canary_percent: int | None = None
    ) -> None:
        """Create the task's InferenceService, or patch it to serve ``version``."""
        from kubernetes.client.rest import ApiException

        wanted = self.build(task_id, version, storage_uri, canary_percent=canary_percent)
        name = wanted["metadata"]["name"]
        try:
            if self._get(name) is None:
                try:
                    self._call(f"create {name}", "create_namespaced_custom_object", wanted)
                    logger.info("created InferenceService %s (version %d)", name, version)
                    return
                except ApiException as exc:
                    if exc.status != 409:  # 409: created meanwhile by someone else; patch it below
                        raise
            patch = {"metadata": wanted["metadata"], "spec": wanted["spec"]}
            if canary_percent is None:
                # In a merge patch, null removes the key: the previous canary split ends (promotion).
                patch["spec"]["predictor"]["canaryTrafficPercent"] = None
            self._call(f"patch {name}", "patch_namespaced_custom_object", name, patch)
            logger.info(
                "patched InferenceService %s to version %d (canary %s)", name, version, canary_percent
            )
        except ApiException as exc:
            raise KubernetesUnavailable(f"deploy {name}: {exc.status} {exc.reason}: {exc.body}") from exc

    def delete(self, task_id: str) -> None:
        """Delete the task's InferenceService (a missing one is fine)."""
        from kubernetes.client.rest import ApiException

        name = service_name(task_id)
        try:
            self._call(f"delete {name}", "delete_namespaced_custom_object", name)
        except ApiException as exc:
            if exc.status != 404:
                raise KubernetesUnavailable(f"delete {name}: {exc.status} {exc.reason}") from exc

    def managed_task_ids(self) -> set[str]:
        """The tasks that have an InferenceService made by TaskVision in the namespace."""
        from kubernetes.client.rest import ApiException

        try:
            listed = self._call(
                "list", "list_namespaced_custom_object", label_selector=f"{MANAGED_BY}=taskvision"
            )
        except ApiException as exc:
            raise KubernetesUnavailable(f"list: {exc.status} {exc.reason}") from exc
        labels = (item.get("metadata", {}).get("labels") or {} for item in listed.get("items", []))
        return {found[TASK_LABEL] for found in labels if found.get(TASK_LABEL)}

    def endpoint(self, task_id: str) -> Endpoint:
        """Where the task's service answers, and whether KServe reports it Ready."""
        name = service_name(task_id)
        obj = self._get(name)
        status = (obj or {}).get("status") or {}
        conditions = status.get("conditions") or []
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
        # Prefer the in-cluster address; status.url is the external (ingress) one.
        url = ((status.get("address") or {}).get("url")) or status.get("url")
        return Endpoint(url=url, ready=ready and bool(url), model_name=name)
