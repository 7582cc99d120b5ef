"""Ray start-up and device choice: the one place the driver touches Ray directly."""

from __future__ import annotations

import os


def resolve_device(device: str) -> str:
    """`auto` means CUDA when this machine has a GPU, else CPU."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def start_ray(cluster_cfg) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local throwaway cluster needs no token file in $HOME
    ray.init(
        address=cluster_cfg.address,
        num_cpus=cluster_cfg.num_cpus if cluster_cfg.address is None else None,
        include_dashboard=False,
        log_to_driver=True,
        configure_logging=True,
        logging_level="WARNING",
    )


def stop_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
