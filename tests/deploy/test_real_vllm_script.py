"""scripts/real_vllm.py without vLLM: process-tree stopping on stand-in process trees, CPU binding, records."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scripts import real_vllm
from scripts.real_vllm import Server

# A parent with two children (like vLLM's API server, engine core and worker), in its own session.
TREE = "sleep 60 & sleep 60 & wait"
# The same, deaf to SIGTERM (an ignored signal stays ignored across exec, so the children are deaf too).
DEAF_TREE = "trap '' TERM; sleep 60 & sleep 60 & wait"


def start_tree(script: str, tmp_path: Path) -> Server:
    proc = subprocess.Popen(["bash", "-c", script], start_new_session=True)
    server = Server("vllm-0", "http://127.0.0.1:0", proc.pid, "tiny", 1, str(tmp_path / "vllm-0.log"), proc)
    deadline = time.monotonic() + 10
    while len(real_vllm.process_tree(proc.pid)) < 3:
        assert time.monotonic() < deadline, f"stand-in tree never grew: {real_vllm.process_tree(proc.pid)}"
        time.sleep(0.02)
    return server


@pytest.mark.parametrize("script", [TREE, DEAF_TREE], ids=["obeys-sigterm", "ignores-sigterm"])
def test_stop_server_leaves_no_process_of_the_tree(script: str, tmp_path: Path) -> None:
    server = start_tree(script, tmp_path)
    tree = real_vllm.process_tree(server.pid)
    assert len(tree) == 3 and server.pid in tree, tree
    real_vllm.stop_server(server, timeout_s=0.5)
    alive = {pid for pid in tree if real_vllm._alive(pid)}
    assert alive == set(), f"still alive after stop: {alive}"
    assert server.process is not None and server.process.returncode is not None, "the API server was not reaped"


def test_stop_server_removes_the_record(tmp_path: Path) -> None:
    server = start_tree(TREE, tmp_path)
    record = tmp_path / "vllm-0.json"
    record.write_text("{}")
    real_vllm.stop_server(server)
    assert not record.exists()


def test_records_round_trip_without_the_process_handle() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    server = Server("vllm-8100", "http://127.0.0.1:8100", proc.pid, "smollm2", 2, "/tmp/x.log", proc)
    record = server.record()
    assert "process" not in record
    again = Server(**record)  # type: ignore[arg-type]
    assert again == server and again.process is None


@pytest.mark.parametrize(
    ("dp_size", "first_cpu", "cpus", "expected"),
    [
        (1, 0, [0, 1], "0"),
        (2, 0, [0, 1], "0|1"),  # one CPU per DP rank
        (1, 1, [0, 1], "1"),  # the second single-rank server of --count 2
        (4, 0, [0, 1], "0|1|0|1"),  # more ranks than CPUs: cyclic
        (2, 2, [4, 6, 9], "9|4"),  # ids as the affinity mask gives them
    ],
)
def test_cpu_binding_spreads_dp_ranks_over_cpus(dp_size: int, first_cpu: int, cpus: list[int], expected: str) -> None:
    assert real_vllm.cpu_binding(dp_size, first_cpu, cpus) == expected


def test_model_dir_rejects_unknown_models() -> None:
    with pytest.raises(ValueError, match="unknown model 'gpt-5'"):
        real_vllm.model_dir("gpt-5")


@pytest.mark.parametrize(("role", "kv_role"), [("prefill", "kv_producer"), ("decode", "kv_consumer")])
def test_a_pd_server_runs_nixl_in_cpu_memory_as_its_side_of_the_pair(role: str, kv_role: str) -> None:
    flag, config = real_vllm.kv_transfer_args("nixl", role)
    assert flag == "--kv-transfer-config"
    assert json.loads(config) == {"kv_connector": "NixlConnector", "kv_role": kv_role, "kv_buffer_device": "cpu"}


def test_kv_transfer_args_refuse_other_connectors_and_roles() -> None:
    with pytest.raises(ValueError, match="unknown KV connector 'mooncake'"):
        real_vllm.kv_transfer_args("mooncake", "prefill")
    with pytest.raises(ValueError, match="a prefill or a decode server, not 'mixed'"):
        real_vllm.kv_transfer_args("nixl", "mixed")


def test_launch_says_what_to_run_when_nothing_is_installed(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="scripts/real-vllm install"):
        real_vllm.launch("tiny", root=tmp_path)


def test_engine_processes_run_at_lower_priority_than_every_other_session() -> None:
    """With autogroup scheduling a process's niceness weighs only within its session: the server's own session
    must be niced too, or vLLM's CPU kernels starve the gateway however niced the processes are."""
    proc = subprocess.Popen(["sleep", "30"], start_new_session=True, preexec_fn=real_vllm._lower_priority)
    try:
        assert os.getpriority(os.PRIO_PROCESS, proc.pid) == real_vllm.ENGINE_NICE
        autogroup = Path(f"/proc/{proc.pid}/autogroup")
        if Path("/proc/self/autogroup").exists():
            assert autogroup.read_text().split()[-1] == str(real_vllm.ENGINE_NICE), autogroup.read_text()
            assert autogroup.read_text() != Path("/proc/self/autogroup").read_text(), "not a session of its own"
    finally:
        proc.kill()
        proc.wait()
