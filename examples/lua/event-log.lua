-- event-log.lua — one line per delivery outcome in a file of its own (the
-- event hook), for a billing or analytics job to read.
--
--   lua:
--     script: /etc/petrel/event-log.lua
--
-- event(ev) is called once a recipient's outcome is on disk:
--   ev.type    "delivered", "deferred" (will be retried) or "bounced"
--   ev.id      the queue id
--   ev.rcpt    the recipient
--   ev.reply   {code, enhanced, text}: the last reply (petrel's own for
--              connection and DNS failures)
-- It is fire and forget: what it returns is ignored and nothing waits for
-- it. Keep it quick — it runs on petrel's event loop (a Lua hook has
-- lua.timeout to finish).
--
-- Lines look like
--   2026-11-23T10:00:00Z delivered 660E9620F1B71000 <bob@example.org> 250 2.0.0 Ok

local EVENT_LOG = "/var/log/petrel/events.log"

petrel.on("event", function(ev)
    local f = io.open(EVENT_LOG, "a")
    if not f then
        return
    end
    local r = ev.reply
    f:write(string.format("%s %s %s <%s> %s\n", os.date("!%Y-%m-%dT%H:%M:%SZ"), ev.type, ev.id,
                          ev.rcpt, r and (r.code .. " " .. (r.enhanced or "") .. " " .. r.text)
                          or "-"))
    f:close()
end)
