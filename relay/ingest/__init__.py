"""A request's messages: the Segment wire format (`segment`), when each was received and the
client's clock skew (`receipt`), and `receiver.Ingest`, which validates them, fetches what the
shared store holds about their users (`held`), runs them through `relay.pipeline` and hands what
is left to `relay.outbox` in one commit before the request is answered. `release` runs the
messages held while Redis did not answer. No HTTP here: `relay.http` reads and answers.
"""
