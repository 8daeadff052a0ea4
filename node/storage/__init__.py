"""Persistence: SQLite through aiosqlite, behind small store classes (node and hub)."""
