-- KEYS: the Streams of every event's topics, in order. ARGV: trim operator, maxlen, ttl, the
-- terminal event types (space-separated), the announcing command (PUBLISH; SPUBLISH on a Redis
-- Cluster, where every key and channel of one call is in one slot), the head of every Stream
-- key and the head of every channel (a topic's key and channel are each head .. '{topic}'),
-- then for each event its type, its JSON, its key (unique to the event, Event.key), how many
-- of each Stream's newest entries to search for that key first (0: none, a first try), and
-- its marks: one character per topic, '1' when the topic ends at a terminal event, '0' when
-- not (so the event has as many topics as marks). A topic's channel is found from its key, not
-- sent: fewer arguments per event to pack, send and parse.
-- The announcement is "<stream id>\n<type>\n<json>" so that the hub can frame it without a
-- read or a JSON parse. An entry is {t = type, d = JSON, k = key}, in that order.
-- A script runs atomically: no reader sees an entry before its TTL is set, and an announcement
-- cannot be lost between XADD and PUBLISH. A retried event (its key searched for) that a
-- Stream already holds is not written there again: that topic answers the id it has, so that a
-- retry after an error that left it unknown whether the event was written (a reply lost, one
-- slot of a cluster written and not the other) is idempotent. An event for a topic that has
-- ended (its newest entry is terminal, and is not this event) is dropped from all its topics,
-- in the same atomic step: a late `operation.started` (an instance woken from SIGSTOP after
-- another finished its work, an announcement retried through a Redis outage) can never follow
-- the end of its operation. A dropped event's ids are answered as {terminal id, its type, its
-- JSON, its key} (the key '' for an entry written without one), so that a caller can tell, and
-- streams.cluster can copy the terminal event to the operation's other topics if a crash
-- between its two calls left them without it.
local op, maxlen, ttl, announce = ARGV[1], ARGV[2], ARGV[3], ARGV[5]
local terminal = {}
for t in string.gmatch(ARGV[4], '%S+') do terminal[t] = true end
local tag, channel_head = #ARGV[6] + 1, ARGV[7]
local function field(fields, name)
  for j = 1, #fields, 2 do if fields[j] == name then return fields[j + 1] end end
  return false
end
local a, k, ids = 8, 1, {}
while a <= #ARGV do
  local etype, data, key = ARGV[a], ARGV[a + 1], ARGV[a + 2]
  local search, marks = tonumber(ARGV[a + 3]), ARGV[a + 4]
  local n = #marks
  a = a + 5
  local held = {}
  if search > 0 then
    for i = 0, n - 1 do
      for _, entry in ipairs(redis.call('XREVRANGE', KEYS[k + i], '+', '-', 'COUNT', search)) do
        if entry[2][6] == key and entry[2][5] == 'k' then
          held[i] = entry[1]
          break
        end
      end
    end
  end
  local ended = false
  for i = 0, n - 1 do
    if string.byte(marks, i + 1) == 49 and not held[i] then -- '1': the topic ends
      local last = redis.call('XREVRANGE', KEYS[k + i], '+', '-', 'COUNT', 1)
      if last[1] and terminal[field(last[1][2], 't')] then
        local f = last[1][2]
        ended = {last[1][1], field(f, 't'), field(f, 'd') or '{}', field(f, 'k') or ''}
      end
    end
  end
  for i = 0, n - 1 do
    if ended then
      ids[k] = ended
    elseif held[i] then
      ids[k] = held[i]
    else
      local stream = KEYS[k]
      local id = redis.call(
        'XADD', stream, 'MAXLEN', op, maxlen, '*', 't', etype, 'd', data, 'k', key)
      redis.call('EXPIRE', stream, ttl)
      redis.call(
        announce, channel_head .. string.sub(stream, tag), id .. '\n' .. etype .. '\n' .. data)
      ids[k] = id
    end
    k = k + 1
  end
end
return ids
