"""What the compiled graphs share (omni_helpers/mindone_changes/faster/compiled.py): buckets and the graphs kept per model."""

from __future__ import annotations

import types

from omni_helpers.mindone_changes.faster import compiled


def test_counts_are_padded_to_power_of_two_buckets():
    assert compiled.bucket_for(1) == compiled.BUCKET_MIN
    assert compiled.bucket_for(compiled.BUCKET_MIN + 1) == 2 * compiled.BUCKET_MIN
    assert compiled.bucket_for(250) == 256 and compiled.bucket_for(256) == 256 and compiled.bucket_for(1000) == 1024
    assert compiled.bucket_for(3, least=1) == 4 and compiled.bucket_for(1, least=1) == 1


def test_the_latest_graphs_of_a_kind_are_kept_and_reused():
    owner, built = types.SimpleNamespace(), []

    def build(key):
        built.append(key)
        return f"graph {key}"

    for key in [(1,), (2,), (1,), (3,), (2,)]:
        assert compiled.kept(owner, "test_graph", key, lambda: build(key)) == f"graph {key}"
    assert built == [(1,), (2,), (3,), (2,)]  # (1,) reused while kept; (2,) dropped by (3,) and built again
    assert list(owner.__dict__["_test_graphs"]) == [(3,), (2,)][-compiled.GRAPHS_KEPT :]
