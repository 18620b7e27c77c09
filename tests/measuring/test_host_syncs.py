"""Counting reads of tensor values on the host (omni_helpers/measuring/host_syncs.py), and what both
counters (host reads, collective bytes) share: built once, installed only while a block counts."""

from __future__ import annotations

from omni_helpers.measuring import collectives, host_syncs
from omni_helpers.measuring.collectives import counting_collectives
from omni_helpers.measuring.host_syncs import counting_host_syncs


def test_nested_blocks_each_count_their_reads_and_the_outermost_puts_the_methods_back(runtime_cpu):
    import mindspore as ms

    original = ms.Tensor.asnumpy
    tensor = ms.Tensor([1.5, 2.5])
    with counting_host_syncs() as outer:
        tensor.asnumpy()
        with counting_host_syncs() as inner:
            assert tensor[0].item() == 1.5
            assert tensor.tolist() == [1.5, 2.5]
        assert ms.Tensor.asnumpy is not original  # the outer block still counts
        float(tensor[1])
    assert (outer.count, inner.count) == (4, 2)
    assert sum(outer.sites.values()) == 4 and all(site.startswith(__file__) for site in outer.sites)
    assert ms.Tensor.asnumpy is original
    tensor.asnumpy()
    assert outer.count == 4


def test_the_counters_are_built_once_so_another_mindspore_is_warned_about_once(runtime_cpu, monkeypatch, capsys):
    for counters in (collectives.COUNTERS, host_syncs.COUNTERS):
        monkeypatch.setattr(counters, "installed_version", lambda: "2.9.0")
        monkeypatch.setattr(counters, "_version_checked", False)
    for _ in range(3):  # three requests
        with counting_collectives(), counting_host_syncs():
            pass
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2 and all("this is 2.9.0" in line for line in warnings)
