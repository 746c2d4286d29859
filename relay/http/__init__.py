"""The HTTP edge: the SDKs' connections, parsed with llhttp and answered (`connection`, with its
`limits`), what every connection of a listener shares (`listener_state`), the answers' bytes
(`answers`), CORS, the client's address behind trusted proxies, admission, the first-party CDN
routes, and the event routes as aiohttp serves them (`event_routes`). It hands each event post's
route, headers and body to `relay.ingest`, and everything else to aiohttp.
"""
