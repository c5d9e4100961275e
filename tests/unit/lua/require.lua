-- require finds modules in the script's directory.
local helper = require("helper_mod")
petrel.on("connect", function(conn)
    return petrel.reject(550, "5.7.1 " .. helper.greeting)
end)
