"""The pure core: letter validation, numbering, evidence and lifecycle rules.

Nothing here does I/O: no asyncio, no grpc, no aiosqlite. The node and hub shells feed it
data and carry out what it returns.
"""
