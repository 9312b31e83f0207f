"""Every Lua script openrtc runs in Redis, and the one way they are loaded.

Each script is one atomic step of the delivery protocol (docs/delivery.md):
what it reads and writes is said above it as ``KEYS`` and ``ARGV``. The
scripts are registered on a client by :func:`register` (redis-py ``Script``
objects: ``EVALSHA``, loading the script again when Redis lost its cache);
the enqueue pipeline alone sends ``EVALSHA`` itself, by the same object's sha,
to keep one round trip per batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import msgpack
from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from openrtc.wire.messages import QUEUED_AT_FIELD, RecordField, RecordState

# The job record's field names and states, composed into the scripts' Lua.
_R: Final = RecordField
_S: Final = RecordState

__all__ = ["Scripts", "register"]

# KEYS: marker, dead-letter stream. ARGV: marker ttl (s), maxlen, then the
# letter's field/value pairs. Adds the letter unless the marker says it was
# added already: a retried write (the reply lost, the ack after it failed)
# leaves one letter, never two, and never none.
DEAD_LETTER_ONCE: Final = """
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) == false then
  return false
end
return redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 3))
"""

# KEYS: marker, reports stream. ARGV: marker ttl (s), maxlen, max age (ms), then
# the report's field/value pairs. Adds the call's report unless its marker says
# it was added already (a retried write, two workers both believing they ended
# the call): one report per call. Trimmed by count and by age (Redis's clock).
ADD_REPORT: Final = """
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) == false then
  return false
end
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 4))
local t = redis.call('TIME')
local oldest = t[1] * 1000 + math.floor(t[2] / 1000) - tonumber(ARGV[3])
if oldest > 0 then
  redis.call('XTRIM', KEYS[2], 'MINID', '~', string.format('%d', oldest))
end
return id
"""

#: A fragment that sets ``now`` to Redis's clock in unix ms, for ``QUEUED_AT_FIELD``.
STAMP_NOW: Final = """
local t = redis.call('TIME')
local now = tostring(t[1] * 1000 + math.floor(t[2] / 1000))
"""

#: A fragment defining ``pending_on(stream, group, id, consumer)``: the entry's
#: pending-list row (id, consumer, idle ms, deliveries) while it is pending on
#: ``consumer``, else false. The fence of every step only an entry's holder may
#: take: a worker whose call went to another (a lapsed lease, a handover, a
#: write-back) does nothing.
PENDING_ON: Final = """
local function pending_on(stream, group, id, consumer)
  local p = redis.call('XPENDING', stream, group, id, id, 1)
  if p[1] and p[1][2] == consumer then return p[1] end
  return false
end
"""

# KEYS: job record hash, job stream. ARGV: record ttl (s), dispatcher id,
# the entry's field/value pairs as one MessagePack array of raw strings
# (:func:`pack_fields`): one argument instead of ~34 makes redis-py's command
# packing, the largest cost of a dispatcher's job, five times cheaper; the
# job's tenant (for its record).
# Returns {1, id} when added, {0, id} when the job was already enqueued.
# No MAXLEN: trimming would cut the oldest entries, running calls included.

ENQUEUE: Final = f"""
local existing = redis.call('HGET', KEYS[1], '{_R.ENTRY}')
if existing then
  return {{0, existing}}
end
{STAMP_NOW}
local fields = cmsgpack.unpack(ARGV[3])
local id = redis.call('XADD', KEYS[2], '*', '{QUEUED_AT_FIELD}', now, unpack(fields))
redis.call('HSET', KEYS[1], '{_R.ENTRY}', id, '{_R.STATE}', '{_S.QUEUED}',
  '{_R.DISPATCHER}', ARGV[2], '{_R.TENANT}', ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[1])
