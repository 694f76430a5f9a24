-- Prepended (after now.lua) to every tierlimit script that reads or moves
-- a rate bucket: GCRA, governor's arithmetic in microseconds, written once.
-- A bucket is a key holding its TAT (theoretical arrival time); t is the
-- emission interval (us), max the burst. An untracked bucket is full.

-- The bucket's TAT, `now` when untracked.
local function gcra_tat(key, now)
  return tonumber(redis.call('GET', key)) or now
end

-- How long until `n` units conform while `reserve` units stay untouched:
-- 0 when they conform now; a whole window when they never could.
local function gcra_wait(tat, now, t, max, n, reserve)
  if n + reserve > max then
    return t * max
  end
  local earliest = tat + t * (n - 1) + reserve * t - t * (max - 1)
  if now < earliest then
    return earliest - now
  end
  return 0
end

-- The TAT after `n` units are taken at `now`.
local function gcra_take(tat, now, t, n)
  return math.max(tat, now) + t * n
end

-- Units that could come at once at `now` (0 while in debt).
local function gcra_capacity(tat, now, t, max)
  return math.floor(math.max(math.min(now + t * max - math.max(tat, now), t * max), 0) / t)
end

-- Stores a TAT; the key expires when the bucket is full again.
local function gcra_store(key, tat, now)
  redis.call('SET', key, string.format('%d', tat), 'PX', string.format('%d', math.ceil((tat - now) / 1000)))
end
