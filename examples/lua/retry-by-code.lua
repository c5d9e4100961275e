-- retry-by-code.lua — when to try again, from what the remote server said
-- (the retry hook).
--
--   lua:
--     script: /etc/petrel/retry-by-code.lua
--
-- retry(msg, rcpt, attempt, reply) is called after each temporary failure
-- of one recipient: a 4xx reply, or a connection or DNS failure (petrel
-- then makes up the reply, e.g. "451 4.4.1 connect to ...: Connection
-- refused"). attempt is 1 after the first failure; reply is {code,
-- enhanced, text} (enhanced is nil when the server gave none); msg.age is
-- the seconds since the message was queued. It returns
--   a number      seconds until the next attempt,
--   "bounce"      give up now: the sender gets a non-delivery report,
--   nothing       the configured retry.schedule and retry.max_attempts.
-- A number replaces retry.schedule and retry.max_attempts for that
-- attempt; retry.max_age still bounds everything: a message older than it
-- bounces whatever the hook says, and no attempt is set later than
-- arrival + max_age. Permanent failures (5xx) bounce without asking.
--
-- `petrel queue show ID` shows the attempt time chosen:
--   rcpt: <bob@example.org> state=deferred attempts=1 next=2026-11-23T10:05:00Z
--         last="451 4.7.1 Greylisted, try again later"

local MINUTE, HOUR, DAY = 60, 3600, 86400

local POLICY = {
    greylisted = 5 * MINUTE,       -- 451 4.7.1: a greylister lets the retry through after
                                   -- a few minutes; trying sooner only restarts its clock
    busy = MINUTE,                 -- 421: the server is shutting down or overloaded
    mailbox_full_retry = HOUR,     -- 452 4.2.2 (or 4.2.2 with any 4xx): the mailbox is full
    mailbox_full_max_age = DAY,    -- ... give up once the message is this old
}

petrel.on("retry", function(msg, rcpt, attempt, reply)
    if reply == nil then
        return
    end
    if reply.code == 451 and reply.enhanced == "4.7.1" then
        return POLICY.greylisted
    end
    if reply.code == 421 then
        return POLICY.busy
    end
    if reply.enhanced == "4.2.2" then
        if msg.age >= POLICY.mailbox_full_max_age then
            return "bounce"
        end
        return POLICY.mailbox_full_retry
    end
    -- anything else: retry.schedule
end)
