-- One atomic read: what the Stream has lost (so a gap is reported, never skipped silently) and
-- the entries after a position. ARGV: the position ("-" for the very start), the page size.
-- Returns {exists, max-deleted id, entries-added, length, first id, last-generated id,
-- last type, whether the position itself is kept, entries}. The read starts AT the position,
-- so that one more entry says whether the Stream still holds it: a position the Stream never
-- held (Redis lost it: a failover, a restart without persistence) is a gap too.
if redis.call('EXISTS', KEYS[1]) == 0 then return {0} end
local info = redis.call('XINFO', 'STREAM', KEYS[1])
local out = {1, '0-0', -1, 0, '', '0-0', '', 0}
for i = 1, #info, 2 do
  local k, v = info[i], info[i + 1]
  if k == 'max-deleted-entry-id' then out[2] = v
  elseif k == 'entries-added' then out[3] = v
  elseif k == 'length' then out[4] = v
  elseif k == 'first-entry' and v then out[5] = v[1]
  elseif k == 'last-generated-id' then out[6] = v
  elseif k == 'last-entry' and v then
    local fields = v[2]
    for j = 1, #fields, 2 do if fields[j] == 't' then out[7] = fields[j + 1] end end
  end
end
local limit = tonumber(ARGV[2])
local entries
if ARGV[1] == '-' then
  entries = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', limit)
else
  entries = redis.call('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', limit + 1)
  if entries[1] and entries[1][1] == ARGV[1] then
    out[8] = 1
    table.remove(entries, 1)
  elseif #entries > limit then
    table.remove(entries)
  end
end
out[9] = entries
return out
