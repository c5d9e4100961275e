-- A script that does not compile: the error names line 4 (the "end" that follows the open call).
petrel.on("connect", function(conn)
    return petrel.accept(
end)
