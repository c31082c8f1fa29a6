"""The application layer: the `flora` command and what it composes (demo, status, provision).

The only code that imports several roles. Layers, top to bottom: `flora.app` -> the roles
(`coordinator`, `edge_client`, `export`) -> the core (the rest of `flora`). Nothing imports upward.
"""
