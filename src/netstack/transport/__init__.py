"""Layer 1: asyncio/uvloop glue. No product logic lives here."""
