"""Sending the outbox to the vendors: one forwarder per upstream with batching, retries,
backoff, pauses and dead letters (`forwarder`), and replaying dead letters (`replay`).
"""
