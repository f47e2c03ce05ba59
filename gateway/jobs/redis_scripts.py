"""The Lua scripts of ``RedisStore``: every change of a job's state is one script, so atomic.

A job is a hash ``<tag>:job:<id>``. Its field ``job`` holds ``Job.dumps()`` as submitted but
with the request body empty (the request's method, path, headers, metadata and the other
fields that never change); the request body sits in a field of its own, ``body`` (raw bytes), so
that the reads that need no body (``renew``, ``page``) skip it with HMGET. The fields that do
change sit beside them as plain hash fields, which the scripts read and write with HGET/HSET:

``status``, ``attempts``, ``started_at``, ``finished_at``, ``cancel`` ("1" once a cancel was
asked of a running job), ``hook`` ("1" when the job has a webhook), ``webhook`` (its state),
``expires_at``, ``entry`` (its stream entry), ``idem`` (its idempotency key's name), ``owner``
(the key's name, for the count below), ``result_status``, ``result_headers`` (JSON),
``result_body`` (raw bytes), ``error_code``, ``error_message``, ``deliveries`` (a JSON array,
appended to).

Each key's jobs not finished yet (queued or running) are counted in the hash
``<tag>:unfinished`` (owner -> count; an owner at zero has no field), for
``max_unfinished_per_key``: incremented by SUBMIT, decremented by ``end_job``, the one step every
end of a job goes through (TAKE's cancelled, expired and dead-lettered jobs, FINISH, CANCEL,
RELEASE's cancelled job); a job RELEASE queues again keeps its count, unfinished still. A
record can also expire unfinished, unseen (no worker reached it for its queue deadline plus the
retention, or none took over a dead worker's run within the retention); its count is then
corrected when its stream entry is met, which names the owner: the entry outlives the record
(a stream has no TTL) and goes only when a worker meets it (TAKE) or its run's finish lets go
of it (FINISH). Both decrement then, exactly once, because a job's entry exists only while the
job has not ended: ``end_job`` deletes it (XDEL; a worker still holding it only acknowledges it
later). A recount instead would walk the owner's index (all its retained jobs, finished ones
too) on every refused submit, and a TTL on the counter would keep a leaked count as long as
the owner kept submitting, and drop real counts of long runs.

Why fields and not one JSON blob decoded with cjson: a script then never decodes or re-encodes
the request body or a result of up to ``max_result_bytes`` (Redis runs one script at a time, and
cjson on a 20 MB string would stall every other client), and nothing round-trips through cjson,
which writes numbers with 14 significant digits and an empty array as ``{}``. Times are stored as
the decimal strings Python sent, never as Lua numbers.

Every key shares the hash tag ``<tag>`` (``{gateway:jobs}``), so all of them are in one Redis
Cluster slot. That is what lets ``take`` and ``due_deliveries`` build job keys from ids they only
learn inside the script (from the stream, from the schedule): Redis requires a script's keys to be
named in KEYS so that Cluster can route it, and a key built inside the script is only safe when it
is in the same slot as those (https://redis.io/docs/latest/develop/interact/programmability/eval-intro/).
The price is that the whole job store lives on one Cluster node: jobs scale with that node, not
with the cluster. The queue cannot be split across slots anyway (one stream, one consumer group).
"""

from __future__ import annotations

