"""A checkpoint outlives its node: a job replicates, a save_dir is lost, the next job resumes from the remote tier.

The simulated two-node job (4 ranks, two hostnames, ``use_node_local_storage``) loses one node's save_dir, then
both; a 2-rank job on one shared save_dir loses it. Every rank resumes bit-exactly (parameters, optimizer states,
client_state) from what it saved.
"""

import os
import shutil

import pytest

from ds_fastckpt.format.names import MANIFEST_NAME
from tests.ds_helpers import torchrun_reports
from tests.remote.replicas import store_of
from ds_fastckpt.remote.catalog import read_catalog

WORKER = __import__("pathlib").Path(__file__).resolve().parent / "node_loss_worker.py"


def run(out, ranks, phase, url, seaweed, nodes, monkeypatch):
    monkeypatch.setenv("NODE_LOSS_PHASE", phase)
    monkeypatch.setenv("NODE_LOSS_URL", url)
    monkeypatch.setenv("NODE_LOSS_ENDPOINT", seaweed.endpoint_url if url.startswith("s3://") else "")
    monkeypatch.setenv("NODE_LOSS_NODES", str(nodes))
    for name, value in seaweed.env().items():
        monkeypatch.setenv(name, value)
    return torchrun_reports(WORKER, out, ranks)


@pytest.mark.skipif(os.geteuid() != 0, reason="naming a host in a UTS namespace needs root")
@pytest.mark.parametrize("lost", [["node1"], ["node0", "node1"]])
def test_two_nodes_resume_from_the_remote_tier_after_losing_their_disks(tmp_path, s3_url, seaweed, monkeypatch, lost):
    run(tmp_path, 4, "save", s3_url, seaweed, 2, monkeypatch)
    assert sorted(read_catalog(store_of(s3_url, seaweed)).complete) == ["global_step1", "global_step2"]
    for node in lost:
        shutil.rmtree(tmp_path / node)
    reports = run(tmp_path, 4, "resume", s3_url, seaweed, 2, monkeypatch)
    for report in reports:
        assert report["path"].endswith("global_step2/mp_rank_00_model_states.pt"), report
        assert report["epoch"] == 2 and report["resumed_exactly"], report
    for node in lost:  # restored and committed locally
        assert (tmp_path / node / "global_step2" / MANIFEST_NAME).is_file()


def test_two_ranks_on_one_save_dir_resume_from_the_remote_tier(tmp_path, remote_url, seaweed, monkeypatch):
    run(tmp_path, 2, "save", remote_url, seaweed, 1, monkeypatch)
    shutil.rmtree(tmp_path / "shared")
    reports = run(tmp_path, 2, "resume", remote_url, seaweed, 1, monkeypatch)
    for report in reports:
        assert report["path"].endswith("global_step2/mp_rank_00_model_states.pt"), report
        assert report["epoch"] == 2 and report["resumed_exactly"], report
        assert report["local_tags"] == ["global_step2"]