return {{1, id}}
"""


# KEYS: job stream, then the job record of each entry id (same order).
# ARGV: group, consumer, record ttl (s), then for each entry its id, its
# healthy mark ('' for none) and the delivery count this consumer claimed it
# with (0: unknown).
# Renews this consumer's claim on each entry it still owns (XCLAIM ... JUSTID
# resets the idle time without counting a delivery), and writes the healthy
# mark (a session that lived a lease: RecordField.HEALTHY) on the record of
# each one it owns: the mark rides the renewal that runs anyway, never a round
# trip of its own. Returns {lost, forgotten}:
# - lost: another worker owns the entry now, or its record says the job moved
#   on (another worker ran it, or it is done): this worker must step aside.
# - forgotten: Redis lost this worker's read (a restart without persistence
#   or from a snapshot taken before the read, a failover that dropped the last
#   writes): nobody owns the entry and the record does not say it moved on, or
#   another worker read the restored entry as new (delivery 1) and has not
#   started it (the record does not name it: START), or the holder Redis
#   names has it by fewer deliveries than this consumer claimed it with (Redis
#   came back from before this worker's takeover: that holder is the one it
#   took the call from). The call is still ours; the worker writes it back,
#   deleting the stray copy.
RENEW: Final = f"""
local lost, forgotten = {{}}, {{}}
for k = 1, (#ARGV - 3) / 3 do
  local id, mark, record = ARGV[1 + 3 * k], ARGV[2 + 3 * k], KEYS[k + 1]
  local mine = tonumber(ARGV[3 + 3 * k]) or 0
  local ok, p = pcall(redis.call, 'XPENDING', KEYS[1], ARGV[1], id, id, 1)
  local owner = ok and p[1] and p[1][2] or false
  if owner == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id, 'JUSTID')
    if mark ~= '' then
      redis.call('HSET', record, '{_R.HEALTHY}', mark)
      redis.call('EXPIRE', record, ARGV[3])
    end
  else
    local rec = redis.call('HMGET', record, '{_R.WORKER}', '{_R.STATE}')
    if owner then
      if (p[1][4] == 1 and rec[1] ~= owner) or p[1][4] < mine then
        table.insert(forgotten, id)
      else
        table.insert(lost, id)
      end
    elseif (rec[1] and rec[1] ~= ARGV[2]) or rec[2] == '{_S.DONE}' then
      table.insert(lost, id)
    else
      table.insert(forgotten, id)
    end
  end
end
return {{lost, forgotten}}
"""

# KEYS: job stream, job record. ARGV: group, consumer, entry id, record ttl
# (s), '1' if the entry was judged without its record ('' if with it), then
# the record's field/value pairs. The last step before a session joins its
# room: marks the job running on this consumer, only while the entry is
# pending on it. Returns 1 when marked, 0 when the entry is not ours (a live
# worker wrote the call back meanwhile: RENEW): then nobody joins.
# A worker whose read Redis forgot tells a stray reader (record not naming it)
# from a successor (named) by this mark.
# Judged without its record (a first delivery: its record is as the enqueue
# wrote it, unless something happened since), the record is looked at here
# instead of in a round trip of its own: one that is not as enqueued (running
# or done, terminated, a room made anew) is left unmarked, and 2 returned: the
# worker reads it and judges the entry again.
START: Final = f"""
{PENDING_ON}
if not pending_on(KEYS[1], ARGV[1], ARGV[3], ARGV[2]) then return 0 end
if ARGV[5] == '1' then
  local rec = redis.call('HMGET', KEYS[2], '{_R.STATE}', '{_R.TERMINATED}', '{_R.ROOM_SID}')
  if (rec[1] and rec[1] ~= '{_S.QUEUED}') or rec[2] or rec[3] then return 2 end
