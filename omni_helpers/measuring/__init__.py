"""Figures, returned as values: run and answer metrics (metrics), bytes moved by collectives (collectives)
and reads from the device to the host (host_syncs), each counter installed only while it counts, and listeners
on a cell's forwards (forward_taps).
"""
