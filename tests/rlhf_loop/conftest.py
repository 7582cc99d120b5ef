"""Fixtures for the driver's tests: plans made offline and as if on a machine without GPUs, and the CLI with the
models and the loop left out."""

import contextlib
import socket

import pytest
import torch


@pytest.fixture
def no_network(monkeypatch):
    """plan must never reach out: every connection attempt is refused and fails the test afterwards (plan catches
    the errors of loading a model's config, so raising alone would not show)."""
    attempts = []

    def refuse(sock, address):
        attempts.append(address)
        raise OSError("no network in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    yield
    assert attempts == []


@pytest.fixture
def no_gpu_here(monkeypatch):
    """Plans are made from a machine without GPUs unless a test says otherwise, so results do not depend on the
    machine the tests run on."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture
def cli_without_ray(tmp_path, monkeypatch):
    """`rlhf-loop run/resume` with Ray and the actors left out: no cluster starts, no actor is launched."""
    from rlhf_loop.cluster import ray_cluster as cluster
    from rlhf_loop.cluster import roles

    monkeypatch.setattr(cluster, "ray_running", lambda cluster_cfg: contextlib.nullcontext(tmp_path / "ray_logs"))
    monkeypatch.setattr(roles, "launch_early", lambda cfg, device: None)


@pytest.fixture
def cli_without_models(tmp_path, monkeypatch, cli_without_ray):
    """`rlhf-loop run/resume` with preflight, Ray and the loop itself stubbed out (the models and data are not what is
    tested): returns a config file and the prompt file it names."""
    from rlhf_loop import loop
    from rlhf_loop.frontend import preflight

    monkeypatch.setattr(preflight, "preflight", lambda cfg: None)
    monkeypatch.setattr(loop, "run", lambda cfg, run_dir, early_actors=None: None)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Name 3 fruits."}\n')
    config = tmp_path / "run.yaml"
    config.write_text(f"policy: {{model_path: p}}\nreward: {{model_path: r}}\ndata: {{prompts: [{prompts}]}}\n")
    return config, prompts
