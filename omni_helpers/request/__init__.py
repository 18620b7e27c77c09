"""Building a request and checking it, importing no MindSpore: the shared flags (cli), GenerationSettings
(settings), RequestError (errors), conversations and their media paths (conversation), --conversation and
--requests files (request_files), media checks (media), checkpoint kinds (checkpoint), every check before
weights load (validation), the --parallel mode names (parallel_modes) and a request's Cancellation.
"""
