"""policy.deepspeed_policy's start-up helpers that need no DeepSpeed engine."""

import os
import sys

from policy.deepspeed_policy import keep_op_builds_apart


def test_each_environment_gets_its_own_op_build_directory(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # torch's default build root follows it
    keep_op_builds_apart()
    ours = os.environ["TORCH_EXTENSIONS_DIR"]
    assert os.path.basename(ours).startswith("rlhf-loop-")
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    monkeypatch.setattr(sys, "prefix", "/another/venv")
    keep_op_builds_apart()
    assert os.environ["TORCH_EXTENSIONS_DIR"] != ours
    assert os.path.dirname(os.environ["TORCH_EXTENSIONS_DIR"]) == os.path.dirname(ours)


def test_a_set_extensions_directory_wins(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    keep_op_builds_apart()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(tmp_path)
