"""Spreading the model over msrun's ranks beyond what mindone's ZeRO-3 does: each rank's block of experts
and the partial outputs all-reduced (expert_parallel), and the MoE forward on stacked experts that every mode
decodes with (sparse_moe). The mode names live in request.parallel_modes, so that flags can name them.
"""
