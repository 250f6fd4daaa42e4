"""TLS in front of the workshop hub: ``python -m labkit.teach.tls_front HOST PORT TARGET_PORT CERT KEY``.

Accepts TLS connections on HOST:PORT and pipes each one, byte for byte, to the hub's proxy on 127.0.0.1:TARGET_PORT
(HTTP and websockets alike: it works below HTTP). Written by hand because the Python ``configurable-http-proxy``
that labkit installs (no Node) refuses its ``--ssl-*`` options ("not supported yet"), and JupyterHub terminates TLS
only in its proxy; this is stdlib ``asyncio`` + ``ssl`` and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import sys


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy ``reader`` to ``writer`` until either side closes."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def serve(host: str, port: int, target_port: int, cert: str, key: str) -> None:
    """Serve until cancelled: TLS on ``host:port`` (certificate ``cert``, key ``key``, PEM) → plain 127.0.0.1."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            target_reader, target_writer = await asyncio.open_connection("127.0.0.1", target_port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, target_writer), _pipe(target_reader, writer))

    server = await asyncio.start_server(handle, host, port, ssl=context)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    """The command line: HOST PORT TARGET_PORT CERT KEY."""
    host, port, target, cert, key = argv if argv is not None else sys.argv[1:]
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(host, int(port), int(target), cert, key))


if __name__ == "__main__":
    main()
