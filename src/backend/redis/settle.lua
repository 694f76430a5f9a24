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
  local nxt = math.max(gcra_tat(KEYS[i], now), now) + tonumber(ARGV[3 * i + 1]) * t
  if nxt <= now then
    redis.call('DEL', KEYS[i])
    out[i] = max
  else
    gcra_store(KEYS[i], nxt, now)
    out[i] = gcra_capacity(nxt, now, t, max)
  end
end
return out
