-- tierlimit's batches: several units of every limit of a check taken in one
-- call, spent by one instance without a round trip, and what it did not
-- spend given back. Every key shares one hash tag (the owner): one call on
-- Redis Cluster too. The arithmetic is the batching core's (see
-- src/backend/batch/mod.rs): a batch's slots start after now + hold, so a
-- unit spent before then is never counted before it was spent.
-- ARGV[1]: 'take' or 'back'; ARGV[2]: now (us; empty: Redis TIME).
-- KEYS[1..k]: the rate buckets; KEYS[k + 1]: the batch's mark (named by
--   its tag: there from the take to the give-back).
-- take: ARGV[3]: requests' worth wanted; ARGV[4]: the hold (us); then
--   per bucket: interval (us), max, cost (the request's units in it).
--   Returns {3, now, then per bucket start, before, remaining, units}
--   with a batch (every bucket at least its cost, all or nothing: the
--   request's own units counted from now, as a check counts them, the
--   others after now + hold; start is where the first would start were
--   they together, and the TAT moves to start + units * interval),
--   marked; else the request is checked as check.lua
--   checks a request without reserve or leases, in the same call: {1,
--   remaining_1, ...} allowed and counted, {0, retry_1, ...} refused.
-- back: per bucket, from ARGV[3]: the batch's end and where its used
--   units end (us). Nothing changes unless the batch's mark is there (it
--   goes with the buckets on FLUSHALL or a restart, and the give-back
--   removes it: a give-back acts once). A bucket whose TAT is still the
--   batch's end goes back to where the used units end; one a refund
--   moved below the batch's end goes down by the unused units still
--   ahead (gcra_lower); below other
--   units, the unused slots become one of the bucket's holes (gcra.lua),
--   which refused requests may take; slots already past are dropped.
--   Returns the number of buckets moved.
local now = now_us(ARGV[2])
local k = #KEYS - 1
local mark = KEYS[k + 1]
if ARGV[1] == 'back' then
  if redis.call('DEL', mark) == 0 then
    return 0
  end
  local moved = 0
  for i = 1, k do
    local fin = tonumber(ARGV[1 + 2 * i])
    local used_end = tonumber(ARGV[2 + 2 * i])
    local tat = tonumber(redis.call('GET', KEYS[i]))
    if tat and tat == fin then
      if used_end <= now then
        redis.call('DEL', KEYS[i])
      else
        gcra_store(KEYS[i], used_end, now)
      end
      moved = moved + 1
    elseif fin > now and (tat or now) < fin then
      -- A refund moved the top below the batch's end: its unused units
      -- still ahead come off the top (a full bucket at most), never a
      -- hole above the top (free twice).
      gcra_lower(KEYS[i], tat or now, fin - math.max(used_end, now), now)
      moved = moved + 1
    elseif fin > now then
      -- Other units lie above: these slots become one of the bucket's
      -- holes.
      holes_add(KEYS[i], used_end, fin, now)
      moved = moved + 1
    end
  end
  return moved
end
local want = tonumber(ARGV[3])
local hold = tonumber(ARGV[4])
local function param(i, j) return tonumber(ARGV[4 + 3 * (i - 1) + j]) end
local tats, starts, units = {}, {}, {}
local granted = true
for i = 1, k do
  local t, max, cost = param(i, 1), param(i, 2), param(i, 3)
  local w = want * cost
  tats[i] = gcra_tat(KEYS[i], now)
  -- The request's own units now, the others after the hold; starts[i]
  -- is where the first would start were they together.
  starts[i] = math.max(math.max(tats[i], now) + cost * t, now + hold) - cost * t
  -- A batch leaves at least as many units as it takes beyond the cost:
  -- a bucket's last units go one check at a time.
  local room = math.floor(math.max(now + t * max - starts[i], 0) / t)
  units[i] = math.min(w, room - (w - cost))
  if units[i] < cost then granted = false end
end
local out = {}
if granted then
  -- The same number of requests' worth of every limit: the batch is
  -- spent up by its smallest limit, and any more units of another limit
  -- would be held by no one (never spent, never given back).
  local requests = nil
  for i = 1, k do
    local r = math.floor(units[i] / math.max(param(i, 3), 1))
    if requests == nil or r < requests then requests = r end
  end
  for i = 1, k do units[i] = requests * math.max(param(i, 3), 1) end
  out = {3, now}
  local last = now
  for i = 1, k do
    local t, max = param(i, 1), param(i, 2)
    local nxt = starts[i] + units[i] * t
    gcra_store(KEYS[i], nxt, now)
    last = math.max(last, nxt)
    table.insert(out, starts[i])
    table.insert(out, tats[i])
    table.insert(out, gcra_capacity(nxt, now, t, max))
    table.insert(out, units[i])
  end
  -- The mark lives as long as the batch's slots (and its hold).
  redis.call('SET', mark, '1', 'PX', string.format('%d', math.ceil((math.max(last, now + hold) - now) / 1000) + 1000))
  return out
end
local refused, holes = false, {}
for i = 1, k do
  out[i] = gcra_wait(tats[i], now, param(i, 1), param(i, 2), param(i, 3), 0)
  if out[i] > 0 then
    holes[i] = holes_find(KEYS[i], now, param(i, 1), param(i, 2), param(i, 3))
    if holes[i] then out[i] = 0 else refused = true end
  end
end
if refused then
  table.insert(out, 1, 0)
  return out
end
for i = 1, k do
  out[i] = gcra_commit(KEYS[i], tats[i], now, param(i, 1), param(i, 2), param(i, 3), holes[i])
end
table.insert(out, 1, 1)
return out