# Helpers every script gets. ``tag`` is ARGV[1] in every script.
PRELUDE = """
local tag = ARGV[1]
local function jobkey(id) return tag .. ':job:' .. id end
-- What renew reads of a job: its state without the request body or the result, which a
-- worker renewing every half second never needs (an 8 MiB body took 166 ms a renewal).
local STATE = {'job', 'status', 'attempts', 'started_at', 'finished_at', 'cancel', 'webhook',
  'error_code', 'error_message', 'deliveries'}
-- What a page reads: the state and the result's status and headers, not its body.
local LISTED = {'job', 'status', 'attempts', 'started_at', 'finished_at', 'cancel', 'webhook',
  'error_code', 'error_message', 'deliveries', 'result_status', 'result_headers'}
-- Some fields of a hash, as HGETALL's flat list of those it has.
local function fields(key, names)
  local values = redis.call('HMGET', key, unpack(names))
  local out = {}
  for i, name in ipairs(names) do
    if values[i] then
      out[#out + 1] = name
      out[#out + 1] = values[i]
    end
  end
  return out
end
-- One of owner's jobs ended (or its record went unfinished): one fewer counted.
local function uncount(unfinished, owner)
  if not owner then return end  -- a record stored before owners were counted
  if redis.call('HINCRBY', unfinished, owner, -1) <= 0 then
    redis.call('HDEL', unfinished, owner)
  end
end
local function terminal(status)
  return status == 'completed' or status == 'failed' or status == 'cancelled'
    or status == 'expired'
end
-- A record and its idempotency key live and die together: the key must not outlive the job
-- (a resubmit would get nothing back) nor die before it (a resubmit would make a second job).
local function set_ttl(key, ms)
  redis.call('PEXPIRE', key, ms)
  local idem = redis.call('HGET', key, 'idem')
  if idem and redis.call('GET', idem) == redis.call('HGET', key, 'id') then
    redis.call('PEXPIRE', idem, ms)
  end
end
local function extend_ttl(key, ms)
  if redis.call('PTTL', key) < tonumber(ms) then set_ttl(key, ms) end
end
-- Finish a job that is not finished yet; a webhook is due at once (the record's retention
-- runs from now, its first delivery's time). ``k``: the keys it changes, {stream, queued,
-- webhooks, unfinished}. The job's entry is deleted here (its worker, if any, acknowledges
-- it), so that an entry met later always belongs to a job that has not ended (see above).
local function end_job(key, id, status, now, retention_ms, k, code, message)
  redis.call('HSET', key, 'status', status, 'finished_at', now)
  if code then redis.call('HSET', key, 'error_code', code, 'error_message', message) end
  if redis.call('HGET', key, 'hook') == '1' then
    redis.call('HSET', key, 'webhook', 'pending')
    redis.call('ZADD', k.webhooks, now, id)
  else
    redis.call('HSET', key, 'webhook', 'none')
  end
  redis.call('SREM', k.queued, id)
  local entry = redis.call('HGET', key, 'entry')
  if entry then redis.call('XDEL', k.stream, entry) end
  uncount(k.unfinished, redis.call('HGET', key, 'owner'))
  set_ttl(key, retention_ms)
end
-- A stream entry whose job's record is gone: if the entry still exists, the job never ended
-- (end_job deletes it), so its owner's count still holds it. Call before deleting the entry.
local function vanished(stream, unfinished, entry)
  local found = redis.call('XRANGE', stream, entry, entry)
  if #found == 0 then return end
  local entry_fields = found[1][2]
  for i = 1, #entry_fields, 2 do
    if entry_fields[i] == 'owner' then uncount(unfinished, entry_fields[i + 1]) end
  end
end
"""

# KEYS: job, stream, queued, idempotency key (unused without one), unfinished, index... (the
# owner's, the team's). ARGV: tag, id, Job.dumps() (request body empty), created_at,
# expires_at, ttl_ms, hook, webhook state, with_idem, request body, owner,
# max_unfinished_per_key. Returns {1} when stored, {0, hash} when the idempotency key names a
# retained job, {2} when the owner has max_unfinished_per_key jobs not finished (nothing stored).
SUBMIT = (
    PRELUDE
    + """
local key, stream, queued, idem, unfinished = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local id, owner = ARGV[2], ARGV[11]
if ARGV[9] == '1' then
  local existing = redis.call('GET', idem)
  if existing then
    local found = redis.call('HGETALL', jobkey(existing))
    if #found > 0 then return {0, found} end
  end
end
if redis.call('EXISTS', key) == 1 then return redis.error_reply('ERR job id in use: ' .. id) end
if tonumber(redis.call('HGET', unfinished, owner) or '0') >= tonumber(ARGV[12]) then
  return {2}
end
-- The entry names the owner: the count's last trace of a record that expires unseen.
local entry = redis.call('XADD', stream, '*', 'id', id, 'owner', owner)
redis.call('HSET', key, 'job', ARGV[3], 'body', ARGV[10], 'id', id, 'owner', owner,
  'status', 'queued', 'attempts', '0', 'expires_at', ARGV[5], 'hook', ARGV[7],
  'webhook', ARGV[8], 'entry', entry)
redis.call('PEXPIRE', key, ARGV[6])
if ARGV[9] == '1' then
  redis.call('HSET', key, 'idem', idem)
  redis.call('SET', idem, id, 'PX', ARGV[6])
end
redis.call('SADD', queued, id)
redis.call('HINCRBY', unfinished, owner, 1)
for i = 6, #KEYS do
  redis.call('ZADD', KEYS[i], ARGV[4], id)
  -- An index is only read from the top, so ids whose record expired would pile up at its
  -- bottom: each submit drops up to two of the oldest dead ones (page() drops those it meets).
  for _ = 1, 2 do
    local oldest = redis.call('ZRANGE', KEYS[i], 0, 0)
    if #oldest == 0 or redis.call('EXISTS', jobkey(oldest[1])) == 1 then break end
    redis.call('ZREM', KEYS[i], oldest[1])
  end
end
return {1}
"""
)

