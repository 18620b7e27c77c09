"""Answers out of the process: printed and filed per request or batch (answering), written whole or not at
all (files: results.jsonl, JSON, WAV).
"""
