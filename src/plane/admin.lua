-- tierlimit's operator state (the admin API's changes), shared by every
-- instance. KEYS[1]: the state (a hash: one field per change, JSON);
-- KEYS[2]: its version (moved by every write); KEYS[3]: its epoch (chosen
-- anew by every write, so an (epoch, version) pair another instance has
-- seen is never repeated: not by a state that Redis lost and an instance
-- re-created, nor by one Redis went back to, a snapshot restored or a
-- replica that lagged promoted, and then written again). All carry the
-- hash tag {admin}: one Cluster slot.
-- ARGV[1]: 'write', 'load' or 'version'.
-- write: ARGV[2] the deadline (microseconds on Redis's clock), ARGV[3] the
--   channel to publish on, ARGV[4] the new epoch (random), then triples:
--   field, 'set' or 'del', value. After the deadline it changes nothing
--   and returns 'late' (a write whose caller gave up and answered that
--   nothing changed, run late by a paused or stalled server). Else returns
--   'EPOCH VERSION EPOCH VERSION', the stamps before and after it (and
--   publishes the version).
-- load: returns {'EPOCH VERSION', field_1, value_1, ...}.
-- version: returns 'EPOCH VERSION' (an empty epoch and 0 before any write).
local mode = ARGV[1]
if mode == 'write' then
  local tm = redis.call('TIME')
  if tonumber(tm[1]) * 1000000 + tonumber(tm[2]) > tonumber(ARGV[2]) then
    return 'late'
  end
  local before = (redis.call('GET', KEYS[3]) or '') .. ' ' .. (redis.call('GET', KEYS[2]) or '0')
  redis.call('SET', KEYS[3], ARGV[4])
  local i = 5
  while i + 2 <= #ARGV do
    if ARGV[i + 1] == 'set' then
      redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 2])
    else
      redis.call('HDEL', KEYS[1], ARGV[i])
    end
    i = i + 3
  end
  local v = redis.call('INCR', KEYS[2])
  redis.call('PUBLISH', ARGV[3], tostring(v))
  return before .. ' ' .. ARGV[4] .. ' ' .. tostring(v)
end
local stamp = (redis.call('GET', KEYS[3]) or '') .. ' ' .. (redis.call('GET', KEYS[2]) or '0')
if mode == 'version' then
  return stamp
end
local all = redis.call('HGETALL', KEYS[1])
table.insert(all, 1, stamp)
return all
