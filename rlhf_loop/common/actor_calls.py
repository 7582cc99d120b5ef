"""Waiting on Ray actors: every call has a deadline, and what goes wrong comes back as one line a person can act on.

    results = wait(refs, cfg.rollout.call_timeout_s, "rollout engine 0", "generate", "rollout.call_timeout_s")

A leaf module (it imports nothing of ours but `rlhf_loop.common.errors`; `ray` only inside the functions), so the actor
clients in policy/ and reward/ share it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from rlhf_loop.common.errors import UserError


def placement() -> dict[str, Any]:
    """Where the calling actor runs: Ray node id, node address and process id (recorded in RUN_DIR/placement.json)."""
    import ray

    return {"node_id": ray.get_runtime_context().get_node_id(), "address": ray.util.get_node_ip_address(),
            "pid": os.getpid()}


class ActorTimeout(UserError):
    """An actor did not answer within its role's timeout: hung, or slower than the timeout allows."""


class ActorDied(UserError):
    """An actor's process died (killed, out of memory, a crashed node)."""


class ActorRestarting(ActorDied):
    """An actor that died is being restarted by Ray; calls made meanwhile fail with this."""


def timed_out(role: str, stage: str, timeout_s: float, timeout_key: str) -> ActorTimeout:
    return ActorTimeout(f"the {role} did not answer within {timeout_s:g} s during {stage}; it may be hung. "
                        f"Finished work is kept: raise {timeout_key} if the work is only slow, then "
                        f"`rlhf-loop resume RUN_DIR`")


def wait(refs: Any, timeout_s: float, role: str, stage: str, timeout_key: str) -> Any:
    """`ray.get(refs)` within `timeout_s`. A UserError raised in the actor comes back as itself; a timeout or a dead
    actor becomes one line naming the role, the stage and what to do."""
    import ray

    try:
        return ray.get(refs, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise timed_out(role, stage, timeout_s, timeout_key) from None
    except ray.exceptions.ActorUnavailableError:
        raise ActorRestarting(f"the {role} is restarting during {stage}") from None
    except ray.exceptions.RayActorError as e:
        cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ActorDied(f"the {role} died during {stage} ({cause[:160]}); finished work is kept: "
                        f"`rlhf-loop resume RUN_DIR` continues from the last finished unit") from None
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, UserError):
            raise e.cause from None
        raise


class RankFailed(RuntimeError):
    """One rank of a group failed with an error that is not the user's; the message names the rank."""


def wait_ranks(refs: list[Any], timeout_s: float, role: str, stage: str, timeout_key: str) -> list[Any]:
    """Every rank's result (`refs` in rank order), but the first rank that fails stops the wait at once, named:
    the other ranks of a collective would otherwise wait for it, and the driver with them, until `timeout_s`."""
    import ray

    deadline = time.monotonic() + timeout_s
    rank_of = {ref: rank for rank, ref in enumerate(refs)}
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=max(deadline - time.monotonic(), 0.0))
        if not ready:
            raise timed_out(f"{role} rank {rank_of[pending[0]]}", stage, timeout_s, timeout_key)
        rank = rank_of[ready[0]]
        try:
            wait(ready[0], max(deadline - time.monotonic(), 0.1), f"{role} rank {rank}", stage, timeout_key)
        except UserError as e:
            if f"{role} rank {rank}" in str(e):
                raise
            raise type(e)(f"{role} rank {rank}: {e}") from None
        except ray.exceptions.RayTaskError as e:
            cause = str(e.cause if e.cause is not None else e).strip().splitlines() or [type(e).__name__]
            raise RankFailed(f"{role} rank {rank} failed during {stage}: {cause[-1][:300]}") from e
    return ray.get(list(refs))


def wait_restarted(call: Callable[[], Any], timeout_s: float, role: str, timeout_key: str) -> Any:
    """The result of `call()` (which submits a task to an actor that died) once Ray has restarted the actor."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return wait(call(), max(deadline - time.monotonic(), 0.1), role, "restart", timeout_key)
        except ActorRestarting:
            if time.monotonic() > deadline:
                raise ActorTimeout(f"the {role} was not back within {timeout_s:g} s of its restart") from None
            time.sleep(0.2)


# ---- warm actors (cluster.keep_warm): detached, named, taken again by a later run --------------------------------

# A warm actor answers whether Ray restarted it at once, unless it is still busy with a call of a run whose driver died,
# or hung: after this long it is replaced rather than waited for.
REUSE_CHECK_TIMEOUT_S = 30.0


def detached(name: str | None) -> dict[str, Any]:
    """The Ray options of an actor that outlives the run, under `name` in this namespace; none without a name."""
    return {"name": name, "lifetime": "detached"} if name is not None else {}


def was_restarted() -> bool:
    """Whether Ray restarted the calling actor, after its process died, at least once (called inside the actor)."""
    import ray

    return bool(ray.get_runtime_context().was_current_actor_reconstructed)


def reusable_actor(name: str, timeout_s: float) -> Any | None:
    """The live detached actor `name` of this namespace, for this run to use again: None when there is none. An actor
    that Ray restarted (its budget of restarts, cluster.max_actor_restarts, spent in part: a reused actor starts the
    run with all of it), or that does not say within `timeout_s`, is stopped for good and None returned, so that a new
    one takes its name. The actor has a method `restarted` that calls `was_restarted`."""
    import ray

    try:
        actor = ray.get_actor(name)
    except ValueError:
        return None
    try:
        if not ray.get(actor.restarted.remote(), timeout=timeout_s):
            return actor
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        pass
    ray.kill(actor, no_restart=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:  # the name is free once Ray has marked the actor dead
        try:
            ray.get_actor(name)
        except ValueError:
            break
        time.sleep(0.2)
    return None
