"""Running the rules: the pipeline over a message (`runner`), `when:` conditions, dotted paths
into a message, and who a message is about (`identity`). Rules read and write user state through
`relay.state`; the pipeline's result goes back to `relay.ingest`, which stores it.
"""
