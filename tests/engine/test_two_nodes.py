"""A simulated 2-node job (4 ranks, two hostnames through UTS namespaces) with ``use_node_local_storage``:
each node commits its own copy in its own directory, and by default (``parallel_writers`` left out, which
means "node" there) the two ranks of each node write that node's model-states file together."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="naming a host in a UTS namespace needs root")


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    out = tmp_path_factory.mktemp("two_nodes")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4",
                             "--master_port", "0", "--rdzv_backend", "c10d", "--rdzv_endpoint", "127.0.0.1:0",
                             str(REPO / "tests" / "engine" / "two_node_worker.py"), str(out)],
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(4)], out


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
        # What one writer alone writes from that rank's state; with "off" only the node's first rank saves it.
        assert result["identical"] is (True if mode == "default" or report["rank"] % 2 == 0 else None), report["rank"]


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
