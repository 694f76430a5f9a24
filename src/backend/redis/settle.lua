-- tierlimit's settlement: charges changed after the fact, in one call for one
-- owner (every key shares its hash tag). Per key, `units` more (a debt) or,
-- when negative, fewer (a refund, at most up to a full bucket; it passes the
-- holes it reaches, free already: gcra_lower).
-- KEYS[i]: the buckets. ARGV[1]: now (us; empty: Redis TIME), then per key:
-- interval (us; 0: a calendar limit), max, units; then per calendar limit,
-- in order, the bounds it was charged with (see calendar.lua). A calendar
-- counter moves only while it is of the charge's period, as the layer saw
-- it (a settlement of a period that has ended, or of a request Redis's
-- clock counted in the next period a moment before the layer's clock
-- reached it, changes nothing); a debt on no counter starts one.
-- A debt counts at most ten bursts (as the layer's meter bounds it): the
-- arithmetic is a double's, and a time past 2^53 us would be stored wrong.
-- Returns the remaining capacity of each bucket afterwards (0 while in debt).
local now = now_us(ARGV[1])
local out = {}
local ci = 0
for i = 1, #KEYS do
  local t = tonumber(ARGV[3 * i - 1])
  local max = tonumber(ARGV[3 * i])
  local units = math.min(tonumber(ARGV[3 * i + 1]), 10 * max)
  if t == 0 then
    ci = ci + 1
    local s0, e0, ne, rnow = cal_bounds(1 + 3 * #KEYS, ci)
    local s, e, at = cal_period(s0, e0, ne, rnow, now)
    local v = redis.call('HMGET', KEYS[i], 'n', 's')
    local ks = tonumber(v[2])
    local n = tonumber(v[1]) or 0
    if ks == s0 then
      n = math.max(0, n + units)
      if n == 0 then
        redis.call('DEL', KEYS[i])
      else
        redis.call('HSET', KEYS[i], 'n', string.format('%d', n))
      end
    elseif not ks and units > 0 and s == s0 then
      n = units
      cal_store(KEYS[i], s, e, n, at)
    end
    out[i] = math.max(0, max - n)
  else
    local tat = math.max(gcra_tat(KEYS[i], now), now)
    local nxt
    if units < 0 then
      -- A refund: counted slots only (the holes it reaches are free).
      nxt = gcra_lower(KEYS[i], tat, -units * t, now)
    elseif units > 0 then
      nxt = tat + units * t
      gcra_store(KEYS[i], nxt, now)
    else
      nxt = tat
    end
    out[i] = gcra_capacity(nxt, now, t, max)
  end
end
return out
