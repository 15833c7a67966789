"""Imported first by the `__main__` of a process that opens no TLS connection: asyncio comes up without ssl.

asyncio imports ssl, and with it OpenSSL's libcrypto, as it is imported, for TLS transports that the bus,
the units and the StackFlow bridge never open (the fleet face does; the HTTP gateway's starlette imports
ssl through http.client anyway). Measured on the voice stack: 0.8-1.4 MB less per process. `import ssl`
still works afterwards; only asyncio's own TLS transports are unavailable in such a process.
"""
import sys

if "asyncio" not in sys.modules and "ssl" not in sys.modules:
    sys.modules["ssl"] = None  # type: ignore[assignment]  # `import ssl` raises ImportError, which asyncio allows
    try:
        import asyncio  # noqa: F401
    finally:
        del sys.modules["ssl"]
