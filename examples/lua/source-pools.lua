-- source-pools.lua — each sender domain leaves from its own pool of source
-- addresses, chosen by weight (the select_source hook).
--
--   lua:
--     script: /etc/petrel/source-pools.lua
--
-- select_source(msg, destination) is called once per message and recipient
-- domain (destination), before any connection is made, unless the client
-- chose the source itself with XBIND (that always wins). It returns
-- {ip = "...", hostname = "..."}: the local address the connection binds to
-- and the name petrel says in EHLO there (make it the address's PTR name),
-- or nothing to fall through to delivery.sources and delivery.source_ips.
--
-- The address must be local to this machine; one that is not is logged
-- ("hook select_source: 192.0.2.99 for example.org: not a local address")
-- and petrel's own selection is used. It need not be in delivery.source_ips.
-- A hostname may be left out: delivery.hostnames, delivery.hostname, then
-- hostname name it.
--
-- Connections are shared only among messages with the same destination,
-- source address and EHLO name, so one sender's pool never carries another
-- sender's mail. The delivery log line says "(lua)" after the EHLO name:
--   to=<bob@example.org>, relay=..., src=192.0.2.11, helo=mta2.shop.example (lua), ...

local POOLS = {
    -- Transactional mail: three parts from the first address, one from the second.
    ["shop.example"] = {
        { ip = "192.0.2.10", hostname = "mta1.shop.example", weight = 3 },
        { ip = "192.0.2.11", hostname = "mta2.shop.example", weight = 1 },
    },
    -- The newsletter has an address of its own, so its reputation stays its own.
    ["news.example"] = {
        { ip = "192.0.2.20", hostname = "mta.news.example", weight = 1 },
    },
}

-- Subdomains share their parent's pool ("eu.shop.example" uses "shop.example").
local function pool_for(domain)
    while domain do
        local p = POOLS[domain]
        if p then
            return p
        end
        domain = domain:match("^[^.]+%.(.+)$")
    end
end

local function pick(pool)
    local total = 0
    for _, s in ipairs(pool) do
        total = total + s.weight
    end
    local r = math.random() * total
    for _, s in ipairs(pool) do
        r = r - s.weight
        if r < 0 then
            return s
        end
    end
    return pool[#pool]
end

petrel.on("select_source", function(msg, destination)
    local domain = msg.from and msg.from:match("@([^@]+)$")
    if not domain then
        return -- the null sender (bounces): petrel's own selection
    end
    local pool = pool_for(domain:lower())
    if pool then
        local s = pick(pool)
        return { ip = s.ip, hostname = s.hostname }
    end
end)
