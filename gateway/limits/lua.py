"""The two Redis scripts, and the argument layout the planner precomputes for them.

Each bucket is a hash ``{v: level, t: time of that level in ms}``; a missing hash is a full
bucket, so a key expires exactly when its bucket would be full again. The clock is Redis' own
``TIME``: the gateways' clocks never meet the state, so their skew cannot move a bucket. Both
scripts only touch the keys they are given, and the planner puts all of one request's keys in
one hash slot, so they run unchanged on Redis Cluster.

Commands are built as ``EVALSHA <sha> <n> <keys...> <static args...> <per-call arg>``: everything
but the last argument is fixed per bucket set, so the planner builds the tuple once and an
admission adds one integer to it.

**Waiting for capacity** (``limits.max_wait``) is GCRA's virtual scheduling, the Generic Cell Rate
Algorithm of ITU-T Recommendation I.371 (described for rate limiting at
https://brandur.org/rate-limiting): a bucket's state is equivalent to a theoretical arrival time,
and a request that is short may be given a slot in the future instead of a refusal. Here that is
the same token bucket let into debt: when the time to refill the request's deficit (the retry
time the script computes anyway) is at most the request's max wait, every bucket is debited now
(levels go negative) and the reply says "admitted after N ms". The bucket's level then returns
to zero exactly at the request's slot, and the next request sees a deeper debt and gets the next
slot: first come, first served in the order the scripts ran, exact across replicas, in one round
trip, with no one polling Redis. A bucket's debt is at most ``max_wait x rate`` by construction.
A request that leaves before its slot gives it back (``GIVE_BACK``) only where no later request
was scheduled behind it: a slot already promised to someone cannot be handed out twice.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.accounting.ledger import Entry
    from gateway.limits.buckets import Bucket

# How long a bucket that never refills keeps its state (rate 0 with a burst: a quota).
NEVER_TTL_MS = 86_400_000

# Shared by both scripts: Redis' clock, a bucket's level now (refilled since its time, at most
# its capacity; a missing hash is a full bucket), and storing a level with the expiry at which
# the bucket is full again.
_BUCKETS = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + tonumber(clock[2]) / 1000
local stamp = string.format('%.3f', now)
local function level(key, cap, rate)
  local s = redis.call('HMGET', key, 'v', 't')
  if not s[1] then return cap, s end
  local elapsed = now - tonumber(s[2])
  if elapsed < 0 then elapsed = 0 end
  return math.min(cap, tonumber(s[1]) + elapsed * rate), s
end
local function store(key, cap, rate, v)
  local ttl = NEVER_TTL_MS
  if rate > 0 then ttl = math.ceil((cap - v) / rate) end
  local text = tostring(v)
  redis.call('HSET', key, 'v', text, 't', stamp)
  redis.call('PEXPIRE', key, ttl)
  return text
end
""".replace("NEVER_TTL_MS", str(NEVER_TTL_MS))

# ARGV: per bucket i (1-based): capacity, refill per ms, '1' when it counts tokens (cost
# ARGV[last]) or '0' when it counts requests (cost 1); then the most the request may wait, in
# ms (0: not at all); ARGV[#ARGV] is the request's tokens.
# Reply: {allowed 0/1, retry after ms (-1: waiting cannot help; admitted: the wait for its slot,
# 0 for none), index of the refusing bucket (0: none; admitted after a wait: its ticket), then
# per bucket: remaining (floor, after the debit when admitted), ms until full (-1: never)}.
# The ticket, for GIVE_BACK, is the debit's time as stored, then per bucket the level it stored
# ('-': none), space-separated: a bucket still holding both was written by no one since.
ADMIT = (
    _BUCKETS
    + """
local n = #KEYS
local max_wait = tonumber(ARGV[3 * n + 1])
local tokens = tonumber(ARGV[3 * n + 2])
local levels, cost = {}, {}
local retry, limiting = 0, 0
for i = 1, n do
  local cap, rate = tonumber(ARGV[3 * i - 2]), tonumber(ARGV[3 * i - 1])
  local c = 1
  if ARGV[3 * i] == '1' then c = tokens end
  local v = level(KEYS[i], cap, rate)
  levels[i], cost[i] = v, c
  if c > 0 and v < c then
    if c > cap or rate <= 0 then
      retry, limiting = -1, i
    elseif retry >= 0 then
      local wait = (c - v) / rate
      if wait > retry then retry, limiting = wait, i end
    end
  end
end
local out = {1, 0, limiting}
local ticket = false
if limiting > 0 then
  if retry > 0 and retry <= max_wait then
    -- Debit now, serve later: the slot is when the deepest debt is paid back (GCRA).
    out[2], out[3], limiting, ticket = math.ceil(retry), 0, 0, stamp
  else
    out[1] = 0
    if retry > 0 then out[2] = math.ceil(retry) else out[2] = retry end
  end
end
for i = 1, n do
  local cap, rate = tonumber(ARGV[3 * i - 2]), tonumber(ARGV[3 * i - 1])
  local v = levels[i]
  if limiting == 0 and cost[i] > 0 then
    v = v - cost[i]
    local text = store(KEYS[i], cap, rate, v)
    if ticket then ticket = ticket .. ' ' .. text end
  elseif ticket then
    ticket = ticket .. ' -'
  end
  out[2 + 2 * i] = math.floor(v)
  if v >= cap then
    out[3 + 2 * i] = 0
  elseif rate > 0 then
    out[3 + 2 * i] = math.ceil((cap - v) / rate)
  else
    out[3 + 2 * i] = -1
  end
end
if ticket then out[3] = ticket end
return out
"""
)

