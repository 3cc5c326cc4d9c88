"""Lua scripts of the job store: every status change is one atomic compare-and-set in Redis.

Each script checks the current status, writes the new state and appends the matching event to the
job's stream in the same step, so a stream ends with a terminal event exactly when the record is
terminal, and a finished job is never overwritten. The running set (`dgserve:running:{queue}`, score =
lease expiry) is kept in step by the same scripts: a job is in it exactly while it is `running`.
"""

from services import fair_scripts

# Lua helpers shared by the scripts below (prepended to them). KEYS: job, events, queued-set, running-set.
# forget_active(job_key, job_id): the job no longer counts against its owner's queued-jobs limit
# (`dgserve:active:{owner}`, services/fair_scripts.py); called on every terminal write.
# finish_with_error(keys, job_id, now, result_ttl, events_maxlen, new_status, code, message, event_type), where
# keys = {job, events, queued-set, running-set} (KEYS, or the job START_NEXT picked).
_FINISH_WITH_ERROR = """
local function forget_active(job_key, job_id)
  local owner = redis.call('HGET', job_key, 'owner')
  if not owner or owner == '' then owner = '-' end
  redis.call('ZREM', 'dgserve:active:' .. owner, job_id)
end
local function finish_with_error(keys, job_id, now, result_ttl, maxlen, new_status, code, message, event_type)
  local err = cjson.encode({code = code, message = message})
  redis.call('HSET', keys[1], 'status', new_status, 'finished_at', tostring(now), 'error_code', code,
             'error_message', message, 'expires_at', tostring(now + tonumber(result_ttl)))
  redis.call('ZREM', keys[3], job_id)
  redis.call('ZREM', keys[4], job_id)
  forget_active(keys[1], job_id)
  redis.call('EXPIRE', keys[1], result_ttl)
  redis.call('XADD', keys[2], 'MAXLEN', '~', maxlen, '*', 'type', event_type, 'data', '{"error":' .. err .. '}')
  redis.call('EXPIRE', keys[2], result_ttl)
end
"""

# requeue(job_id, maxlen, event_data, lane_prefix): running -> queued, back in the queued set (score =
# created_at, as at creation) and at the head of its owner's list in the lane `lane_prefix` (the interactive
# lane: a requeued job is already late), out of the running set; the attempts counter is kept.
_REQUEUE = fair_scripts.ENQUEUE_FAIR + """
local function requeue(job_id, maxlen, event_data, lane_prefix)
  redis.call('HSET', KEYS[1], 'status', 'queued')
  redis.call('HDEL', KEYS[1], 'worker_id', 'lease_until')
  redis.call('ZREM', KEYS[4], job_id)
  redis.call('ZADD', KEYS[3], redis.call('HGET', KEYS[1], 'created_at'), job_id)
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, '*', 'type', 'requeued', 'data', event_data)
  local owner = redis.call('HGET', KEYS[1], 'owner')
  enqueue_fair(lane_prefix .. 'key:' .. owner_tag(owner), lane_prefix .. 'ring', lane_prefix .. 'turn',
               owner_tag(owner), job_id, true)
end
"""

# start_attempt(keys, job_id, now, worker_id, attempts, lease_until, maxlen): -> running under a lease of
# `worker_id`, attempt `attempts + 1` counted, `started` event; returns the new attempts count.
_START_ATTEMPT = """
local function start_attempt(keys, job_id, now, worker_id, attempts, lease_until, maxlen)
  attempts = attempts + 1
  redis.call('HSET', keys[1], 'status', 'running', 'started_at', now, 'worker_id', worker_id,
             'attempts', attempts, 'lease_until', lease_until)
  redis.call('ZREM', keys[3], job_id)
  redis.call('ZADD', keys[4], lease_until, job_id)
  redis.call('XADD', keys[2], 'MAXLEN', '~', maxlen, '*', 'type', 'started', 'data',
             cjson.encode({attempt = attempts, worker_id = worker_id}))
  return attempts
end
"""

