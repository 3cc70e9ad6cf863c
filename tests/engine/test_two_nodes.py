"""A simulated 2-node job (4 ranks, two hostnames through UTS namespaces) with ``use_node_local_storage``:
each node commits its own copy in its own directory, and by default (``parallel_writers`` left out, which
means "node" there) the two ranks of each node write that node's model-states file together."""

import os
from pathlib import Path

import pytest

from tests.ds_helpers import torchrun_reports

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="naming a host in a UTS namespace needs root")


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    out = tmp_path_factory.mktemp("two_nodes")
    return torchrun_reports(Path(__file__).resolve().parent / "two_node_worker.py", out, 4), out


@pytest.mark.parametrize("mode", ["off", "default"])
def test_each_node_commits_its_own_copy_and_resumes_from_it(reports, mode):
    for report in reports[0]:
        node = report["rank"] // 2
        assert report["host"] == f"node{node}"
        result = report[mode]
        assert result["manifest_hosts"] == [f"node{node}"]
        assert result["manifest_files"] == ["mp_rank_00_model_states.pt",
                                            f"zero_pp_rank_{2 * node}_mp_rank_00_optim_states.pt",
                                            f"zero_pp_rank_{2 * node + 1}_mp_rank_00_optim_states.pt"]
        assert result["load_path"] == str(reports[1] / mode / f"node{node}" / "global_step2" /
                                          "mp_rank_00_model_states.pt")
        assert result["resumed_exactly"], report["rank"]
        # torch.save's records of that rank's state; with "off" only the node's first rank saves it, alone, padding
        # each record to its memory; by default the node's ranks share torch's layout, byte for byte.
        if mode == "off" and report["rank"] % 2:
            assert result["identical"] is None, report["rank"]
        else:
            byte_identical, same_records = result["identical"]
            assert same_records and (byte_identical or mode == "off"), report["rank"]


def test_the_two_ranks_of_each_node_share_the_writing_by_default(reports):
    for first, second in ((0, 1), (2, 3)):
        node = [reports[0][rank]["default"] for rank in (first, second)]
        off = [reports[0][rank]["off"] for rank in (first, second)]
        assert all(result["writes_in_parallel"] for result in node)
        assert not any(result["writes_in_parallel"] for result in off)
        for save in range(2):
            written = [result["written"][save] for result in node]
            assert min(written) / max(written) >= 0.8, written
            alone = [result["written"][save] for result in off]
            assert min(alone) / max(alone) < 0.7, alone
