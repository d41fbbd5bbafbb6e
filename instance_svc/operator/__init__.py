"""The instance operator: CyberdeskInstance resources become KubeVirt VMs (kopf; `python -m instance_svc.operator`).

The names every party uses are in `contract`; docs/kubernetes.md ("Contract") says what they mean.
"""
