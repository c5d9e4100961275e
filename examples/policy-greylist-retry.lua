-- policy-greylist-retry.lua — retry timing chosen from the remote reply.
--
-- The retry hook is called after a temporary delivery failure with the
-- message, the recipient, the attempt number (1 for the first failure) and
-- the reply {code, enhanced, text}. It returns the number of seconds until
-- the next attempt, "bounce" to give up now, or nothing to keep the
-- configured retry schedule (retry.schedule in petrel.yaml).
--
--   lua:
--     script: /etc/petrel/policy-greylist-retry.lua

local MINUTE, HOUR, DAY = 60, 3600, 86400

petrel.on("retry", function(msg, rcpt, attempt, reply)
    if reply == nil then
        return -- no reply (connection failure, DNS): the configured schedule
    end
    -- Greylisting (451 4.7.1): the greylister accepts a retry after a few
    -- minutes; retrying sooner only resets its timer.
    if reply.code == 451 and reply.enhanced == "4.7.1" then
        return 5 * MINUTE
    end
    -- 421: the server is going away or is busy; try again soon.
    if reply.code == 421 then
        return MINUTE
    end
    -- 452 4.2.2: mailbox full. Retry every hour for one day, then bounce.
    if reply.code == 452 and reply.enhanced == "4.2.2" then
        if msg.age >= DAY then
            return "bounce"
        end
        return HOUR
    end
end)
