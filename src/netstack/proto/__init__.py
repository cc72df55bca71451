"""Layer 0, sans-I/O: bytes in -> events out, events in -> bytes out.

Nothing here imports asyncio, socket, ssl, selectors, threading or time
(tests/test_layers.py enforces it). Time, when needed, is an argument.
"""