# KEYS: stream, queued, webhooks, unfinished. ARGV: tag, group, worker, now, lease_ms,
# max_attempts, retention_ms, keep_ms (a running job's record lives at least lease +
# retention), the expired error's code and message, the dead letter's code and message, mode
# ('lapsed' or 'entry'), in mode 'entry' the entry id and the job id XREADGROUP gave this
# worker (else ''), the cancelled error's code and message, and in mode 'lapsed' the cursor
# to look for lapsed leases from and how many XAUTOCLAIM calls to make at most.
# Returns {cursor} when no job was taken, {cursor, entry, hash} of the job now running; the
# cursor is where the next look for lapsed leases starts ('' in mode 'entry').
TAKE = (
    PRELUDE
    + """
local stream, queued, webhooks, unfinished = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local k = {stream = stream, queued = queued, webhooks = webhooks, unfinished = unfinished}
local group, worker, now = ARGV[2], ARGV[3], ARGV[4]
local lease_ms, max_attempts = ARGV[5], tonumber(ARGV[6])
local retention_ms, keep_ms = ARGV[7], ARGV[8]

local function drop(entry, id)
  redis.call('XACK', stream, group, entry)
  redis.call('XDEL', stream, entry)
  if id then redis.call('SREM', queued, id) end
end

-- The entry was just delivered to (or claimed for) this worker: run its job, or finish the job
-- here when it must not run, and let go of the entry.
local function start(entry, id)
  local key = jobkey(id)
  local status = redis.call('HGET', key, 'status')
  if not status then
    -- Gone (its time ran out unseen): the entry is the last trace of it, for the count.
    vanished(stream, unfinished, entry)
    drop(entry, id)
    return false
  end
  if terminal(status) then
    -- Finished already, by a worker that died before its XACK.
    drop(entry, id)
    return false
  end
  local ending, code, message = nil, nil, nil
  if redis.call('HGET', key, 'cancel') == '1' then
    -- Its worker died after the cancel reached the store.
    ending, code, message = 'cancelled', ARGV[16], ARGV[17]
  elseif status == 'queued'
      and tonumber(now) >= tonumber(redis.call('HGET', key, 'expires_at')) then
    ending, code, message = 'expired', ARGV[9], ARGV[10]
  elseif tonumber(redis.call('HGET', key, 'attempts')) >= max_attempts then
    ending, code, message = 'failed', ARGV[11], ARGV[12]  -- the dead letter
  end
  if ending then
    end_job(key, id, ending, now, retention_ms, k, code, message)
    drop(entry, id)
    return false
  end
  local attempts = tonumber(redis.call('HGET', key, 'attempts')) + 1
  redis.call('HSET', key, 'status', 'in_progress', 'attempts', tostring(attempts),
    'started_at', now)
  redis.call('SREM', queued, id)
  extend_ttl(key, keep_ms)
  return {entry, redis.call('HGETALL', key)}
end

if ARGV[13] == 'entry' then
  local entry = ARGV[14]
  -- Still this worker's? Only if the script ran later than a lease after XREADGROUP gave it the
  -- entry could another worker have claimed it since.
  local pending = redis.call('XPENDING', stream, group, entry, entry, 1)
  if #pending == 0 or pending[1][2] ~= worker then return {''} end
  local taken = start(entry, ARGV[15])
  if taken then return {'', taken[1], taken[2]} end
  return {''}
end

-- Entries whose worker let them idle longer than a lease (it died, or lost Redis): claimed
-- here, in the script, so that a claim and the attempt it counts are one step. XAUTOCLAIM with
-- COUNT 1 looks at up to 10 pending entries per call, oldest first, and claims at most one
-- (https://redis.io/docs/latest/commands/xautoclaim/). The work is bounded: at most ARGV[19]
-- calls, from the cursor where this store's last look stopped, and not past the end of the
-- pending list (the cursor comes back '0-0' there: the next look starts over). Going round the
-- whole list on every take instead cost a take replicas x jobs held. Every entry is still
-- looked at within (pending entries / (10 x ARGV[19])) takes of any one replica.
local cursor = ARGV[18]
for _ = 1, tonumber(ARGV[19]) do
  local reply = redis.call('XAUTOCLAIM', stream, group, worker, lease_ms, cursor, 'COUNT', 1)
  cursor = reply[1]
  for _, item in ipairs(reply[2]) do
    local entry, entry_fields = item[1], item[2]
    if not entry_fields then
      drop(entry, nil)  -- deleted under its reader (Redis 6.2 returns it; 7 drops it itself)
    else
      local taken = start(entry, entry_fields[2])
      if taken then return {cursor, taken[1], taken[2]} end
    end
  end
  if cursor == '0-0' then break end
end
return {cursor}
"""
)