# KEYS: job, events, queued-set, idempotency key ('' = none), owner's active set, owner's tokens-this-minute
#       counter, owner's list in the job's lane, that lane's ring, that lane's turn counter
# ARGV: job_id, now, record_ttl, stale_before, max_queued (0 = no admission: a batch line), idem_value,
#       events_maxlen, event_data, owner tag, key's max queued jobs (0 = none), key's tokens per minute
#       (0 = none), the job's token cost, deadline_at, then field/value pairs of the new record.
# Returns {outcome, detail}: created | replay | conflict | full | key_queued | key_tpm (detail: tokens used).
CREATE = fair_scripts.ENQUEUE_FAIR + """
if KEYS[4] ~= '' then
  local existing = redis.call('GET', KEYS[4])
  if existing then
    local sep = string.find(existing, '|', 1, true)
    local existing_id = string.sub(existing, 1, sep - 1)
    if string.sub(existing, sep + 1) == string.sub(ARGV[6], string.find(ARGV[6], '|', 1, true) + 1) then
      return {'replay', existing_id}
    end
    return {'conflict', existing_id}
  end
end
-- max_queued 0: a batch line, admitted with its batch; it stays out of the interactive queued set and
-- the owner's limits.
local admit = tonumber(ARGV[5]) > 0
local key_max, tpm, cost = tonumber(ARGV[10]), tonumber(ARGV[11]), tonumber(ARGV[12])
if admit then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[4])
  if redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[5]) then
    return {'full', ''}
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', ARGV[2])  -- entries past their deadline cannot be alive
  if key_max > 0 and redis.call('ZCARD', KEYS[5]) >= key_max then
    return {'key_queued', ''}
  end
  local used = tonumber(redis.call('GET', KEYS[6]) or '0')
  if tpm > 0 and used + cost > tpm then
    return {'key_tpm', tostring(used)}
  end
end
local fields = {}
for i = 14, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('EXPIRE', KEYS[1], ARGV[3])
if admit then
  redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
  redis.call('ZADD', KEYS[5], ARGV[13], ARGV[1])
  redis.call('EXPIRE', KEYS[5], ARGV[3])
  if tpm > 0 then
    redis.call('INCRBY', KEYS[6], cost)
    redis.call('EXPIRE', KEYS[6], 120)
  end
end
enqueue_fair(KEYS[7], KEYS[8], KEYS[9], ARGV[9], ARGV[1], false)
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[7], '*', 'type', 'queued', 'data', ARGV[8])
redis.call('EXPIRE', KEYS[2], ARGV[3])
if KEYS[4] ~= '' then
  redis.call('SET', KEYS[4], ARGV[6], 'EX', ARGV[3])
end
return {'created', ARGV[1]}
"""

# KEYS: job, events, queued-set, running-set
# ARGV: job_id, now, worker_id, max_attempts, lease_until, result_ttl, events_maxlen
# Returns {decision, attempts, previous_status}.
TRY_START = _FINISH_WITH_ERROR + _START_ATTEMPT + """
local state = redis.call('HMGET', KEYS[1], 'status', 'attempts', 'deadline_at', 'worker_id', 'lease_until')
local status = state[1]
if not status then return {'not_found', 0, ''} end
local attempts = tonumber(state[2] or '0')
if status == 'succeeded' or status == 'failed' or status == 'cancelled' or status == 'expired' then
  return {'already_finished', attempts, status}
end
local now = tonumber(ARGV[2])
if status == 'running' and state[4] ~= ARGV[3] and tonumber(state[5] or '0') > now then
  return {'running_elsewhere', attempts, status}
end
if now > tonumber(state[3]) then
  finish_with_error(KEYS, ARGV[1], now, ARGV[6], ARGV[7], 'expired', 'deadline_exceeded',
                    'the job was not finished before its deadline', 'expired')
  return {'expired', attempts, status}
end
if attempts >= tonumber(ARGV[4]) then
  finish_with_error(KEYS, ARGV[1], now, ARGV[6], ARGV[7], 'failed', 'attempts_exhausted', 'the job was started ' ..
                    attempts .. ' times without finishing (worker lost?); giving up', 'failed')
  return {'attempts_exhausted', attempts, status}
end
attempts = start_attempt(KEYS, ARGV[1], ARGV[2], ARGV[3], attempts, ARGV[5], ARGV[7])
if status == 'running' then return {'restarted', attempts, status} end
return {'started', attempts, status}
"""

# KEYS: job, events, queued-set, running-set
# ARGV: job_id, now, allowed statuses (comma-separated, with a trailing comma), new status, result_ttl,
#       events_maxlen, event type, event data, then field/value pairs to set.
# Returns {outcome, status}: ok | not_found | refused (status = the current one).
FINISH = _FINISH_WITH_ERROR + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'not_found', ''} end
if not string.find(ARGV[3], status .. ',', 1, true) then return {'refused', status} end
local fields = {'status', ARGV[4], 'finished_at', ARGV[2],
                'expires_at', tostring(tonumber(ARGV[2]) + tonumber(ARGV[5]))}
