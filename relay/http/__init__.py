"""The HTTP edge: the SDKs' connections parsed with llhttp (`connection`, `parser`), what
every connection of a listener shares (`listener_state`), the answers' bytes (`answers`), CORS,
the client's address behind trusted proxies, admission, and the first-party CDN routes. It hands
each event post's route, headers and body to `relay.ingest`, and everything else to aiohttp.
"""
