"""The generation call: conversations and settings in, answers out (core), with the inputs moved to
MindSpore (inputs), streamed text (streaming) and streamed speech (speech_stream).
"""
