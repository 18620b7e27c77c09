"""Faster paths: the same results as mindone (with its fixes) in fewer launches and host reads. The
generation loop with one host read per step (decode_loop) and its steps (decode_steps), positions on the host
(host_positions, thinker_prompt), and graphs compiled once per shape (compiled: the Graph and its buckets;
graph_ops: attention, rope, norms and routing as the graphs write them; decode_graph, prompt_graph,
encoder_graph). fast_paths installs them. None of this is imported with --no-fast_paths.
"""
