"""The tap: what the rules and the forwarders do to recent messages, shown live to whoever watches
(`/admin/tap`, `relay tap`, the `/debugger` page). Nothing is built while nobody watches."""
