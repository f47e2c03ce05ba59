"""Helpers that several test files share (and the tests of the fake upstream itself).

- ``fakeupstream/``: the deterministic OpenAI-compatible upstream (also the benchmark's).
- ``hostileupstream``: a threaded raw server answering with exact bytes, for a gateway process.
- ``rawserver``: a raw server in the test's event loop, for specifications of an HTTP client.
- ``rawhttp``: a raw client, for the attacks no HTTP library would send.
- ``outbound``: driving an upstream client through the seam.
- ``standin``: a stand-in behind the upstream seam, and an in-process ASGI caller.
- ``gatewayproc``, ``proxyprocs``: a real gateway, Nginx or Traefik as a child process.
- ``ports``: the one ``free_port``.
"""
