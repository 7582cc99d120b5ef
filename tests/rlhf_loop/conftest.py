"""Fixtures for planning tests: plans are made offline and as if on a machine without GPUs."""

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
