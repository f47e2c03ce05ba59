"""The Lua scripts of the webhook schedule in ``RedisStore``: lease the deliveries due, and
record an attempt. Apart from the queue's scripts (``redis_scripts.py``, whose prelude and
record layout they share) because they touch only finished jobs and the schedule.
"""

from gateway.jobs.redis_scripts import PRELUDE

# KEYS: webhooks. ARGV: tag, now, now + lease, limit, keep_ms (lease + retention: a leased
# delivery is due again when its lease ends, and its record lives a retention past that).
# Returns the hashes of the jobs leased.
DUE = (
    PRELUDE
    + """
local webhooks = KEYS[1]
local limit = tonumber(ARGV[4])
local out = {}
-- Each id met is either leased (its score moves past now) or dropped, so this ends.
while #out < limit do
  local ids = redis.call('ZRANGEBYSCORE', webhooks, '-inf', ARGV[2], 'LIMIT', 0, limit - #out)
  if #ids == 0 then break end
  for _, id in ipairs(ids) do
    local key = jobkey(id)
    if redis.call('HGET', key, 'webhook') == 'pending' then
      redis.call('ZADD', webhooks, ARGV[3], id)
      extend_ttl(key, ARGV[5])
      out[#out + 1] = redis.call('HGETALL', key)
    else
      redis.call('ZREM', webhooks, id)  -- expired, or its schedule ended
    end
  end
end
return out
"""
)

# KEYS: job, webhooks. ARGV: tag, id, delivery (a JSON array), state, next_at ('' for none),
# keep_ms (from now to next_at, plus the retention; '' without next_at).
# Returns the job's hash as stored after, or false when it is gone.
DELIVERED = (
    PRELUDE
    + """
local key, webhooks, id = KEYS[1], KEYS[2], ARGV[2]
if redis.call('EXISTS', key) == 0 then
  redis.call('ZREM', webhooks, id)
  return false
end
local done = redis.call('HGET', key, 'deliveries')
if done then
  done = string.sub(done, 1, -2) .. ',' .. ARGV[3] .. ']'
else
  done = '[' .. ARGV[3] .. ']'
end
redis.call('HSET', key, 'deliveries', done, 'webhook', ARGV[4])
if ARGV[4] == 'pending' then
  -- Without a time the schedule stays as due_deliveries left it: due again when its lease ends.
  if ARGV[5] ~= '' then
    redis.call('ZADD', webhooks, ARGV[5], id)
    -- A schedule may reach past the retention (8 attempts span ~31.6 h by default): the record
    -- and its idempotency key live until a retention after the next attempt.
    extend_ttl(key, ARGV[6])
  end
else
  redis.call('ZREM', webhooks, id)
end
return redis.call('HGETALL', key)
"""
)
