-- petrel.on with a hook name that does not exist.
petrel.on("conect", function() end)
