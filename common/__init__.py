"""Plumbing that a node and the coordinator both run on: process lifetime (parent death, hard
exit, task dumps), logging, and a small HTTP endpoint. Neutral ground: it imports nothing from
`node` or `coordinator`, so both can use it without importing each other."""