end
redis.call('HSET', KEYS[2], '{_R.STATE}', '{_S.RUNNING}', '{_R.WORKER}', ARGV[2], unpack(ARGV, 6))
redis.call('EXPIRE', KEYS[2], ARGV[4])
return 1
"""

# KEYS: job stream, job record, the job's checkpoint. ARGV: group, entry id,
# record ttl (s), '1' to delete the checkpoint ('' to keep it).
# The end of a job in one step: its entry acknowledged and deleted (a job
# stream holds only waiting and running calls), its record marked done, and
# (a call that ended here) its checkpoint deleted: nobody resumes an
# acknowledged call. Unfenced, like the XACK and XDEL it replaces: only a
# worker that settled the entry as its own calls it.
FINISH: Final = f"""
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
redis.call('HSET', KEYS[2], '{_R.STATE}', '{_S.DONE}')
redis.call('EXPIRE', KEYS[2], ARGV[3])
if ARGV[4] == '1' then redis.call('DEL', KEYS[3]) end
return 1
"""

# KEYS: job stream, job record. ARGV: group, consumer, entry id. Where an entry
# this worker released for a handover is now: 'present' (waiting, or read by
# a peer), 'moved' (gone, and the record names another worker or says done:
# the peer ran it), or 'forgotten' (gone, and nobody took it over: Redis lost
# it; the releasing worker writes the call back as its own).
RELEASED: Final = f"""
if #redis.call('XRANGE', KEYS[1], ARGV[3], ARGV[3]) > 0 then return 'present' end
local rec = redis.call('HMGET', KEYS[2], '{_R.WORKER}', '{_R.STATE}')
if (rec[1] and rec[1] ~= ARGV[2]) or rec[2] == '{_S.DONE}' then return 'moved' end
return 'forgotten'
"""

# KEYS: job stream, job record. ARGV: group, consumer, record ttl (s), the
# forgotten entry id (or ''), then the entry's field/value pairs. Writes a call
# Redis forgot back as an entry pending on this consumer, so a later crash of
# this worker is still recovered by a peer. The forgotten entry, if Redis still
# has it (restored unread, or read again by a peer that has not started it),
# is deleted first: a job never has two live entries. The new entry must not
# also be delivered as new: the group's last-delivered id is moved onto it,
# and the entries that were waiting behind the old position are re-added after
# it (same fields, same order), so they are still delivered exactly once.
# Returns the new entry id.
WRITE_BACK: Final = f"""
local stream, group, consumer = KEYS[1], ARGV[1], ARGV[2]
redis.pcall('XGROUP', 'CREATE', stream, group, '0', 'MKSTREAM')
if ARGV[4] ~= '' then
  redis.call('XACK', stream, group, ARGV[4])
  redis.call('XDEL', stream, ARGV[4])
end
local last = '0-0'
for _, info in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
  local g = {{}}
  for j = 1, #info, 2 do g[info[j]] = info[j + 1] end
  if g['name'] == group then last = g['last-delivered-id'] end
end
local waiting = redis.call('XRANGE', stream, '(' .. last, '+')
if last == '0-0' then waiting = redis.call('XRANGE', stream, '-', '+') end
local id = redis.call('XADD', stream, '*', unpack(ARGV, 5))
redis.call('XCLAIM', stream, group, consumer, 0, id, 'FORCE', 'JUSTID')
for _, e in ipairs(waiting) do
  redis.call('XADD', stream, '*', unpack(e[2]))
  redis.call('XDEL', stream, e[1])
