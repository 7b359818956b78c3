"""`kvjax serve`: an OpenAI-compatible HTTP server over one `kvjax.Engine`.

`protocol` (request bodies and responses, pure), `worker` (the engine on its own thread),
`contexts` (compressed contexts as a resource), `metrics` (Prometheus text), `app` (the
Starlette routes), `server` (uvicorn with a draining SIGTERM) and `cli` (the command).
Imported only by the command: `import kvjax` does not load starlette or uvicorn.
"""