# Settles a finished request in one call (docs/design.md §3 "Limits", gateway/accounting/ledger.py):
# its token buckets' correction, its usage counters and its budget correction, any of them empty.
# KEYS: the token buckets (n), the usage hashes (u), the spend counters (s).
# ARGV[1] = n; per bucket i: capacity ARGV[2i], refill per ms ARGV[2i+1]; ARGV[2n+2] the tokens
# correction: positive debits more (the bucket may go negative: overuse is paid back by
# waiting), negative refunds (never above capacity). Then u and s; each usage hash's expiry
# (ms); the spend correction (micro-dollars); each spend counter's expiry; and last the
# (field, increment) pairs added to every usage hash.
SETTLE = (
    _BUCKETS
    + """
local n = tonumber(ARGV[1])
local delta = tonumber(ARGV[2 * n + 2])
if delta ~= 0 then
  for i = 1, n do
    local cap, rate = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
    local v = math.min(cap, level(KEYS[i], cap, rate) - delta)
    if v >= cap then
      redis.call('DEL', KEYS[i])
    else
      store(KEYS[i], cap, rate, v)
    end
  end
end
local base = 2 * n + 3
local u, s = tonumber(ARGV[base]), tonumber(ARGV[base + 1])
local fields = base + u + s + 3
for j = 1, u do
  local key = KEYS[n + j]
  for f = fields, #ARGV, 2 do
    redis.call('HINCRBY', key, ARGV[f], ARGV[f + 1])
  end
  redis.call('PEXPIRE', key, ARGV[base + 1 + j])
end
local spend = ARGV[base + u + 2]
if tonumber(spend) ~= 0 then
  for k = 1, s do
    local key = KEYS[n + u + k]
    redis.call('INCRBY', key, spend)
    redis.call('PEXPIRE', key, ARGV[base + u + 2 + k])
  end
end
return n
"""
)

# Reserves a request's estimated cost on every budget that applies to it, or on none
# (gateway/accounting/budgets.py). KEYS: the spend counters, one per budget and period.
# ARGV: per counter i: its limit ARGV[2i-1] and expiry ARGV[2i] (ms); ARGV[#ARGV] the
# reservation (micro-dollars). A counter refuses when it is spent (at or past its limit) or the
# reservation would take it past its limit. Reply: {1 when every counter took the reservation,
# else 0 and nothing was written; then per counter what it holds (after the reservation when
# taken)}.
SPEND = """
local n = #KEYS
local reserve = tonumber(ARGV[2 * n + 1])
local spent = {}
local ok = 1
for i = 1, n do
  local v = tonumber(redis.call('GET', KEYS[i]) or '0')
  local limit = tonumber(ARGV[2 * i - 1])
  if v >= limit or v + reserve > limit then ok = 0 end
  spent[i] = v
end
local out = {ok}
for i = 1, n do
  if ok == 1 and reserve ~= 0 then
    spent[i] = redis.call('INCRBY', KEYS[i], reserve)
    redis.call('PEXPIRE', KEYS[i], ARGV[2 * i])
  end
  out[1 + i] = spent[i]
end
return out
"""

# ARGV: per bucket i: capacity, refill per ms. Reply: each bucket's level now, as a string (Lua
# numbers become integers in replies), nothing debited. For the admin API, not the hot path.
PEEK = (
    _BUCKETS
    + """
local out = {}
for i = 1, #KEYS do
  out[i] = tostring((level(KEYS[i], tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i]))))
end
return out
"""
)

# A request admitted after a wait left before its slot: give its debits back. ARGV: as ADMIT's
# per bucket, then the ticket ADMIT replied, then the request's tokens. A bucket gets its cost
# back (never above capacity) when nothing wrote it since the request did (it is the last one
# scheduled: the next request simply takes its slot), or when no one is scheduled on it at all
# (level >= 0). Otherwise a later request already holds the slot after this one, and handing
# this one out again would schedule two requests in one slot: the debit stands. Reply: per
# bucket, 1 if given back.
GIVE_BACK = (
    _BUCKETS
    + """
local n = #KEYS
local tokens = tonumber(ARGV[3 * n + 2])
local ticket = {}
for part in string.gmatch(ARGV[3 * n + 1], '%S+') do ticket[#ticket + 1] = part end
local out = {}
for i = 1, n do
  local cap, rate = tonumber(ARGV[3 * i - 2]), tonumber(ARGV[3 * i - 1])
  local c = 1
  if ARGV[3 * i] == '1' then c = tokens end
  local debited = ticket[i + 1]
  out[i] = 0
  if c > 0 and debited and debited ~= '-' then
    local v, s = level(KEYS[i], cap, rate)
    if v >= 0 or (s[1] == debited and s[2] == ticket[1]) then
      v = math.min(cap, v + c)
      if v >= cap then
        redis.call('DEL', KEYS[i])
      else
        store(KEYS[i], cap, rate, v)
      end
      out[i] = 1
    end
  end
end
return out
"""
)