end
redis.call('XGROUP', 'SETID', stream, group, id)
redis.call('HSET', KEYS[2], '{_R.ENTRY}', id, '{_R.STATE}', '{_S.RUNNING}', '{_R.WORKER}', consumer)
redis.call('EXPIRE', KEYS[2], ARGV[3])
return id
"""

# KEYS: job stream, job record. ARGV: group, consumer, entry id[, field, value].
# Hands an entry this consumer holds back to the stream as a new, waiting entry
# (same fields): a draining worker holds no unstarted job, and a peer reads it
# at once instead of after a lease. With a field (the handover of a running
# call), that field is set on the new entry. Returns the new id, or false when
# the entry is no longer ours.
RELEASE: Final = f"""
{PENDING_ON}
if not pending_on(KEYS[1], ARGV[1], ARGV[3], ARGV[2]) then return false end
local e = redis.call('XRANGE', KEYS[1], ARGV[3], ARGV[3])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
if not e[1] then return false end
local f = e[1][2]
if ARGV[4] then
  local kept = {{}}
  for i = 1, #f, 2 do
    if f[i] ~= ARGV[4] then
      kept[#kept + 1] = f[i]
      kept[#kept + 1] = f[i + 1]
    end
  end
  kept[#kept + 1] = ARGV[4]
  kept[#kept + 1] = ARGV[5]
  f = kept
end
local id = redis.call('XADD', KEYS[1], '*', unpack(f))
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('HSET', KEYS[2], '{_R.ENTRY}', id)
end
return id
"""

# KEYS: job stream. ARGV: group, min idle ms, a consumer to keep (the caller).
# Deletes consumers with nothing pending that have not read for min idle ms:
# checked and deleted in one step, so no entry is ever dropped with them.
FORGET_CONSUMERS: Final = """
local ok, consumers = pcall(redis.call, 'XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
if not ok then return {} end
local removed = {}
for _, c in ipairs(consumers) do
  local f = {}
  for j = 1, #c, 2 do f[c[j]] = c[j + 1] end
  if f['pending'] == 0 and f['idle'] >= tonumber(ARGV[2]) and f['name'] ~= ARGV[3] then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], f['name'])
    table.insert(removed, f['name'])
  end
end
return removed
"""

# KEYS: job stream. ARGV: group, consumer. Deletes the consumer if nothing is
# pending on it. Returns 1 when deleted.
LEAVE_GROUP: Final = """
local ok, p = pcall(redis.call, 'XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if not ok or #p > 0 then return 0 end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
return 1
"""

#: A fragment defining ``claim_counted(stream, group, consumer, min_idle, ids,
#: counts)``, the end of a reclaim pass: claims ``ids`` (idle for ``min_idle``
#: ms) for ``consumer`` and returns {entries, counts} (``counts``: entry id ->
#: its delivery count after this claim), as RECLAIM and CRASHED reply.
CLAIM_COUNTED: Final = """
local function claim_counted(stream, group, consumer, min_idle, ids, counts)
  if #ids == 0 then return {{}, {}} end
  local entries, claimed = {}, {}
  -- Entries deleted from the stream meanwhile are dropped from the pending
  -- list by XCLAIM and not returned.
  for _, e in ipairs(redis.call('XCLAIM', stream, group, consumer, min_idle, unpack(ids))) do
    if e then
      table.insert(entries, e)
      table.insert(claimed, counts[e[1]])
    end
  end
  return {entries, claimed}
end
"""

# KEYS: job stream, the agent's reclaim state (hash: cursor, at).
# ARGV: group, consumer, min idle ms, want (free slots), sweep ms, state ttl ms.
# One reclaim pass: claims at most `want` entries idle for min idle ms, with
# each one's delivery count (after this claim), in one round trip. Returns
# {entries, counts}.
#
# The agent's workers share one sweep of the pending list: it starts at most
# once per sweep ms (the state's `at`), and while it is in progress (`cursor`
# is the last entry a pass took) any worker's next pass resumes after it, up
# to the end of the list. So Redis walks the whole list about once per sweep,
# however many workers reclaim, and a dead worker's entries are found within
# a sweep of becoming reclaimable wherever they sit. (XAUTOCLAIM from 0-0 with
# COUNT = free slots scanned at most COUNT x 10 entries: never past the live
# calls at the head.) Candidates come from XPENDING IDLE, which only reads
# the pending list (~0.1 us an entry; XAUTOCLAIM looks each scanned entry up
# in the stream, ~1.5 us), and exactly those that can be started are claimed.
RECLAIM: Final = (
    CLAIM_COUNTED
    + """
local stream, state = KEYS[1], KEYS[2]
local group, consumer, min_idle, want = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local saved = redis.call('HMGET', state, 'cursor', 'at')
local cursor, at = saved[1] or '0-0', tonumber(saved[2]) or 0
if cursor == '0-0' then
  if now - at < tonumber(ARGV[5]) then return {{}, {}} end
  at = now
end
local start = cursor == '0-0' and '-' or '(' .. cursor
local found = redis.call('XPENDING', stream, group, 'IDLE', min_idle, start, '+', want)
local ids, counts = {}, {}
for i, p in ipairs(found) do
  ids[i] = p[1]
  counts[p[1]] = p[4] + 1
end
if #found < want then cursor = '0-0' else cursor = found[#found][1] end
redis.call('HSET', state, 'cursor', cursor, 'at', at)
redis.call('PEXPIRE', state, ARGV[6])
return claim_counted(stream, group, consumer, min_idle, ids, counts)
"""
)


# KEYS: job stream, the agent's liveness hash (field: worker id -> '0', or the
# Redis ms since which its channel has had no subscriber; '@scan': last scan;
# '@free:<worker id>': its free slots at its last call).
# ARGV: group, consumer (the caller), channel prefix, grace ms, want, scan ms,
# hash ttl ms. Returns {entries, counts} as RECLAIM does.
#
# Crash detection: a watched worker holds a shard-channel subscription
# (SSUBSCRIBE prefix..worker id) on a connection of its own for as long as its
# process lives. A killed process's sockets are closed by its kernel, so Redis
# drops the subscription at once; a frozen or partitioned one keeps it (no FIN
# reaches Redis) and is left to the lease. A worker seen without a subscriber
# is a suspect; one still without after `grace` ms is dead, and its entries
# are claimed at once, whatever their idle time: up to `want`, and this
# caller's share of them by free slots (each caller records its own as
# '@free:<worker>'), so that the calls are spread over the peers. The grace
# rides out a live worker's reconnect (a killed connection, a Redis restart):
# it subscribes again within milliseconds. A caller whose own subscription is
# missing judges nobody: its connections were reset too (Redis restarted,
# failed over), so the others may not have come back yet. Every watched
# worker is looked at once per scan ms, shared by the agent's workers;
# suspects on every call. PUBSUB SHARDNUMSUB is O(1) a channel.
CRASHED: Final = (
    CLAIM_COUNTED
    + """
local stream, alive = KEYS[1], KEYS[2]
local group, me, prefix = ARGV[1], ARGV[2], ARGV[3]
local grace, want = tonumber(ARGV[4]), tonumber(ARGV[5])
local function subscribed(worker)
  return redis.call('PUBSUB', 'SHARDNUMSUB', prefix .. worker)[2] > 0
end
if not subscribed(me) then return {{}, {}} end
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local flat = redis.call('HGETALL', alive)
local scan_at, watched, free = 0, {}, {}
for i = 1, #flat, 2 do
  local f = flat[i]
  if f == '@scan' then
    scan_at = tonumber(flat[i + 1]) or 0
  elseif string.sub(f, 1, 6) == '@free:' then
    free[string.sub(f, 7)] = tonumber(flat[i + 1]) or 0
  elseif f ~= me then
    watched[f] = flat[i + 1]
  end
end
redis.call('HSET', alive, '@free:' .. me, want)
local scan = now - scan_at >= tonumber(ARGV[6])
if scan then redis.call('HSET', alive, '@scan', now) end
local slots = want
for worker, since in pairs(watched) do
  if since == '0' then slots = slots + (free[worker] or 0) end
end
local ids, counts = {}, {}
for worker, since in pairs(watched) do
  if scan or since ~= '0' then
    if subscribed(worker) then
      if since ~= '0' then redis.call('HSET', alive, worker, '0') end
    elseif since == '0' then
      redis.call('HSET', alive, worker, now)
    elseif now - (tonumber(since) or now) >= grace and #ids < want then
      local p = redis.call('XPENDING', stream, group, '-', '+', slots, worker)
      if #p == 0 then redis.call('HDEL', alive, worker, '@free:' .. worker) end
      -- This caller's share, by its free slots among the live workers': the
      -- dead worker's calls are spread (each peer starts a few sessions,
      -- not one peer all of them).
      local share = math.min(want - #ids, math.ceil(#p * want / slots))
      for i = 1, share do
        table.insert(ids, p[i][1])
        counts[p[i][1]] = p[i][4] + 1
      end
    end
  end
end
redis.call('PEXPIRE', alive, ARGV[7])
return claim_counted(stream, group, me, 0, ids, counts)
"""
)

# KEYS: job stream. ARGV: group, consumer, entry id.
# Delivers an entry this consumer holds to it again, counted (XCLAIM without
# JUSTID): a session whose process died is started again at once by its own
# worker, and the delivery limit still stops a call that kills every process.
# Returns {entry, deliveries}, or false when the entry is no longer ours.
REDELIVER: Final = f"""
{PENDING_ON}
local p = pending_on(KEYS[1], ARGV[1], ARGV[3], ARGV[2])
if not p then return false end
local e = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3])
if not e[1] then return false end
return {{e[1], p[4] + 1}}
"""


# KEYS: the dead-letter stream, the job's record hash, the job stream. That is
# one agent's keys plus the dead-letter stream, so it runs on a single Redis
# only: under Redis Cluster a script may touch one slot, and the replay is
# REPLAY_INTO (the agent's slot) followed by an XDEL of the letter.
# ARGV: dead letter id, record ttl (s), dispatcher id, then the job entry's
# field/value pairs.
# Returns {1, new id} when replayed; {0, ""} when the letter is gone (replayed
# or purged by someone else meanwhile); {2, entry} when the job is already
# queued or running as entry (another dead letter of the same job was
# replayed): the letter stays, and no job is enqueued twice.
REPLAY: Final = f"""
if #redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1]) == 0 then
  return {{0, ''}}
end
local live = redis.call('HGET', KEYS[2], '{_R.ENTRY}')
if live and #redis.call('XRANGE', KEYS[3], live, live) > 0 then
  return {{2, live}}
end
redis.call('XDEL', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
{STAMP_NOW}
local id = redis.call('XADD', KEYS[3], '*', '{QUEUED_AT_FIELD}', now, unpack(ARGV, 4))
redis.call('HSET', KEYS[2], '{_R.ENTRY}', id, '{_R.STATE}', '{_S.QUEUED}',
  '{_R.DISPATCHER}', ARGV[3], '{_R.REPLAYED_FROM}', ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return {{1, id}}
"""


# KEYS: the job's record hash, the job stream (one agent's slot).
# ARGV: dead letter id, record ttl (s), dispatcher id, then the job entry's
# field/value pairs. The Redis Cluster half of REPLAY: the caller checked the
# letter exists before, and deletes it after a {1, ...} or {3, ...}. The
# record remembers the letter (``replayed_from``), so a replay retried after
# a crash between the two steps, or run twice at once, enqueues the job once.
# Returns {1, new id} when replayed; {3, id} when this letter was replayed
# already (as id); {2, entry} when the job is queued or running as entry.
REPLAY_INTO: Final = f"""
local rec = redis.call('HMGET', KEYS[1], '{_R.REPLAYED_FROM}', '{_R.ENTRY}')
if rec[1] == ARGV[1] and rec[2] then
  return {{3, rec[2]}}
end
local live = rec[2]
if live and #redis.call('XRANGE', KEYS[2], live, live) > 0 then
  return {{2, live}}
end
redis.call('DEL', KEYS[1])
{STAMP_NOW}
local id = redis.call('XADD', KEYS[2], '*', '{QUEUED_AT_FIELD}', now, unpack(ARGV, 4))
redis.call('HSET', KEYS[1], '{_R.ENTRY}', id, '{_R.STATE}', '{_S.QUEUED}',
  '{_R.DISPATCHER}', ARGV[3], '{_R.REPLAYED_FROM}', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return {{1, id}}
"""


# KEYS: checkpoint key, job stream. ARGV: checkpoint, TTL ms, group, entry id,
# consumer. Writes the checkpoint only while the entry is pending on that
# consumer: a session whose call went to another worker (its lease lapsed in a
# partition, a handover) never overwrites its successor's. Returns 1 if written.
SAVE_CHECKPOINT: Final = f"""
{PENDING_ON}
if not pending_on(KEYS[2], ARGV[3], ARGV[4], ARGV[5]) then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""


# -- membership and the reconciler's lease (registered by their modules) --------

# KEYS: a membership registry (sorted set: member -> expiry, Redis's clock in
# unix s). ARGV: member, ttl ms, keep ms. Scores the member by Redis's clock,
# never the writer's: a host whose clock is behind would be expired at once,
# one ahead kept alive after its death. Members expired more than keep ms ago
# are dropped (crashed processes, with no reader to prune them). Returns
# Redis's time (unix s) as a string (a Lua number would be cut to an integer).
HEARTBEAT: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]) / 1000, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[3]) / 1000)
return string.format('%.6f', now)
"""

# KEYS: any key (it only routes the call). Redis's time (unix s, as a string),
# read on the master serving that key: a bare TIME is keyless, and a Redis
# Cluster client sends it to a default node, which may be a master killed in a
# failover long after the key's slot moved on.
REDIS_TIME: Final = """
local t = redis.call('TIME')
return string.format('%.6f', tonumber(t[1]) + tonumber(t[2]) / 1e6)
"""

# KEYS: a membership registry. Drops the members whose expiry has passed by
# Redis's clock and returns the others.
LIVE_MEMBERS: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""

# KEYS: the lease. ARGV: member, ttl ms. Takes the lease if free, extends it if
# already this member's. Returns 1 when held.
LEASE_HOLD: Final = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

# KEYS: the lease. ARGV: member. Deletes the lease only if this member holds it.
LEASE_RELEASE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


@dataclass(frozen=True, slots=True)
class Scripts:
    """The scripts, registered on one client."""

    enqueue: AsyncScript
    dead_letter_once: AsyncScript
    renew: AsyncScript
    reclaim: AsyncScript
    crashed: AsyncScript
    redeliver: AsyncScript
    write_back: AsyncScript
    start: AsyncScript
    finish: AsyncScript
    release: AsyncScript
    released: AsyncScript
    forget_consumers: AsyncScript
    leave_group: AsyncScript
    replay: AsyncScript
    replay_into: AsyncScript
    add_report: AsyncScript


def pack_fields(fields: Mapping[bytes, bytes]) -> bytes:
    """Entry fields as the one argument :data:`ENQUEUE` unpacks.

    Raw strings, not MessagePack's ``bin`` type: the ``cmsgpack`` built into
    Redis's Lua predates ``bin`` and refuses it.
    """
    flat = [part for pair in fields.items() for part in pair]
    packed: bytes = msgpack.packb(flat, use_bin_type=False)
    return packed


def register(redis: Redis) -> Scripts:
    """Every script as a redis-py ``Script`` on ``redis`` (no round trip)."""
    return Scripts(
        enqueue=redis.register_script(ENQUEUE),
        dead_letter_once=redis.register_script(DEAD_LETTER_ONCE),
        renew=redis.register_script(RENEW),
        reclaim=redis.register_script(RECLAIM),
        crashed=redis.register_script(CRASHED),
        redeliver=redis.register_script(REDELIVER),
        write_back=redis.register_script(WRITE_BACK),
        start=redis.register_script(START),
        finish=redis.register_script(FINISH),
        release=redis.register_script(RELEASE),
        released=redis.register_script(RELEASED),
        forget_consumers=redis.register_script(FORGET_CONSUMERS),
        leave_group=redis.register_script(LEAVE_GROUP),
        replay=redis.register_script(REPLAY),
        replay_into=redis.register_script(REPLAY_INTO),
        add_report=redis.register_script(ADD_REPORT),
    )
