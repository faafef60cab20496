"""asyncio glue around the sans-I/O core: the TCP link (`protocol.py`) and the in-memory link
(`memlink.py`) on one base (`link.py`), the HELLO handshake for both (`handshake.py`), persistent
links with backoff (`pool.py`), the write gate, the uvloop runner (`loop.py`), and outbound HTTP on a
tenant's behalf held to one address policy (`outbound.py`)."""
