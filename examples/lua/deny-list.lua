-- deny-list.lua — refuse mail for the recipients listed in a file.
--
--   lua:
--     script: /etc/petrel/deny-list.lua
--
-- The list is a text file, one entry a line:
--
--   # former employees
--   bob@example.com          one address (compared without regard to case)
--   @old-brand.example       every address at that domain
--
-- Blank lines and text after '#' are ignored. A recipient on the list gets
--   550 5.1.1 <bob@example.com>: Recipient address rejected
-- at RCPT TO; the other recipients of the same transaction are unaffected.
--
-- The file is read when the script loads: at start-up, by `petrel
-- check-config`, and on every `kill -HUP`, so edit the list and send SIGHUP.
-- If the file cannot be read the script fails to load: petrel refuses to
-- start (or, on SIGHUP, keeps the list it had) and logs why.

local DENY_LIST = "/etc/petrel/deny-list.txt"

local function load(path)
    local f, err = io.open(path, "r")
    if not f then
        error("cannot read the deny list: " .. err, 2)
    end
    local addresses, domains, n = {}, {}, 0
    for line in f:lines() do
        local entry = line:gsub("#.*$", ""):match("^%s*(%S+)%s*$")
        if entry then
            entry = entry:lower()
            if entry:sub(1, 1) == "@" then
                domains[entry:sub(2)] = true
            else
                addresses[entry] = true
            end
            n = n + 1
        end
    end
    f:close()
    return addresses, domains, n
end

local addresses, domains, count = load(DENY_LIST)
petrel.log("info", "deny-list: %d entries from %s", count, DENY_LIST)

petrel.on("rcpt_to", function(txn, rcpt)
    local addr = rcpt:lower()
    local domain = addr:match("@([^@]+)$")
    if addresses[addr] or (domain and domains[domain]) then
        return petrel.reject(550, "5.1.1 <" .. rcpt .. ">: Recipient address rejected")
    end
end)
