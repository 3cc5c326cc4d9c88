"""Fair dequeue across API keys: the Redis layout and the Lua of the per-key lanes (docs/architecture.md,
"Tenant fairness").

A *lane* is one queue class of one model queue: `interactive` (`<queue>`) or `batch` (`<queue>.batch`). Per
lane, with `P = dgserve:fair:{queue}:{lane}:`:
- `P key:{owner}` list: the owner's queued job ids in submission order (owner = key hash, `-` for anonymous);
- `P ring` sorted set: the owners with jobs in the lane, scored by their turn; the lowest score goes next;
- `P turn` counter: the next turn number. An owner joins at the tail; after each pick it moves to the tail
  (or leaves, when its list is empty), so owners take turns one job at a time.
Every queued job sits in exactly one owner list (the store's CREATE and requeue scripts put it there); a list
may also hold ids of jobs that were cancelled or expired while queued: the pick skips them.
`dgserve:active:{owner}` sorted set (score = deadline): the owner's unfinished interactive jobs, for the
per-key queued-jobs limit; every terminal write removes the job (`forget_active` in services/job_scripts.py).

The scripts derive the job and owner keys from ids they read (the job a pick pops, the owner a record names):
fine on one Redis server and under Sentinel, not on Redis Cluster (docs/architecture.md says why).
"""

from __future__ import annotations

LANES = ("interactive", "batch")
ANONYMOUS_OWNER = "-"


def lane_prefix(queue_name: str, lane: str) -> str:
    """The key prefix of one lane of a model queue (module docstring)."""
    if lane not in LANES:
        raise ValueError(f"lane must be one of {LANES}, got {lane!r}")
    return f"dgserve:fair:{queue_name}:{lane}:"


def owner_tag(owner: str) -> str:
    """The owner as it appears in lane and limit keys ('' → '-')."""
    return owner or ANONYMOUS_OWNER


def active_key(owner: str) -> str:
    """The owner's unfinished interactive jobs (the per-key queued-jobs limit)."""
    return f"dgserve:active:{owner_tag(owner)}"


# owner_tag(owner) and enqueue_fair(list, ring, turn, owner, job_id, at_head): put the job in its owner's
# list (at the head for a requeued job, which is already late) and the owner in the ring if it is not there.
ENQUEUE_FAIR = """
local function owner_tag(owner)
  if not owner or owner == '' then return '-' end
  return owner
end
local function enqueue_fair(list, ring, turn, owner, job_id, at_head)
  if at_head then redis.call('LPUSH', list, job_id) else redis.call('RPUSH', list, job_id) end
  if not redis.call('ZSCORE', ring, owner) then
    redis.call('ZADD', ring, redis.call('INCR', turn), owner)
  end
end
"""

# KEYS: queued-set, running-set, then per lane to look in (in order): its ring, its turn counter
# ARGV: now, worker_id, max_attempts, lease_until, result_ttl, events_maxlen, max_pops, JSON list of job ids
#       not to start (the caller's jobs still in flight), then one lane prefix per lane
# Pops the next owner's oldest job, round-robin, and starts it (as TRY_START starts a queued job); jobs no
# longer queued are skipped, ones past their deadline or out of attempts are finished as TRY_START would. A job
# not to start goes back to the head of its list and its owner sits this call out (its jobs stay in order).
# Returns {'started', job_id, attempts, record (HGETALL as a flat list)}, {'empty'} when the lanes hold no
# startable job, or {'busy'} after `max_pops` pops without a start (call again).
START_NEXT_BODY = """
local now = tonumber(ARGV[1])
local pops = tonumber(ARGV[7])
local excluded = {}
for _, id in ipairs(cjson.decode(ARGV[8])) do excluded[id] = true end
for lane = 1, #ARGV - 8 do
  local prefix, ring, turn = ARGV[8 + lane], KEYS[1 + 2 * lane], KEYS[2 + 2 * lane]
  local waiting, nwaiting = {}, 0  -- owners whose next job is excluded: they keep their turn
  while true do
    local owner = nil
    for _, candidate in ipairs(redis.call('ZRANGE', ring, 0, nwaiting)) do
      if not waiting[candidate] then owner = candidate; break end
    end
    if not owner then break end
    if pops == 0 then return {'busy'} end
    pops = pops - 1
    local list = prefix .. 'key:' .. owner
    local job_id = redis.call('LPOP', list)
    if job_id and excluded[job_id] then
      redis.call('LPUSH', list, job_id)
      waiting[owner] = true
      nwaiting = nwaiting + 1
    else
      if redis.call('LLEN', list) == 0 then
        redis.call('ZREM', ring, owner)
      else
        redis.call('ZADD', ring, redis.call('INCR', turn), owner)
      end
      if job_id then
        local keys = {'job:' .. job_id, 'job:' .. job_id .. ':events', KEYS[1], KEYS[2]}
        local state = redis.call('HMGET', keys[1], 'status', 'attempts', 'deadline_at')
        local attempts = tonumber(state[2] or '0')
        if state[1] ~= 'queued' then
          -- cancelled, failed or expired while queued, or its record is gone: skip it
        elseif now > tonumber(state[3]) then
          finish_with_error(keys, job_id, now, ARGV[5], ARGV[6], 'expired', 'deadline_exceeded',
                            'the job was not finished before its deadline', 'expired')
        elseif attempts >= tonumber(ARGV[3]) then
          finish_with_error(keys, job_id, now, ARGV[5], ARGV[6], 'failed', 'attempts_exhausted',
                            'the job was started ' .. attempts .. ' times without finishing; giving up', 'failed')
        else
          attempts = start_attempt(keys, job_id, ARGV[1], ARGV[2], attempts, ARGV[4], ARGV[6])
          return {'started', job_id, attempts, redis.call('HGETALL', keys[1])}
        end
      end
    end
  end
end
return {'empty'}
"""
