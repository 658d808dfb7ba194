-- Keeps rejected messages whose dead-letter publish cannot happen now (the dead-letter route is
-- broken, the dead-letter queue is full, the broker blocks publishers), so the shard can ack
-- them and go on with its valid traffic; they are moved to the dead-letter queue later.
-- Bounded by bytes per shard: what does not fit is refused and stays unacknowledged. A letter
-- already held (a retry after a lost reply or a write not confirmed by replicas) is not added
-- again: each letter is unique (it carries its delivery tag and intake time).
-- KEYS: 1 lease, 2 held list, 3 held byte count, 4 the shard's sequence counter (a write that
--       always replicates, so a WAIT after this covers an earlier try too), 5 held letter ids
-- ARGV: 1 owner, 2 token, 3 most bytes held per shard, 4.. encoded held letters in order
-- Returns one code per letter: 1 held, 0 refused (the shard's hold is full).
local err = fenced(KEYS[1], ARGV[1], ARGV[2])
if err then return err end

redis.call('INCR', KEYS[4])
local max = tonumber(ARGV[3])
local used = tonumber(redis.call('GET', KEYS[3]) or '0')
local codes = {}
for i = 4, #ARGV do
  local size = #ARGV[i]
  local id = redis.sha1hex(ARGV[i])
  if redis.call('SISMEMBER', KEYS[5], id) == 1 then
    codes[#codes + 1] = 1
  elseif used + size <= max then
    redis.call('RPUSH', KEYS[2], ARGV[i])
    redis.call('SADD', KEYS[5], id)
    used = used + size
    codes[#codes + 1] = 1
  else
    codes[#codes + 1] = 0
  end
end
redis.call('SET', KEYS[3], used)
return codes
