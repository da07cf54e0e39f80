"""Kubernetes: render the kustomize overlays in k8s/ (`medtl k8s render`) without kustomize."""
