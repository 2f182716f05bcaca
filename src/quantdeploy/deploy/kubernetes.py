"""Kubernetes manifests for serving one checkpoint: with our server, or with vLLM's OpenAI server on the
compressed-tensors export (for models or loads that one GPU, or one machine, cannot hold).

What it owns: turning a checkpoint and a few numbers (replicas, GPUs, image) into a kustomize folder
(Deployment, Service, HorizontalPodAutoscaler, PodDisruptionBudget, kustomization.yaml), written
atomically. What it does not do: build or push images (``deploy/Dockerfile``), create the API-key Secret
(a secret never goes into a file we write: ``kubectl create secret generic NAME-api-key
--from-literal=api-key=...``), or copy the model into the cluster (it is read from a PersistentVolumeClaim
mounted at ``/models``, the checkpoint folder under its own name).

Why these objects and settings:
- probes: ``/health`` answers 503 until the model is loaded (and compiled), and again if the engine dies;
  a startup probe allows the load (up to ``startup_seconds``), then readiness takes the pod out of the
  Service while it is not ready and liveness restarts it if the engine died;
- graceful termination: Kubernetes sends SIGTERM, our server stops admitting and lets requests in flight
  finish until ``--shutdown-deadline``; the grace period is that deadline plus a margin, so the kubelet
  never kills a draining server (vLLM drains on SIGTERM as well);
- autoscaling on the queue, not on CPU: the HPA reads the waiting-requests gauge from ``/metrics`` through
  the custom-metrics API (prometheus-adapter exposes ``quantdeploy_num_requests_waiting``, or vLLM's
  ``vllm:num_requests_waiting`` as ``vllm_num_requests_waiting``), since a GPU server's CPU use says little
  about its backlog;
- a PodDisruptionBudget keeps one replica serving through node drains;
- the container runs as a non-root user with no privileges and a read-only root filesystem (``/tmp``
  is an emptyDir; vLLM also gets a memory-backed ``/dev/shm`` for tensor parallelism).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from quantdeploy.errors import ConfigError
from quantdeploy.formats import checkpoint as ckpt

ENGINES = ("quantdeploy", "vllm")
MARKER = "# rendered by quantdeploy deploy k8s"  # first line of every file: what --overwrite may replace
FILES = ("deployment.yaml", "service.yaml", "hpa.yaml", "pdb.yaml")


@dataclass(frozen=True)
class K8sSettings:
    name: str
    engine: str = "quantdeploy"
    replicas: int = 1
    max_replicas: int = 4
    gpus: int = 0  # per pod; with vLLM, the tensor-parallel size
    image: str | None = None
    model_claim: str | None = None  # PersistentVolumeClaim holding the checkpoint folder
    memory_gib: int | None = None
    cpus: int = 2
    max_batch: int = 16
    shutdown_deadline: int = 30
    startup_seconds: int = 900
    waiting_per_pod: int = 8  # HPA target: requests waiting per pod


def _default_image(engine: str) -> str:
    from quantdeploy import __version__

    return f"quantdeploy:{__version__}" if engine == "quantdeploy" else "vllm/vllm-openai:v0.32.0"


def _check(checkpoint: Path, s: K8sSettings) -> None:
    from quantdeploy.formats.compressed_tensors import is_export

    if s.engine not in ENGINES:
        raise ConfigError(f"unknown engine '{s.engine}'; available: {', '.join(ENGINES)}")
    if not 1 <= s.replicas <= s.max_replicas:
        raise ConfigError(f"--replicas {s.replicas} must be at least 1 and at most --max-replicas {s.max_replicas}")
    if s.gpus < 0 or (s.engine == "quantdeploy" and s.gpus > 1):
        raise ConfigError(f"--gpus {s.gpus}: our server uses one GPU per pod (0 for CPU); for tensor parallelism "
                          "across GPUs use --engine vllm")
    if s.engine == "quantdeploy" and not ckpt.is_checkpoint(checkpoint):
        raise ConfigError(f"{checkpoint} is not a quantdeploy checkpoint; quantize first (quantdeploy quantize)")
    if s.engine == "vllm" and not is_export(checkpoint):
        raise ConfigError(f"{checkpoint} is not a compressed-tensors export, which vLLM loads; run "
                          f"quantdeploy export {checkpoint} --format compressed-tensors -o DIR and deploy DIR")


def _container(checkpoint: Path, s: K8sSettings, memory_gib: int) -> dict[str, Any]:
    model = f"/models/{checkpoint.name}"
    secret = {"valueFrom": {"secretKeyRef": {"name": f"{s.name}-api-key", "key": "api-key"}}}
    if s.engine == "quantdeploy":
        args = ["serve", model, "--host", "0.0.0.0", "--port", "8000", "--max-batch", str(s.max_batch),
                "--shutdown-deadline", str(s.shutdown_deadline)]
        env = [{"name": "QUANTDEPLOY_API_KEY", **secret}]
    else:
        args = ["--model", model, "--served-model-name", s.name, "--port", "8000",
                "--tensor-parallel-size", str(max(s.gpus, 1))]
        env = [{"name": "VLLM_API_KEY", **secret}]
    # caches (compiled kernels, torch.compile) go under HOME: the writable /tmp, the root filesystem is read-only
    env += [{"name": "HF_HUB_OFFLINE", "value": "1"}, {"name": "HOME", "value": "/tmp"}]
    limits: dict[str, Any] = {"memory": f"{memory_gib}Gi"}
    if s.gpus:
        limits["nvidia.com/gpu"] = s.gpus
    probe = {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10, "timeoutSeconds": 5}
    mounts = [{"name": "models", "mountPath": "/models", "readOnly": True}, {"name": "tmp", "mountPath": "/tmp"}]
    if s.engine == "vllm":
        mounts.append({"name": "shm", "mountPath": "/dev/shm"})
    return {
        "name": s.engine, "image": s.image or _default_image(s.engine), "args": args, "env": env,
        "ports": [{"name": "http", "containerPort": 8000}],
        "resources": {"requests": {"cpu": str(s.cpus), "memory": f"{memory_gib}Gi"}, "limits": limits},
        "startupProbe": {**probe, "failureThreshold": math.ceil(s.startup_seconds / 10)},
        "readinessProbe": {**probe, "failureThreshold": 2},
        "livenessProbe": {**probe, "failureThreshold": 3},
        "volumeMounts": mounts,
        "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "allowPrivilegeEscalation": False,
                            "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}},
    }


def render(checkpoint: str | Path, settings: K8sSettings) -> dict[str, dict[str, Any]]:
    """File name -> manifest for serving ``checkpoint`` (see the module docstring)."""
    checkpoint, s = Path(checkpoint), settings
    _check(checkpoint, s)
    size_gib = ckpt.folder_size(checkpoint) / 2**30
    memory_gib = s.memory_gib or max(4, math.ceil(2 * size_gib + 2))  # weights, a copy while loading, runtime
    labels = {"app.kubernetes.io/name": s.engine, "app.kubernetes.io/instance": s.name,
              "app.kubernetes.io/managed-by": "quantdeploy"}
    meta = {"name": s.name, "labels": labels}
    volumes = [{"name": "models", "persistentVolumeClaim": {"claimName": s.model_claim or f"{s.name}-models",
                                                            "readOnly": True}},
               {"name": "tmp", "emptyDir": {}}]
    if s.engine == "vllm":
        volumes.append({"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}})
    pod = {"terminationGracePeriodSeconds": s.shutdown_deadline + 15, "containers": [_container(checkpoint, s, memory_gib)],
           "volumes": volumes, "securityContext": {"fsGroup": 10001}}
    metric = "quantdeploy_num_requests_waiting" if s.engine == "quantdeploy" else "vllm_num_requests_waiting"
    return {
        "deployment.yaml": {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta, "spec": {
            "replicas": s.replicas, "selector": {"matchLabels": labels},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {"metadata": {"labels": labels}, "spec": pod}}},
        "service.yaml": {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": {
            "selector": labels, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}},
        "hpa.yaml": {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": meta, "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": s.name},
            "minReplicas": s.replicas, "maxReplicas": s.max_replicas,
            "metrics": [{"type": "Pods", "pods": {"metric": {"name": metric}, "target": {
                "type": "AverageValue", "averageValue": str(s.waiting_per_pod)}}}]}},
        "pdb.yaml": {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": meta, "spec": {
            "maxUnavailable": 1, "selector": {"matchLabels": labels}}},
    }


class _Dumper(yaml.SafeDumper):
    """Repeated dicts (the labels) written out in full: anchors and aliases are legal YAML that people
    reading a manifest should not have to resolve."""

    def ignore_aliases(self, data: Any) -> bool:  # noqa: ARG002 - yaml's hook
        return True


def dump(doc: dict[str, Any]) -> str:
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False)


def is_rendered(path: Path) -> bool:
    """A folder ``write`` produced (what ``--overwrite`` may replace)."""
    try:
        return (Path(path) / "kustomization.yaml").read_text().startswith(MARKER)
    except OSError:
        return False


def write(checkpoint: str | Path, settings: K8sSettings, out: str | Path, overwrite: bool = False) -> list[str]:
    """Render and write the kustomize folder ``out`` atomically; returns the file names written."""
    manifests = render(checkpoint, settings)
    header = f"{MARKER} for {Path(checkpoint).name} (engine: {settings.engine})\n"
    kustomization = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                     "resources": list(manifests)}

    def fill(folder: Path) -> None:
        for name, doc in [*manifests.items(), ("kustomization.yaml", kustomization)]:
            (folder / name).write_text(header + dump(doc))

    ckpt.write_folder(Path(out), fill, overwrite, is_rendered, "folder rendered by quantdeploy deploy k8s")
    return [*manifests, "kustomization.yaml"]
