-- bench/policy.lua — the Lua policy of the hooks benchmark (bench/run.sh hooks).
--
-- Three hooks, each doing what a small real policy does and no more: a
-- table lookup per call, nothing that waits (no DNS, no sleep).
--
--   connect        nothing, unless the client's IP is in DENY_CLIENTS
--   rcpt_to        a lookup of the recipient domain in RCPT_DOMAINS
--   select_source  the source address and EHLO name for the sender's domain
--
-- On the benchmark's own traffic (bench@bench.test -> rcpt@dest.test from
-- 127.0.0.1) connect and rcpt_to return nothing and select_source returns
-- 127.0.0.1 (the address the relay scenario binds to anyway), so the mail
-- takes the same path as without the script; the cost measured is calling
-- the hooks. The harness's spot checks use the other entries: a client from
-- 127.0.0.66 must be refused at connect, a recipient at blocked.test at
-- RCPT, and mail from check.test must leave from the machine's own address
-- (PETREL_BENCH_SOURCE_IP, set by the harness; 127.0.0.1 if unset) with the
-- EHLO name check-out.bench.test.

local DENY_CLIENTS = {
    ["127.0.0.66"] = true,
    ["192.0.2.66"] = true,
    ["198.51.100.7"] = true,
}

-- recipient domain -> what to do; a domain not listed: no objection
local RCPT_DOMAINS = {
    ["dest.test"] = "ok",
    ["check.test"] = "ok",
    ["blocked.test"] = "reject",
    ["old-brand.test"] = "reject",
}

local MACHINE_IP = os.getenv("PETREL_BENCH_SOURCE_IP") or "127.0.0.1"

-- sender domain -> {ip, hostname}; a domain not listed: petrel's own selection
local SOURCES = {
    ["bench.test"] = { ip = "127.0.0.1", hostname = "bench-out.bench.test" },
    ["check.test"] = { ip = MACHINE_IP, hostname = "check-out.bench.test" },
}

petrel.on("connect", function(conn)
    if DENY_CLIENTS[conn.ip] then
        return petrel.reject(554, "5.7.1 Client refused by bench policy")
    end
end)

petrel.on("rcpt_to", function(txn, rcpt)
    local domain = rcpt:match("@([^@]+)$")
    if domain and RCPT_DOMAINS[domain:lower()] == "reject" then
        return petrel.reject(550, "5.7.1 <" .. rcpt .. ">: Recipient domain refused")
    end
end)

petrel.on("select_source", function(msg, destination)
    local domain = msg.from and msg.from:match("@([^@]+)$")
    local s = domain and SOURCES[domain:lower()]
    if s then
        return { ip = s.ip, hostname = s.hostname }
    end
end)
