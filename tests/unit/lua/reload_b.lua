-- The script a reload switches to.
petrel.on("connect", function(conn)
    return petrel.reject(550, "5.7.1 new script")
end)
