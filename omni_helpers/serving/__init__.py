"""web_demo.py's pieces: the engine that runs one request at a time on every rank (engine), jobs
broadcast from rank 0 (lockstep), Chat Completions bodies to requests and back (openai_api), the HTTP routes
(http_api) and the Gradio UI (web_ui).
"""
