-- bounce-fr.lua — non-delivery reports worded in French (the bounce hook).
--
--   lua:
--     script: /etc/petrel/bounce-fr.lua
--
-- bounce(msg, failures) is called when a non-delivery report is about to be
-- sent to the sender of msg; failures lists the recipients it covers, each
-- {rcpt, reply = {code, enhanced, text}}. It returns {subject = ..., text =
-- ...}: the report's Subject and its human-readable part (text/plain,
-- UTF-8; any line ends), or nothing for petrel's English wording. Either
-- field may be left out.
--
-- Only the wording changes. The report stays an RFC 3464 multipart/report:
-- the machine-readable message/delivery-status part (Final-Recipient,
-- Action, Status, Diagnostic-Code, ...) and the returned headers or message
-- are petrel's, so mail clients and list managers still parse it.
-- Success and delay notices keep the default wording.

local function header(msg, name, default)
    local v = msg:header(name)
    if v == nil or v == "" then
        return default
    end
    return v
end

petrel.on("bounce", function(msg, failures)
    local lines = {
        "Bonjour,",
        "",
        "Ceci est le système de messagerie. Votre message n'a pas pu être remis",
        "aux destinataires suivants :",
        "",
    }
    for _, f in ipairs(failures) do
        local r = f.reply
        local why = r and (r.code .. " " .. (r.enhanced and (r.enhanced .. " ") or "") .. r.text)
                    or "raison inconnue"
        lines[#lines + 1] = "  <" .. f.rcpt .. "> : " .. why
    end
    lines[#lines + 1] = ""
    lines[#lines + 1] = "Le rapport technique et les en-têtes de votre message sont joints."
    lines[#lines + 1] = "Identifiant du message : " .. msg.id
    return {
        subject = "Message non remis : " .. header(msg, "Subject", "(sans objet)"),
        text = table.concat(lines, "\n"),
    }
end)
