-- Removes the oldest held letter once the broker confirmed it in the dead-letter queue; only if
-- it is still the one published (a retry whose first try landed removes nothing more).
-- KEYS: 1 lease, 2 held list, 3 held byte count, 4 held letter ids
-- ARGV: 1 owner, 2 token, 3 the held letter as published
-- Returns 1 removed, 0 the head was another letter.
local err = fenced(KEYS[1], ARGV[1], ARGV[2])
if err then return err end

if redis.call('LINDEX', KEYS[2], 0) ~= ARGV[3] then
  return 0
end
redis.call('LPOP', KEYS[2])
redis.call('SREM', KEYS[4], redis.sha1hex(ARGV[3]))
local left = redis.call('DECRBY', KEYS[3], #ARGV[3])
if left <= 0 or redis.call('LLEN', KEYS[2]) == 0 then
  redis.call('DEL', KEYS[3], KEYS[4])
end
return 1
