-- Delivery hooks for test_hooks_delivery: each answers by recipient so one
-- script covers "an answer", "nil" (the plugins decide) and "an error".
local function kind(rcpt)
    return (rcpt or ""):match("^([^@]*)@") or ""
end

petrel.on("route", function(msg, rcpt)
    local k = kind(rcpt)
    if k == "lua" then return "smtp:[192.0.2.1]:2525" end
    if k == "from" then return "smtp:[" .. msg.from:match("@(.*)$") .. "]" end
    if k == "err" then error("route broke") end
    if k == "slow" then petrel.sleep(0.05); return "mx" end
    return nil
end)

petrel.on("retry", function(msg, rcpt, attempt, reply)
    if kind(rcpt) == "lua" then return attempt * 100 + reply.code end
end)

petrel.on("event", function(ev)
    petrel.log("info", "event %s %s", ev.type, ev.rcpt)
end)
