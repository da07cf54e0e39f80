"""Kubernetes: render the kustomize overlays in k8s/ with `kubectl kustomize` (`medtl k8s render`)."""
