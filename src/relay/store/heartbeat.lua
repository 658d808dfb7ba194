-- Worker registry and store epoch, one round trip per control-loop pass.
--
-- Registers or renews this worker in the live set (members scored by heartbeat expiry, ms,
-- Redis TIME), forgets workers whose heartbeat lapsed, and reaps their entries from the
-- per-worker hashes (ready work, inspect addresses, producer rules), so a SIGKILLed worker
-- leaves nothing behind (a worker writes them only while live: `worker_entries.lua`). A worker new to the set is announced on the membership channel.
--
-- The store epoch is a value written once into an empty store. Every worker remembers the
-- epoch of its first heartbeat; if a later heartbeat finds another (or none: it writes a new
-- one), the store lost its state under the fleet (a Redis restarted empty, a failover to a
-- replica that lost its data, a FLUSHDB). The first worker to see it records the loss, once,
-- until an operator deletes the record (`ecs-state-relay status --clear-store-lost`).
--
-- KEYS: 1 workers zset, 2 epoch, 3 store-lost record, 4 ready hash, 5 addrs hash,
--       6 producer-rules hash, 7 lost epochs set
-- ARGV: 1 worker id, 2 lease ms, 3 membership channel, 4 the epoch this worker knows ('' on
--       its first heartbeat), 5.. the epochs this worker has seen lost (at most 16)
-- Returns: { live workers (array), current epoch, the store-lost record or '',
--            1 if this heartbeat made the worker live else 0 }
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local epoch = redis.call('GET', KEYS[2])
if not epoch then
  epoch = ARGV[1] .. '@' .. now
  redis.call('SET', KEYS[2], epoch)
end
-- Each lost epoch is recorded once (the set), so a worker that missed the loss (paused, or
-- without a RabbitMQ session) does not raise a cleared alarm again when it comes back. A loss
-- empties the set too: every worker gives back the epochs it has seen lost.
for i = 5, #ARGV do
  redis.call('SADD', KEYS[7], ARGV[i])
end
if ARGV[4] ~= '' and ARGV[4] ~= epoch and redis.call('SADD', KEYS[7], ARGV[4]) == 1 then
  redis.call('SET', KEYS[3], cjson.encode({
    seen_by = ARGV[1], at_ms = now, known_epoch = ARGV[4], found_epoch = epoch
  }), 'NX')
end
local lost = redis.call('GET', KEYS[3]) or ''

redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local joined = redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
if joined == 1 then
  redis.call('PUBLISH', ARGV[3], 'joined')
end
for i = 4, 6 do
  for _, worker in ipairs(redis.call('HKEYS', KEYS[i])) do
    if not redis.call('ZSCORE', KEYS[1], worker) then
      redis.call('HDEL', KEYS[i], worker)
    end
  end
end
return { redis.call('ZRANGE', KEYS[1], 0, -1), epoch, lost, joined }
