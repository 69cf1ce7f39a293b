"""`absorber serve`: an OpenAI-compatible HTTP server whose sessions absorb what leaves their window.

app.py (routes), schemas.py (request bodies), errors.py (OpenAI-style error bodies), prompts.py
(chat and completion prompts as token ids), worker.py (the thread that owns the engine), sessions.py
(conversations and their matching), state.py (memory files in the state directory), sse.py
(streaming), options.py and launch.py (the command, and a background server for tests).
Nothing is imported here, so the CLI can read the options without loading FastAPI.
"""
