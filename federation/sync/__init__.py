"""Verifiable sync: member mirrors, hub peering, fork and tamper detection.

- :mod:`.verify`   pure checks: a source's checkpoint against what is trusted, fork evidence
- :mod:`.puller`   pulls one mirrored log from a hub, verifies it and applies it through the node
- :mod:`.peering`  background pullers for the peers named in ``hub.toml``, and their state
- :mod:`.mirror`   a member's mirror directory (``mirror.toml`` + SQLite)
- :mod:`.wire`     JSON shapes sync adds: lookup matches from mirrored collections, sources
- :mod:`.cli`      ``hashfed mirror`` and ``hashfed lookup --mirror``
"""