ADMIT_SHA = hashlib.sha1(ADMIT.encode()).hexdigest()  # noqa: S324 (Redis names scripts by SHA-1)
SETTLE_SHA = hashlib.sha1(SETTLE.encode()).hexdigest()  # noqa: S324
GIVE_BACK_SHA = hashlib.sha1(GIVE_BACK.encode()).hexdigest()  # noqa: S324
SPEND_SHA = hashlib.sha1(SPEND.encode()).hexdigest()  # noqa: S324
_SCRIPTS = {ADMIT_SHA: ADMIT, SETTLE_SHA: SETTLE, GIVE_BACK_SHA: GIVE_BACK, SPEND_SHA: SPEND}


def _rate(bucket: Bucket) -> str:
    return repr(bucket.per_second / 1000.0)


def admit_command(buckets: Sequence[Bucket], max_wait_ms: int = 0) -> tuple[str, ...]:
    """``EVALSHA`` and its arguments for these buckets, except the request's tokens. A request
    short of capacity may wait up to ``max_wait_ms`` for it."""
    return (*_bucket_args(ADMIT_SHA, buckets), str(max_wait_ms))


def give_back_command(buckets: Sequence[Bucket], ticket: str | bytes) -> tuple[str | bytes, ...]:
    """``EVALSHA`` of ``GIVE_BACK`` for an admission's ticket, except the request's tokens."""
    return (*_bucket_args(GIVE_BACK_SHA, buckets), ticket)


def _bucket_args(sha: str, buckets: Sequence[Bucket]) -> list[str]:
    args: list[str] = ["EVALSHA", sha, str(len(buckets))]
    args += [b.key for b in buckets]
    for b in buckets:
        args += [str(b.capacity), _rate(b), "1" if b.kind == "tokens" else "0"]
    return args


def settle_command(buckets: Sequence[Bucket]) -> tuple[str, ...]:
    """``EVALSHA`` of ``SETTLE`` for the token buckets among these, without the correction and
    what follows it (``settle_call``); empty when there are none."""
    token_buckets = [b for b in buckets if b.kind == "tokens"]
    if not token_buckets:
        return ()
    args: list[str] = ["EVALSHA", SETTLE_SHA, str(len(token_buckets))]
    args += [b.key for b in token_buckets]
    args.append(str(len(token_buckets)))
    for b in token_buckets:
        args += [str(b.capacity), _rate(b)]
    return tuple(args)


def settle_call(
    command: tuple[str, ...], tokens: int, entry: Entry | None, spend: int = 0
) -> tuple[str, ...]:
    """The whole ``SETTLE`` call: ``command`` (a ``settle_command``, or ``()`` for no buckets)
    corrected by ``tokens``, with ``entry``'s usage counters and ``spend`` added to its spend
    counters."""
    if command:
        n = int(command[2])
        keys = command[3 : 3 + n]
        bucket_args = command[3 + n :]
    else:
        n, keys, bucket_args = 0, (), ("0",)
    if entry is None:
        return ("EVALSHA", SETTLE_SHA, str(n), *keys, *bucket_args, str(tokens), "0", "0", "0")
    usage, counters = entry.usage_keys, entry.spend_keys
    fields = [part for name, amount in entry.fields for part in (name, str(amount))]
    return (
        "EVALSHA",
        SETTLE_SHA,
        str(n + len(usage) + len(counters)),
        *keys,
        *usage,
        *counters,
        *bucket_args,
        str(tokens),
        str(len(usage)),
        str(len(counters)),
        *entry.usage_ttls,
        str(spend),
        *entry.spend_ttls,
        *fields,
    )


def spend_command(keys: Sequence[str], limits: Sequence[int], ttls: Sequence[str]) -> list[str]:
    """``EVALSHA`` of ``SPEND`` for these counters, except the reservation."""
    args: list[str] = ["EVALSHA", SPEND_SHA, str(len(keys)), *keys]
    for limit, ttl in zip(limits, ttls, strict=True):
        args += [str(limit), ttl]
    return args


def peek_command(buckets: Sequence[Bucket]) -> tuple[str, ...]:
    """``EVAL`` of the level-reading script for these buckets."""
    args: list[str] = ["EVAL", PEEK, str(len(buckets))]
    args += [b.key for b in buckets]
    for b in buckets:
        args += [str(b.capacity), _rate(b)]
    return tuple(args)


def as_eval(command: tuple[str | bytes, ...]) -> tuple[str | bytes, ...]:
    """The same command as ``EVAL`` with the script's text, for when Redis lost the script
    (restart, ``SCRIPT FLUSH``, a failover) or a proxy in front of it refuses ``EVALSHA``."""
    sha = command[1]
    assert isinstance(sha, str)
    return ("EVAL", _SCRIPTS[sha], *command[2:])
