"""The durable queue: every accepted message stored in SQLite before its answer (`store`), by
group commits (`group_commit`) through one writing connection in a child process (`writer`,
`writer_child`); the cap on its bytes (`capacity`) and what it holds (`stats`). `relay.delivery`
reads from it.
"""
