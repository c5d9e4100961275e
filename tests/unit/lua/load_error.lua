-- A script that compiles but fails while running its main chunk.
error("broken at load time")
