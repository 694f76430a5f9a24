-- tierlimit's settlement: charges changed after the fact, in one call for one
-- owner (every key shares its hash tag). Per key, `units` more (a debt) or,
-- when negative, fewer (a refund, at most up to a full bucket).
-- KEYS[i]: the buckets. ARGV[1]: now (us; empty: Redis TIME), then per key:
-- interval (us), max, units.
-- Returns the remaining capacity of each bucket afterwards (0 while in debt).
local now = now_us(ARGV[1])
local out = {}
for i = 1, #KEYS do
  local t = tonumber(ARGV[3 * i - 1])
  local max = tonumber(ARGV[3 * i])
  local units = tonumber(ARGV[3 * i + 1])
  local tat = tonumber(redis.call('GET', KEYS[i]))
  if not tat or tat < now then tat = now end
  local nxt = tat + units * t
  if nxt <= now then
    redis.call('DEL', KEYS[i])
    out[i] = max
  else
    redis.call('SET', KEYS[i], string.format('%d', nxt), 'PX', string.format('%d', math.ceil((nxt - now) / 1000)))
    out[i] = math.floor(math.max(math.min(now + t * max - nxt, t * max), 0) / t)
  end
end
return out
