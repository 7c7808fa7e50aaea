-- KEYS: the Streams of every event's topics, in order. ARGV: trim operator, maxlen, ttl, the
-- terminal event types (space-separated), the announcing command (PUBLISH; SPUBLISH on a Redis
-- Cluster, where every key and channel of one call is in one slot), the head of every Stream
-- key and the head of every channel (a topic's key and channel are each head .. '{topic}'),
-- then for each event its type, its JSON and its marks: one character per topic, '1' when the
-- topic ends at a terminal event, '0' when not (so the event has as many topics as marks).
-- A topic's channel is found from its key, not sent: a third fewer arguments per event.
-- The announcement is "<stream id>\n<type>\n<json>" so that the hub can frame it without a
-- read or a JSON parse. A script runs atomically: no reader sees an entry before its TTL is
-- set, and an announcement cannot be lost between XADD and PUBLISH. An event for a topic that
-- has ended (its newest entry is terminal) is dropped from all its topics, in the same atomic
-- step: a late `operation.started` (an instance woken from SIGSTOP after another finished its
-- work, an announcement retried through a Redis outage) can never follow the end of its
-- operation. A dropped event's ids are answered as {terminal id}, so that a caller can tell
-- (streams.cluster publishes a user's topic only after its operation's).
local op, maxlen, ttl, announce = ARGV[1], ARGV[2], ARGV[3], ARGV[5]
local terminal = {}
for t in string.gmatch(ARGV[4], '%S+') do terminal[t] = true end
local tag, channel_head = #ARGV[6] + 1, ARGV[7]
local a, k, ids = 8, 1, {}
while a <= #ARGV do
  local etype, data, marks = ARGV[a], ARGV[a + 1], ARGV[a + 2]
  local n = #marks
  a = a + 3
  local ended = false
  for i = 0, n - 1 do
    if string.byte(marks, i + 1) == 49 then -- '1'
      local last = redis.call('XREVRANGE', KEYS[k + i], '+', '-', 'COUNT', 1)
      if last[1] and terminal[last[1][2][2]] then ended = last[1][1] end
    end
  end
  for i = 0, n - 1 do
    if ended then
      ids[k] = {ended}
    else
      local key = KEYS[k]
      local id = redis.call('XADD', key, 'MAXLEN', op, maxlen, '*', 't', etype, 'd', data)
      redis.call('EXPIRE', key, ttl)
      redis.call(announce, channel_head .. string.sub(key, tag), id .. '\n' .. etype .. '\n' .. data)
      ids[k] = id
    end
    k = k + 1
  end
end
return ids
