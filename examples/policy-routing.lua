-- policy-routing.lua — per-recipient routes and source addresses.
--
-- route(msg, rcpt) returns where to deliver one recipient:
--   "mx"                     normal MX delivery (what petrel does without a hook)
--   "smtp:[host]:port"       a smarthost (brackets: no MX lookup)
--   "lmtp:…"                 local delivery over LMTP
-- or nothing to use the routes of petrel.yaml.
--
-- select_source(msg, destination) returns {ip = "…", hostname = "…"}: the
-- local address to bind and the name to greet with (it should match the
-- address's PTR record), or nothing for the configured source selection.

local internal = {
    ["corp.example"] = "lmtp:unix:/run/dovecot/lmtp",
    ["partner.example"] = "smtp:[relay.partner.example]:587",
}

petrel.on("route", function(msg, rcpt)
    local domain = rcpt:match("@([^@]+)$")
    if domain then
        return internal[domain:lower()]
    end
end)

-- Bulk mail (a Precedence: bulk header) leaves from its own address so that
-- its reputation does not affect the transactional stream.
local pools = {
    bulk = { ip = "192.0.2.20", hostname = "bulk.mta.example" },
    default = { ip = "192.0.2.10", hostname = "mta.example" },
}

petrel.on("select_source", function(msg, destination)
    local precedence = msg:header("Precedence")
    if precedence and precedence:lower() == "bulk" then
        return pools.bulk
    end
    return pools.default
end)
