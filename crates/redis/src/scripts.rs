//! The Lua scripts. Each runs atomically in Redis, which is what makes numbering,
//! storing and fanning out one step (publish) and a history read consistent with the
//! channel's top offset (history).

/// KEYS: meta hash, stream, idempotency key (or a dummy)[, Redis Cluster: the namespace's
///       wildcard mark in this slot].
/// ARGV: data, history size, history ttl ms, idempotency window ms (0: none),
///       candidate epoch, pub/sub channel, meta ttl seconds[, Redis Cluster: "s", the
///       namespace's wildcard channel, the channel's name].
/// Returns {"ok", epoch, offset} or {"dup", "epoch:offset"}.
///
/// On a Redis Cluster the publication goes out on the channel's shard (`SPUBLISH`), and
/// — while a node's wildcard mark is live — to every node on the namespace's channel.
pub const PUBLISH: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[4])
if window > 0 then
  local prev = redis.call('GET', KEYS[3])
  if prev then return {'dup', prev} end
end
local epoch = redis.call('HGET', KEYS[1], 'e')
if not epoch then
  epoch = ARGV[5]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'e', epoch, 'o', 0)
end
local top = redis.call('HINCRBY', KEYS[1], 'o', 1)
redis.call('EXPIRE', KEYS[1], ARGV[7])
local size = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
if size > 0 and ttl > 0 then
  redis.call('XADD', KEYS[2], 'MAXLEN', size, top .. '-0', 'd', ARGV[1], 't', now, 'x', now + ttl)
  redis.call('PEXPIRE', KEYS[2], ttl)
end
local msg = 'S\n' .. epoch .. '\n' .. top .. '\n' .. now .. '\n' .. ARGV[1]
if ARGV[8] == 's' then
  redis.call('SPUBLISH', ARGV[6], msg)
  if redis.call('ZCOUNT', KEYS[4], now, '+inf') > 0 then
    redis.call('PUBLISH', ARGV[9], ARGV[10] .. '\n' .. msg)
  end
else
  redis.call('PUBLISH', ARGV[6], msg)
end
if window > 0 then
  redis.call('SET', KEYS[3], epoch .. ':' .. top, 'PX', window)
end
return {'ok', epoch, tostring(top)}
"#;

/// KEYS: meta hash, stream.
/// ARGV: since epoch ('' for none), since offset, limit (0: all, -1: none), latest (1/0),
///       candidate epoch, meta ttl seconds.
/// Returns {"lost", epoch, top} or {"ok", epoch, top, offset, time, data, offset, …}.
///
/// Reads only what it returns: expired entries at the stream's head are trimmed first
/// (`XTRIM MINID`; entries expire in offset order while a namespace's TTL stays put), then
/// a resume reads from the entry after `since` (`XRANGE <since+1>-0 + COUNT limit`), the
/// newest `limit` come from `XREVRANGE`. An entry that expired out of order is skipped.
pub const HISTORY: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local epoch = redis.call('HGET', KEYS[1], 'e')
local top
if not epoch then
  epoch = ARGV[5]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'e', epoch, 'o', 0)
  top = 0
else
  top = tonumber(redis.call('HGET', KEYS[1], 'o'))
end
redis.call('EXPIRE', KEYS[1], ARGV[6])
local limit = tonumber(ARGV[3])
if limit < 0 then return {'ok', epoch, tostring(top)} end
local function offset(e) return tonumber(string.match(e[1], '^(%d+)')) end
local function field(e, name)
  for i = 1, #e[2], 2 do if e[2][i] == name then return e[2][i + 1] end end
end
local function live(e) return tonumber(field(e, 'x')) > now end
-- The first live entry; the expired ones before it are trimmed.
local first = top + 1
local count = 1
while true do
  local head = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', count)
  count = 64
  if #head == 0 then break end
  local found = nil
  for _, e in ipairs(head) do
    if live(e) then found = e break end
  end
  if found then
    first = offset(found)
    if found[1] ~= head[1][1] then redis.call('XTRIM', KEYS[2], 'MINID', found[1]) end
    break
  end
  redis.call('XTRIM', KEYS[2], 'MINID', (offset(head[#head]) + 1) .. '-0')
end
local entries
if ARGV[1] ~= '' then
  local since = tonumber(ARGV[2])
  if ARGV[1] ~= epoch or since > top or since + 1 < first then
    return {'lost', epoch, tostring(top)}
  end
  if limit > 0 then
    entries = redis.call('XRANGE', KEYS[2], (since + 1) .. '-0', '+', 'COUNT', limit)
  else
    entries = redis.call('XRANGE', KEYS[2], (since + 1) .. '-0', '+')
  end
elseif limit > 0 and ARGV[4] == '1' then
  local newest = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', limit)
  entries = {}
  for i = #newest, 1, -1 do table.insert(entries, newest[i]) end
elseif limit > 0 then
  entries = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', limit)
else
  entries = redis.call('XRANGE', KEYS[2], '-', '+')
end
local out = {'ok', epoch, tostring(top)}
for _, e in ipairs(entries) do
  if live(e) then
    table.insert(out, tostring(offset(e)))
    table.insert(out, field(e, 't'))
    table.insert(out, field(e, 'd'))
  end
end
return out
"#;

/// KEYS: members hash, expiry zset. ARGV: client, member JSON, ttl ms.
pub const PRESENCE_ADD: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
local longest = tonumber(redis.call('ZREVRANGE', KEYS[2], 0, 0, 'WITHSCORES')[2]) - now
redis.call('PEXPIRE', KEYS[1], longest)
redis.call('PEXPIRE', KEYS[2], longest)
return 1
"#;

/// KEYS: members hash, expiry zset. Drops expired entries, returns the live members.
pub const PRESENCE_MEMBERS: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
for _, c in ipairs(gone) do redis.call('HDEL', KEYS[1], c) end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
return redis.call('HVALS', KEYS[1])
"#;

/// Redis Cluster: a volatile publication (or join, leave) on the channel's shard, and to
/// the namespace's wildcard subscribers while a mark is live.
/// KEYS: the namespace's wildcard mark in the channel's slot.
/// ARGV: shard channel, message, namespace channel, channel name.
pub const VOLATILE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('SPUBLISH', ARGV[1], ARGV[2])
if redis.call('ZCOUNT', KEYS[1], now, '+inf') > 0 then
  redis.call('PUBLISH', ARGV[3], ARGV[4] .. '\n' .. ARGV[2])
end
return 1
"#;
