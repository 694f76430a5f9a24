-- Prepended (after now.lua) to the scripts that read or move a calendar
-- counter: a hash of the period's start `s`, its end `e` and the units
-- counted `n` (us), expiring when the period ends. Lua knows no time
-- zones: the layer passes the bounds of the current period and of the
-- next (s, e, ne) with its own time (rnow), and Redis's clock picks.

-- The period a calendar charge counts in, and the time to count it at:
-- the current one while Redis's clock is in it, the next once Redis's
-- clock has passed the current end (the layer's clock may lag Redis's near
-- midnight); when Redis's clock is in neither (off by more than a period,
-- or a test's fake clock), the layer's current period at the layer's time.
local function cal_period(s, e, ne, rnow, now)
  if now >= s and now < e then return s, e, now end
  if now >= e and now < ne then return e, ne, now end
  return s, e, rnow
end

-- The bounds passed for calendar charge number `ci` (from 1), whose
-- bounds start after ARGV[base].
local function cal_bounds(base, ci)
  local b = base + 4 * (ci - 1)
  return tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3]), tonumber(ARGV[b + 4])
end

-- Units counted in the period starting `s` (or in a later one the key
-- already holds), with that period's start and end.
local function cal_used(key, s, e)
  local v = redis.call('HMGET', key, 's', 'e', 'n')
  local ks = tonumber(v[1])
  if ks and ks >= s then
    return tonumber(v[3]) or 0, ks, tonumber(v[2]) or e
  end
  return 0, s, e
end

-- Stores a count at time `t`; the key expires when its period ends.
local function cal_store(key, s, e, n, t)
  redis.call('HSET', key, 's', string.format('%d', s), 'e', string.format('%d', e),
    'n', string.format('%d', n))
  redis.call('PEXPIRE', key, string.format('%d', math.max(1, math.ceil((e - t) / 1000))))
end

-- A calendar count as the scripts answer it: units left, times two, plus
-- 1 when they are of the period after the layer's current one.
local function cal_answer(left, ks, s0)
  local later = 0
  if ks > s0 then later = 1 end
  return math.max(left, 0) * 2 + later
end
