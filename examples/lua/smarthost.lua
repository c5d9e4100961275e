-- smarthost.lua — some recipient domains go through a smarthost (the route
-- hook); the rest keep the routes of petrel.yaml.
--
--   lua:
--     script: /etc/petrel/smarthost.lua
--
-- route(msg, rcpt) is called for each recipient before it is queued for a
-- destination. It returns where that recipient goes, in the syntax of
-- routes[].via:
--   "mx"                 the recipient domain's own MX (ignoring routes:)
--   "smtp:[host]:port"   host's A/AAAA, no MX lookup (a smarthost)
--   "smtp:host:port"     host's MX records first
--   "lmtp:[host]:port", "lmtp:unix:/path"   LMTP delivery
-- or nothing for the configured routes. A value that does not parse is
-- logged ("hook route: <bob@x>: invalid route ...") and the configured
-- routes are used. Recipients are grouped per destination, so one message
-- to several domains can leave by several routes.

local SMARTHOST = "smtp:[192.0.2.25]:587"

-- Exact domains, and "*.domain" for every subdomain.
local VIA_SMARTHOST = {
    "partner.example",
    "*.partner.example",
    "legacy.example",
}

local function matches(pattern, domain)
    if pattern:sub(1, 2) == "*." then
        local suffix = pattern:sub(2)
        return #domain > #suffix and domain:sub(-#suffix) == suffix
    end
    return domain == pattern
end

petrel.on("route", function(msg, rcpt)
    local domain = rcpt:match("@([^@]+)$")
    if not domain then
        return
    end
    domain = domain:lower()
    for _, pattern in ipairs(VIA_SMARTHOST) do
        if matches(pattern, domain) then
            return SMARTHOST
        end
    end
end)
