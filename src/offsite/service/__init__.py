"""The owner service: the two parties exchange bundles over HTTP.

The model owner runs `offsite serve`; a data owner on another machine uses `offsite remote`
(or `offsite.service.client.Client`) to list and download emulator bundles (resumable, verified
against the manifest), upload its adapter bundle (verified, or rejected with one line), start a
plug-in + evaluation job and fetch its report, and query the owner model's representations
(PEMA). Every data owner has its own API tokens and sees only its own uploads and jobs.

Modules: `app` (FastAPI routes), `store` (SQLite state + files written atomically), `auth`
(tokens), `published` (the emulator bundles on offer, HTTP ranges), `uploads` (receiving and
checking adapter bundles), `jobs` (the worker), `representations` (PEMA queries), `server`
(uvicorn on a socket), `client` (standard-library HTTP client).
"""
