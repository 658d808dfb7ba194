-- Removes the head of a task's outbox once it was sent (or dropped), and advances the sent
-- statuses in the same step, so a crash never leaves "removed but not marked" or the reverse.
-- It also records the submission in the key's short history (for `inspect`): in this step,
-- not another round trip; at most 3 entries, one JSON object per line, newest first, in the
-- state hash's `h` field, so it costs no key of its own and expires and is swept with the task.
-- KEYS: 1 lease, 2 outbox, 3 task state hash, 4 pending zset, 5 active zset, 6 recent ids,
--       7 batch, 8 the shard's sequence counter (a write that always replicates)
-- ARGV: 1 owner, 2 token, 3 how the head starts (`{"n":<sequence>,`, see intake.lua),
--       4 ordering key, 5 retention seconds, 6 the history entry (a JSON object; the script
--       adds `"at"`, Redis TIME in ms),
--       7.. pairs of (state field, status index) to advance, never backwards
-- Returns {entries left (-1 when the head is not the expected entry), the new head or false,
-- the state hash as HGETALL}: the sender's next read comes with this step, not after it.
local err = fenced(KEYS[1], ARGV[1], ARGV[2])
if err then return err end

local head = redis.call('LINDEX', KEYS[2], 0)
if not head or string.sub(head, 1, #ARGV[3]) ~= ARGV[3] then
  -- Already removed (a retry whose first try landed): still write something that always
  -- changes the data set, so a WAIT after this script also covers that first try's removal
  -- (replication is one stream).
  redis.call('INCR', KEYS[8])
  return {-1, head, redis.call('HGETALL', KEYS[3])}
end
redis.call('LPOP', KEYS[2])

local t = redis.call('TIME')
local at = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local history = '{"at":' .. at .. ',' .. string.sub(ARGV[6], 2)
local kept = 1
for line in string.gmatch(redis.call('HGET', KEYS[3], 'h') or '', '[^\n]+') do
  if kept == 3 then break end
  history = history .. '\n' .. line
  kept = kept + 1
end
redis.call('HSET', KEYS[3], 'h', history)

for i = 7, #ARGV, 2 do
  local current = tonumber(redis.call('HGET', KEYS[3], ARGV[i]) or '0')
  if tonumber(ARGV[i + 1]) > current then
    redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
  end
end

local left = redis.call('LLEN', KEYS[2])
if left == 0 then
  redis.call('ZREM', KEYS[4], ARGV[4])
end
redis.call('ZADD', KEYS[5], t[1], ARGV[4])
local ttl = tonumber(ARGV[5]) * 2
for i = 2, 3 do
  redis.call('EXPIRE', KEYS[i], ttl)
end
for i = 6, 7 do
  redis.call('EXPIRE', KEYS[i], ttl)
end
return {left, redis.call('LINDEX', KEYS[2], 0), redis.call('HGETALL', KEYS[3])}
