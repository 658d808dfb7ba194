-- A worker's entries in the per-worker hashes (ready work, inspect address, producer rules),
-- written only while the worker is in the live set: the heartbeat reaps every entry of a
-- worker that is not (`heartbeat.lua`), so a worker that is not live (starting, without a
-- RabbitMQ session, paused past its lease) must not write one back, or the two would flap.
-- Its entries return at its first report after its next heartbeat.
-- Also returns the store-lost record, so a worker without heartbeats still follows the alarm
-- (`relay_store_lost`) and its clearing.
-- KEYS: 1 workers zset, 2 store-lost record, 3.. hashes
-- ARGV: 1 worker id, 2.. one value per hash ('' deletes the worker's entry)
-- Returns: the store-lost record or ''
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  for i = 3, #KEYS do
    local value = ARGV[i - 1]
    if value == '' then
      redis.call('HDEL', KEYS[i], ARGV[1])
    else
      redis.call('HSET', KEYS[i], ARGV[1], value)
    end
  end
end
return redis.call('GET', KEYS[2]) or ''