# KEYS: job, stream. ARGV: tag, group, entry, attempts (the claim's), keep_ms.
# Returns the job's STATE fields (no request body, no result), or false when it is gone.
RENEW = (
    PRELUDE
    + """
local key, stream = KEYS[1], KEYS[2]
local group, entry = ARGV[2], ARGV[3]
local status = redis.call('HGET', key, 'status')
if not status then return false end
-- Renew only the current run's lease: a claim whose lease lapsed and whose job another worker
-- took since (more attempts now) must not take the entry back. Its worker sees the job as
-- stored and runs on (at-least-once; finish keeps the first outcome).
if status == 'in_progress'
    and tonumber(redis.call('HGET', key, 'attempts')) == tonumber(ARGV[4]) then
  local pending = redis.call('XPENDING', stream, group, entry, entry, 1)
  if #pending > 0 then
    -- XCLAIM to its own consumer resets the entry's idle time, so XAUTOCLAIM elsewhere leaves
    -- it alone for another lease; JUSTID does not count a delivery. Without this, a run longer
    -- than the lease is claimed twice (taskiq-redis#101).
    redis.call('XCLAIM', stream, group, pending[1][2], 0, entry, 'JUSTID')
  end
  extend_ttl(key, ARGV[5])
end
return fields(key, STATE)
"""
)

# KEYS: job, stream, queued, webhooks, unfinished. ARGV: tag, group, entry, id, attempts (the
# claim's), lease_ms, now, retention_ms, and the cancelled error's code and message.
# Returns 1 when the job went back to the queue (or, its cancel asked, ended), 0 when the claim
# was no longer the current run's, or the job had ended or is gone (nothing changed).
RELEASE = (
    PRELUDE
    + """
local key = KEYS[1]
local k = {stream = KEYS[2], queued = KEYS[3], webhooks = KEYS[4], unfinished = KEYS[5]}
local group, entry, id, attempts = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
if redis.call('HGET', key, 'status') ~= 'in_progress'
    or tonumber(redis.call('HGET', key, 'attempts')) ~= attempts then
  return 0  -- ended, gone, or taken again since its lease lapsed: another run's now
end
-- The entry must still be pending: one no longer in the group's pending list would never be
-- delivered again (XREADGROUP gives only entries never read), so queued it would never run.
local pending = redis.call('XPENDING', k.stream, group, entry, entry, 1)
if #pending == 0 then return 0 end
-- As before the take: this run never began.
redis.call('HSET', key, 'attempts', tostring(attempts - 1))
redis.call('HDEL', key, 'started_at')
if redis.call('HGET', key, 'cancel') == '1' then
  -- Queued again it would only wait for a take to cancel it: end it now, as CANCEL ends a
  -- queued job (end_job deletes the entry; the acknowledgement is this worker's).
  end_job(key, id, 'cancelled', ARGV[7], ARGV[8], k, ARGV[9], ARGV[10])
  redis.call('XACK', k.stream, group, entry)
  return 1
end
-- Queued again. The record's TTL stays: it is at least what the queued job had (a take only
-- extends it), and the unfinished count, the indexes and the idempotency key are the same for a
-- queued job as for a running one.
redis.call('HSET', key, 'status', 'queued')
redis.call('SADD', k.queued, id)
-- The entry stays where it is, pending, with its idle time set to a lease: to XAUTOCLAIM it is
-- a lease that lapsed just now, so the next look for lapsed leases, which every take makes
-- before it reads new entries, claims it (and TAKE counts the attempt of that run). Its place
-- in the queue is kept: it is older than every entry not read yet, and is taken before them.
-- Acknowledging it and adding a new entry instead would wake a replica blocked in XREADGROUP
-- at once, but would put the job behind every job submitted since (and change its entry, the
-- token other steps name). JUSTID: no delivery counted.
redis.call('XCLAIM', k.stream, group, pending[1][2], 0, entry, 'IDLE', ARGV[6], 'JUSTID')
return 1
"""
)

