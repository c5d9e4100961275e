-- A module beside the script, found by require.
return { greeting = "hello from helper_mod" }
