"""The only code that speaks Redis: clients and URLs, Lua scripts, job streams,
membership, checkpoints, durability and ACL checks."""
