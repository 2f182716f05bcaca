"""Deployment artifacts rendered from a checkpoint: Kubernetes manifests (``kubernetes.py``). The
container images are built from ``deploy/Dockerfile`` and ``deploy/Dockerfile.cuda`` at the repository
root; nothing here runs a cluster or a container."""
