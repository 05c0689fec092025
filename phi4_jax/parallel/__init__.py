"""Device meshes, the one table of logical-axis sharding rules, KV-head repeats, multi-host runs."""