# KEYS: job, stream, queued, webhooks, unfinished. ARGV: tag, group, entry, id, status, now,
# retention_ms, with_result, result status, result headers, result body, with_error, error
# code, message. Returns the job's hash as stored after, or false when it is gone.
FINISH = (
    PRELUDE
    + """
local key, stream, queued, webhooks, unfinished = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local k = {stream = stream, queued = queued, webhooks = webhooks, unfinished = unfinished}
local group, entry, id = ARGV[2], ARGV[3], ARGV[4]
local status = redis.call('HGET', key, 'status')
if status and not terminal(status) then
  if ARGV[8] == '1' then
    redis.call('HSET', key, 'result_status', ARGV[9], 'result_headers', ARGV[10],
      'result_body', ARGV[11])
  end
  local code, message = nil, nil
  if ARGV[12] == '1' then code, message = ARGV[13], ARGV[14] end
  end_job(key, id, ARGV[5], ARGV[6], ARGV[7], k, code, message)
end
-- Gone unfinished (it outlived its retention unrenewed): this entry is its last trace.
if not status then vanished(stream, unfinished, entry) end
-- The entry goes in every case: a second finish (a lapsed worker's) lets go of it too.
redis.call('XACK', stream, group, entry)
redis.call('XDEL', stream, entry)
if not status then return false end
return redis.call('HGETALL', key)
"""
)

# KEYS: job, stream, queued, webhooks, unfinished. ARGV: tag, id, now, retention_ms, and the
# cancelled error's code and message.
# Returns the job's hash as stored after, or false when it is unknown.
CANCEL = (
    PRELUDE
    + """
local key = KEYS[1]
local k = {stream = KEYS[2], queued = KEYS[3], webhooks = KEYS[4], unfinished = KEYS[5]}
local status = redis.call('HGET', key, 'status')
if not status then return false end
if status == 'queued' then
  -- Out of the queue at once (end_job deletes the entry). Had XREADGROUP given the entry to a
  -- worker whose script has not run yet, that script finds the job cancelled and acknowledges
  -- the entry.
  end_job(key, ARGV[2], 'cancelled', ARGV[3], ARGV[4], k, ARGV[5], ARGV[6])
elseif status == 'in_progress' then
  redis.call('HSET', key, 'cancel', '1')
end
return redis.call('HGETALL', key)
"""
)

# KEYS: index. ARGV: tag, after ('' for the newest), count (ids to read), want (records to
# return at most), status ('' for any). Returns false when ``after`` is not in the index, else
# {ended, last, hash...}: whether the index ended within these ids, the last retained id read
# ('' when none: the next batch starts from the same place), and the matching records, newest
# first, their LISTED fields only (no request body, no result body). The filter is a field
# read (HGET status), so a record that does not match is never sent, and the records stop at
# ``want``. Ids whose record expired are dropped from the index as they are met.
PAGE = (
    PRELUDE
    + """
local index = KEYS[1]
local count, want, status = tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local start = 0
if ARGV[2] ~= '' then
  local rank = redis.call('ZREVRANK', index, ARGV[2])
  if not rank then return false end
  start = rank + 1
end
local ids = redis.call('ZREVRANGE', index, start, start + count - 1)
local out = {#ids < count and 1 or 0, ''}
local found = 0
for _, id in ipairs(ids) do
  local key = jobkey(id)
  local current = redis.call('HGET', key, 'status')
  if not current then
    redis.call('ZREM', index, id)
  else
    out[2] = id
    if status == '' or current == status then
      out[#out + 1] = fields(key, LISTED)
      found = found + 1
      if found == want then
        out[1] = 0
        return out
      end
    end
  end
end
return out
"""
)

# KEYS: stream. ARGV: tag, group, idle_ms. Returns how many consumers were removed.
# Redis never removes a consumer itself (XGROUP DELCONSUMER does,
# https://redis.io/docs/latest/commands/xgroup-delconsumer/), and every gateway process is a new
# one (its name has a random part): without this the group keeps one per process ever started.
# Only consumers with no pending entry go, so no lease is lost; one that was merely quiet is
# made again by its next XREADGROUP.
FORGET_CONSUMERS = (
    PRELUDE
    + """
local removed = 0
for _, consumer in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[2])) do
  local info = {}
  for i = 1, #consumer, 2 do info[consumer[i]] = consumer[i + 1] end
  if tonumber(info['pending']) == 0 and tonumber(info['idle']) > tonumber(ARGV[3]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[2], info['name'])
    removed = removed + 1
  end
end
return removed
"""
)
