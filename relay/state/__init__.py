"""User state the rules remember across messages (current group, internal verdicts, id links):
in this relay's SQLite file (`sqlite`), or shared by several relays through Redis (`shared`,
`redis_store`, `redis_scripts`, and `shipper`, which sends the journal of changes). Its writes
ride in the outbox's commits (`relay.outbox.writer.Statement`).
"""
