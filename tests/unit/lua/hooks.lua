-- The other hook shapes: data (headers, add_header), auth, bounce, event.
petrel.on("data", function(txn, msg)
    msg:add_header("X-Policy", "checked " .. txn.from)
    local subj = msg:header("subject")
    if subj == "spam" then return petrel.reject(550, "5.7.1 no spam (" .. msg.size .. ")") end
end)

petrel.on("auth", function(conn, user, password)
    return user == "alice" and password == "secret"
end)

petrel.on("bounce", function(msg, failures)
    local lines = {}
    for i, f in ipairs(failures) do
        lines[i] = f.rcpt .. ": " .. f.reply.code .. " " .. f.reply.enhanced .. " " .. f.reply.text
    end
    return { subject = "Undelivered: " .. msg.id, text = table.concat(lines, "\n") }
end)

petrel.on("event", function(ev)
    petrel.log("info", "event %s %s", ev.type, ev.id)
end)
