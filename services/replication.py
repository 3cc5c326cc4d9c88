"""Acknowledging only what a replica holds: the WAIT that guards a job's 202 and a job's terminal write.

Redis replicates asynchronously: a master that is killed loses the writes it had acknowledged but not yet sent
to a replica, and Sentinel then promotes a replica without them. For the two writes a client is told about -
a job's creation (the 202) and its terminal state (after which the worker acks the Celery message) - the
service first waits for `Settings.replicas_to_ack` replicas to confirm them (Redis's `WAIT numreplicas
timeout`).

Why a fence write: WAIT waits for the writes *of the connection it is sent on*, but a submission writes on two
connections (the job store's script, then kombu's LPUSH of the Celery message) and a pooled client may use
another connection again for the WAIT. So the WAIT is pipelined behind one small write of its own (`INCR` of
`FENCE_KEY`) on the same connection: the master appends to its single replication stream in the order it runs
commands, so once a replica holds the fence it holds every write that was answered before the fence was sent,
whichever connection made it.
"""

from __future__ import annotations

from typing import cast

import redis

FENCE_KEY = "dgserve:replication_fence"


class ReplicationTimeout(redis.ConnectionError):
    """Fewer replicas than required confirmed the writes within the timeout: not acknowledged.

    A `redis.ConnectionError`, so every caller treats it as the store being unavailable for now: the API answers
    503 with Retry-After, the worker's store writer retries the write (compare-and-set, so a repeat is refused)
    and the WAIT until it goes through.
    """


def confirm_replicated(client: redis.Redis, replicas: int, timeout_ms: int) -> int:
    """Block until `replicas` replicas hold every write this process saw answered; returns how many confirmed.

    A no-op returning 0 when `replicas` is 0. Raises `ReplicationTimeout` when fewer confirm within
    `timeout_ms` (e.g. during a failover, before the remaining replica follows the new master).
    """
    if replicas <= 0:
        return 0
    pipe = client.pipeline(transaction=False)
    pipe.incr(FENCE_KEY)
    pipe.execute_command("WAIT", replicas, timeout_ms)
    _, confirmed = pipe.execute()
    if int(cast(int, confirmed)) < replicas:
        raise ReplicationTimeout(f"only {confirmed} of {replicas} replica(s) confirmed the write within "
                                 f"{timeout_ms} ms (redis_min_replicas_ack); not acknowledged")
    return int(cast(int, confirmed))
