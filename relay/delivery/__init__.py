"""Sending the outbox to the vendors: one forwarder per upstream with batching, retries, backoff,
pauses and dead letters (`forwarder`), in the batch each vendor kind takes (`vendor_batch`).
"""
