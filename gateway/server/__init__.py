"""The server side of a client connection: the HTTP/1.1 protocol uvicorn runs, with its caps."""
