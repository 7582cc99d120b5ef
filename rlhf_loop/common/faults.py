"""Fault injection for the kill-and-resume tests and the chaos soak (scripts/chaos_soak.py): a process SIGKILLs
itself at a named point, exactly as a preempted node or the OOM killer would stop it.

    RLHF_LOOP_KILL_AT=iter_001/pairs            the driver dies right after the unit is recorded
    RLHF_LOOP_KILL_AT=iter_001/pairs:before     ... with the unit's files written, before the manifest records it
    RLHF_LOOP_KILL_AT=iter_001/pairs:manifest   ... in the middle of the manifest write that records it
    RLHF_LOOP_KILL_AT=checkpoint:iter_001/step_000002   a learner rank dies writing that checkpoint
    RLHF_LOOP_KILL_ACTOR=rollout,reward:DIR     the first call of each named actor role dies once (DIR/ROLE marks it);
                                                roles: rollout, episodes, sync (an engine as a weight sync begins),
                                                reward

A leaf module; a no-op unless the variables are set.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

KILL_AT_ENV = "RLHF_LOOP_KILL_AT"
KILL_ACTOR_ENV = "RLHF_LOOP_KILL_ACTOR"


def maybe_kill(point: str) -> None:
    if os.environ.get(KILL_AT_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_kill_actor(role: str) -> None:
    """Kill this actor's process if KILL_ACTOR_ENV names `role` and it has not been killed before (Ray restarts
    it with the same environment, so a marker file makes it once)."""
    setting = os.environ.get(KILL_ACTOR_ENV)
    if not setting:
        return
    roles, _, marker_dir = setting.partition(":")
    marker = Path(marker_dir) / role
    if role in roles.split(",") and not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        os.kill(os.getpid(), signal.SIGKILL)


def fault_env() -> dict[str, str]:
    """The fault-injection variables set in this process, for an actor's runtime_env (Ray's workers otherwise see
    the environment of the process that started the cluster)."""
    return {key: os.environ[key] for key in (KILL_AT_ENV, KILL_ACTOR_ENV) if key in os.environ}
