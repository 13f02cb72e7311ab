"""Beyond-prefix KV reuse: block KV at canonical positions, assembly, selective recompute."""
