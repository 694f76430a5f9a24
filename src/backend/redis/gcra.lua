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

-- A bucket's holes: units batches gave back below the bucket's top, as
-- ranges of slots [h0, h1) (us), at most 16, beside the bucket (its key +
-- ':h', "h0 h1 h0 h1 ..."). A request the bucket refuses may take slots of
-- a hole that start no earlier than now and end within its burst window.
-- A hole is gone once h1 passes.
local MAX_HOLES = 16

-- The bucket's live holes, in order of h0.
local function holes_get(key, now)
  local v = redis.call('GET', key .. ':h')
  local out = {}
  if not v then return out end
  for a, b in string.gmatch(v, '(%d+) (%d+)') do
    a, b = tonumber(a), tonumber(b)
    if b > now and b > a then table.insert(out, {a, b}) end
  end
  table.sort(out, function(x, y) return x[1] < y[1] end)
  return out
end

-- The first hole where `n` units fit at `now`: its index and where they
-- start, or nil.
local function holes_fit(holes, now, t, max, n)
  for i, h in ipairs(holes) do
    local a = math.max(h[1], now)
    if a + n * t <= math.min(h[2], now + t * max) then return i, a end
  end
  return nil
end

-- Where a request the bucket refused fits in its holes: {holes, index,
-- start} for gcra_commit, or nil.
local function holes_find(key, now, t, max, n)
  local hs = holes_get(key, now)
  local j, a = holes_fit(hs, now, t, max, n)
  if j then return {hs, j, a} end
  return nil
end

-- Units the bucket's holes could take at `now` (slots that start no
-- earlier than now and end within the window), for a peek.
local function holes_room(key, now, t, max)
  local n = 0
  for _, h in ipairs(holes_get(key, now)) do
    local a, e = math.max(h[1], now), math.min(h[2], now + t * max)
    if e > a then n = n + math.floor((e - a) / t) end
  end
  return n
end

-- Stores the holes (none left: the key goes); it expires with the last.
local function holes_store(key, holes, now)
  local parts, last = {}, 0
  for _, h in ipairs(holes) do
    if h[2] > now and h[2] > h[1] then
      table.insert(parts, string.format('%d %d', h[1], h[2]))
      last = math.max(last, h[2])
    end
  end
  if #parts == 0 then
    redis.call('DEL', key .. ':h')
    return
  end
  redis.call('SET', key .. ':h', table.concat(parts, ' '), 'PX', string.format('%d', math.ceil((last - now) / 1000)))
end

-- Units given back below the top become a hole, joined to one they touch;
-- past MAX_HOLES the smallest hole is dropped (its units refill).
local function holes_add(key, h0, h1, now)
  local holes = holes_get(key, now)
  local joined = false
  for _, h in ipairs(holes) do
    if h[2] == h0 then h[2] = h1; joined = true; break end
    if h[1] == h1 then h[1] = h0; joined = true; break end
  end
  if not joined then table.insert(holes, {h0, h1}) end
  if #holes > MAX_HOLES then
    table.sort(holes, function(x, y) return (x[2] - x[1]) > (y[2] - y[1]) end)
    table.remove(holes)
  end
  holes_store(key, holes, now)
end

-- Takes `n` units at `a` from hole `i` of `holes` (the slots before `a`
-- are past: dropped with them).
local function holes_take(key, holes, i, a, n, t, now)
  holes[i][1] = a + n * t
  holes_store(key, holes, now)
end

-- Moves a bucket's top down by `d` (us) of counted slots (a refund, or
-- a batch's unused units after a refund moved the top below it). A hole
-- the top reaches is free already: the top passes it without counting it,
-- and it goes (else it would be free twice, and a bucket refunded to full
-- would hold more than its burst). Stores the TAT (at or below now: the
-- key goes, the bucket is full) and returns it.
local function gcra_lower(key, tat, d, now)
  local holes = holes_get(key, now)
  local pos, left, keep = tat, d, #holes
  while keep >= 1 do
    local h = holes[keep]
    local gap = pos - math.min(h[2], pos)
    if left < gap then break end
    left = left - gap
    pos = math.min(h[1], pos)
    keep = keep - 1
  end
  if keep < #holes then
    local kept = {}
    for i = 1, keep do kept[i] = holes[i] end
    holes_store(key, kept, now)
  end
  local nxt = pos - left
  if nxt <= now then
    redis.call('DEL', key)
    return now
  end
  gcra_store(key, nxt, now)
  return nxt
end

-- Counts `n` units of an admitted request in a bucket whose TAT is `tat`:
-- in the slots `hole` names ({holes, index, start}: a refused bucket's
-- hole that fits them), else from the top. Its capacity afterwards.
local function gcra_commit(key, tat, now, t, max, n, hole)
  if hole then
    holes_take(key, hole[1], hole[2], hole[3], n, t, now)
    return gcra_capacity(tat, now, t, max)
  end
  local nxt = gcra_take(tat, now, t, n)
  gcra_store(key, nxt, now)
  return gcra_capacity(nxt, now, t, max)
end
