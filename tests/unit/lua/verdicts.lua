-- The helo hook picks its answer from the helo name (test_lua_bridge.c).
local saved

petrel.on("connect", function(conn)
    saved = conn
end)

petrel.on("helo", function(conn, name)
    if name == "accept" then return petrel.accept() end
    if name == "reject" then return petrel.reject(550, "5.7.1 go away") end
    if name == "tempfail" then return petrel.tempfail(451, "4.7.1 try later") end
    if name == "noesc" then return petrel.reject(554, "no enhanced code") end
    if name == "continue" then return end
    if name == "conn" then
        return petrel.reject(550, string.format("5.7.1 %s:%d %s %s", conn.ip, conn.port,
                                                conn.local_ip, conn.listener))
    end
    if name == "reject2xx" then return petrel.reject(250, "2.0.0 fine") end
    if name == "mismatch" then return petrel.tempfail(451, "5.7.1 wrong class") end
    if name == "badesc" then return petrel.reject(550, "5.x.1 bad") end
    if name == "badret" then return 42 end
    if name == "error" then
        error("deliberate failure") -- line 23
    end
    if name == "loop" then
        local n = 0
        while true do n = n + 1 end
    end
    if name == "pcall loop" then
        while true do pcall(function() while true do end end) end
    end
    if name == "write" then conn.ip = "1.2.3.4" end
    if name == "expired" then
        local ok, err = pcall(function() return saved.ip end)
        if not ok and tostring(err):find("attempt to use an expired view", 1, true) then
            return petrel.reject(550, "5.7.1 expired")
        end
        return petrel.accept()
    end
    local s = name:match("^sleep (.+)$")
    if s then
        petrel.sleep(tonumber(s))
        return petrel.reject(550, "5.7.1 slept " .. s)
    end
    local d = name:match("^mx (.+)$")
    if d then
        local hosts, status = petrel.dns.mx(d)
        if not hosts then return petrel.tempfail(451, "4.4.3 " .. status) end
        return petrel.reject(550, "5.7.1 " .. hosts[1].name .. " " .. hosts[1].addrs[1]
                             .. " " .. #hosts)
    end
    local h = name:match("^a (.+)$")
    if h then
        local addrs, status = petrel.dns.a(h)
        if not addrs then return petrel.tempfail(451, "4.4.3 " .. status) end
        return petrel.reject(550, "5.7.1 " .. table.concat(addrs, ","))
    end
    petrel.log("info", "unexpected helo %q", name)
end)
