"""The sandbox carrier simulator: a local stand-in for an EMAIL/SMS/RCS carrier, in its own process.

It keeps a durable log of what it accepted, de-duplicates by idempotency key across restarts,
sends signed receipts, and has latency/failure/outage switches for tests and benchmarks.
"""
