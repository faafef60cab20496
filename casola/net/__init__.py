"""asyncio glue around the sans-I/O core: protocol adapter, write gate (issue 3 adds pools, links)."""
