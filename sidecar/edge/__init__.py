"""The client side of the data plane: the sidecar's own HTTP/1.1 server on uvloop and httptools.

    protocol.py   one asyncio.Protocol per client connection: parsing, limits, timers,
                  keep-alive, pipelining, flow control; EdgeServer, the listener
    body.py       a request body as it arrives, with back-pressure
    handler.py    a parsed request -> route -> policy chain -> response
    responses.py  responses as bytes, and the one place a SidecarError becomes HTTP
    upgrade.py    a 101 joins the client and upstream connections byte for byte
    eager.py      runs a request's coroutine without a task until it has to wait

docs/architecture.md says why the edge is written here rather than on a web framework.
"""