for i = 9, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
forget_active(KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], '*', 'type', ARGV[7], 'data', ARGV[8])
redis.call('EXPIRE', KEYS[2], ARGV[5])
return {'ok', ARGV[4]}
"""

# KEYS: job, running-set. ARGV: job_id, lease_until, holder ('' = any), then field/value pairs.
# Writes and renews the lease only while the job is running (and held by `holder` when one is given), so a
# late progress write can neither resurrect an expired or requeued record nor renew another worker's lease.
RENEW_LEASE = """
local state = redis.call('HMGET', KEYS[1], 'status', 'worker_id')
if state[1] ~= 'running' or (ARGV[3] ~= '' and state[2] ~= ARGV[3]) then return 0 end
local fields = {'lease_until', ARGV[2]}
for i = 4, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
return 1
"""

# KEYS: job, events, queued-set, running-set
# ARGV: job_id, now, max_attempts, result_ttl, events_maxlen, reason, interactive lane prefix
# An orphan is a running job whose lease lapsed. Compare-and-set on the lapsed lease: a job whose holder
# renewed it meanwhile is left alone. Returns requeued | alive | expired | attempts_exhausted | gone.
RECLAIM = _FINISH_WITH_ERROR + _REQUEUE + """
local state = redis.call('HMGET', KEYS[1], 'status', 'attempts', 'deadline_at', 'worker_id', 'lease_until')
if state[1] ~= 'running' then
  redis.call('ZREM', KEYS[4], ARGV[1])  -- a stale index entry (the record finished or expired away)
  return 'gone'
end
local now = tonumber(ARGV[2])
local lease_until = tonumber(state[5] or '0')
if lease_until > now then
  redis.call('ZADD', KEYS[4], lease_until, ARGV[1])
  return 'alive'
end
local attempts = tonumber(state[2] or '0')
if now > tonumber(state[3]) then
  finish_with_error(KEYS, ARGV[1], now, ARGV[4], ARGV[5], 'expired', 'deadline_exceeded',
                    'the job was not finished before its deadline (its worker was lost)', 'expired')
  return 'expired'
end
if attempts >= tonumber(ARGV[3]) then
  finish_with_error(KEYS, ARGV[1], now, ARGV[4], ARGV[5], 'failed', 'attempts_exhausted', 'the job was started ' ..
                    attempts .. ' times without finishing (its worker was lost each time); giving up', 'failed')
  return 'attempts_exhausted'
end
requeue(ARGV[1], ARGV[5], cjson.encode({reason = ARGV[6], attempts = attempts, worker_id = state[4] or ''}),
        ARGV[7])
return 'requeued'
"""

# KEYS: job, events, queued-set, running-set. ARGV: job_id, worker_id, events_maxlen, reason, interactive
# lane prefix.
# The lease holder hands its running job back at once. Returns 1, or 0 when the job is not running under
# `worker_id` (finished, requeued or taken over meanwhile).
RELEASE = _REQUEUE + """
local state = redis.call('HMGET', KEYS[1], 'status', 'worker_id', 'attempts')
if state[1] ~= 'running' or state[2] ~= ARGV[2] then return 0 end
requeue(ARGV[1], ARGV[3], cjson.encode({reason = ARGV[4], attempts = tonumber(state[3] or '0'),
                                       worker_id = ARGV[2]}), ARGV[5])
return 1
"""

# KEYS: job, events. ARGV: type, data, maxlen. Appends only to an existing job; the stream lives as
# long as the record.
APPEND_EVENT = """
local ttl = redis.call('PTTL', KEYS[1])
if ttl == -2 then return false end
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'type', ARGV[1], 'data', ARGV[2])
if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
return id
"""

# KEYS: job. Sets the cancel flag of a running job. Returns the status seen.
REQUEST_CANCEL = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return '' end
if status == 'running' then redis.call('HSET', KEYS[1], 'cancel_requested', '1') end
return status
"""

# START_NEXT: the fair pick (services/fair_scripts.py): the next job round-robin across owners of the lanes
# given, started as TRY_START starts a queued job, in one atomic step.
START_NEXT = _FINISH_WITH_ERROR + _START_ATTEMPT + fair_scripts.START_NEXT_BODY
