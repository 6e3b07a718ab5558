"""Fault injection on a real deployment on loopback.

Both tests run the secure deployment of test_flower_deployment.py (TLS, SuperNode authentication,
every node's key registered before it connects), each SuperNode with its own ``state-dir`` where its
ClientApp keeps the client state between rounds, and kill processes with SIGKILL:

* ``test_two_supernodes_killed_mid_round``: 6 SuperNodes, ``num-clients=6 min-clients=4``. Once the
  two victims have received their round-1 message (their ClientApps are running), both SuperNodes
  are killed with their ClientApps. The SuperLink answers their messages with "Node Unavailable"
  once they miss their heartbeats (2 x 30 s); round 1 completes with the 4 others, its record names
  the 2 dead nodes with the reason in ``failed``; round 2 waits ``node-wait`` seconds for 6 nodes,
  finds 4 connected and runs with them.
* ``test_superlink_killed_mid_run_and_the_run_resumes``: the SuperLink keeps its state in a SQLite
  ``--database`` file. Once round 1 is written to the run directory and both nodes have pulled their
  round-2 message (their ClientApps are training), the SuperLink is killed with the SuperExec and
  the ServerApp it started. A new SuperLink process on the same port, certificates and database
  finds the node registrations there (same node ids, so node authentication stays on); the
  SuperNodes, which retry without limit, reconnect by themselves; the same run (same run config and
  run-dir) is submitted again as a new Flower run and resumes after its last completed round: rounds
  1..N are in metrics.jsonl exactly once, and each client continues its state (the running reward
  statistics count keeps growing from where round 1 left it, not from an orphaned round-2 state).
  Flower cannot continue the killed run itself: its ServerApp process is gone, and the restarted
  SuperLink marks that run ``finished:failed``; FIRM's resume is the run directory's.
* ``test_superlink_restarted_without_database_forgets_its_nodes``: the limitation that makes
  ``--database`` necessary: an in-memory SuperLink restarted under authentication has no record of
  the nodes; it answers them with 401 and they exit.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import psutil

from flower_helpers import (PRESET, REPO_ROOT, SCRIPTS_DIR, SECURE_CONNECTION, TINY_SIZES, ProcessTracker,
                            SecureSuperLink, assert_no_process_left, flwr, list_supernodes, log_tails, make_node_key,
                            processes, register_supernode, run_config_args, skip_without_flower,
                            start_secure_superlink, start_secure_supernode, tiny_policy_dir, wait_until_online)

pytestmark = skip_without_flower
_FIXTURES = (processes, tiny_policy_dir)  # pytest fixtures from flower_helpers, used by name below

# Generous: 6 SuperNodes each start a ClientApp process (torch, transformers, MiniLM) per round on
# 2 busy cores. A round does not wait for the timeout when the dead nodes' "Node Unavailable"
# errors arrive (about 60 s after the kill): it is only the bound.
ROUND_TIMEOUT_S = 480
NODE_WAIT_S = 15  # round 2 waits this long for the 6th node before it samples the 4 connected ones
RUN_TIMEOUT_S = 1500.0
EVENT_TIMEOUT_S = 900.0  # a round-1 message reaching a node, round 1 reaching the run directory


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------


def kill_tree(pid: int) -> list[int]:
    """SIGKILL a process and every process under it (collected first: Flower detaches its children
    into new sessions); return their ids. A crash, not a shutdown: nothing gets to clean up."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=15)
    return [proc.pid for proc in procs]


def wait_for(condition, what: str, logs: list[Path], timeout: float = EVENT_TIMEOUT_S, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"{what} did not happen within {timeout:.0f} s\n{log_tails(logs)}")


def train_messages_received(log: Path) -> int:
    """Train messages the SuperNode pulled: it logs each before it starts its ClientApp."""
    return log.read_text(errors="replace").count("Receiving: train message") if log.exists() else 0


def submit(link: SecureSuperLink, args: list[str], log: Path, stream: bool) -> subprocess.Popen:
    """``flwr run`` of this app in the background; with ``--stream`` it returns once the run ends."""
    with log.open("w") as out:
        return subprocess.Popen([str(SCRIPTS_DIR / "flwr"), "run", str(REPO_ROOT), SECURE_CONNECTION,
                                 *(["--stream"] if stream else []), *args],
                                env=link.env, cwd=link.cwd, stdout=out, stderr=subprocess.STDOUT)


def wait_for_run(process: subprocess.Popen, log: Path, logs: list[Path]) -> None:
    try:
        process.wait(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError(f"flwr run did not finish within {RUN_TIMEOUT_S:.0f} s\n{log_tails([log, *logs])}") from None
    assert process.returncode == 0, f"flwr run exited {process.returncode}\n{log_tails([log, *logs])}"


def runs(link: SecureSuperLink) -> dict[int, str]:
    """``flwr ls``: run id -> status (e.g. finished:completed)."""
    return {int(r["run-id"]): r["status"]
            for r in json.loads(flwr(["ls", SECURE_CONNECTION, "--format", "json"], link.env, link.cwd))["runs"]}


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def completed_rounds(run_dir: Path) -> int:
    try:
        return int(json.loads((run_dir / "state.json").read_text())["completed_rounds"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def saved_state(state_dir: Path) -> dict[int, float]:
    """A client's saved states: round -> running reward-statistics count (rows seen so far)."""
    from firm.federation.client_state import STATE_FILE_PATTERN

    found = {}
    for path in sorted(state_dir.glob("round-*.safetensors")) if state_dir.is_dir() else []:
        if (match := STATE_FILE_PATTERN.fullmatch(path.name)):
            data = path.read_bytes()
            header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
            found[int(match.group(1))] = float(header["__metadata__"]["reward_count"])
    return found


def deploy(tmp_path: Path, processes: ProcessTracker, num_nodes: int, database: Path | None = None):
    """A secure SuperLink and ``num_nodes`` registered SuperNodes, each with its own state-dir.
    Returns the link, the SuperLink process, node ids, SuperNode processes, logs, state dirs."""
    link, superlink = start_secure_superlink(tmp_path, processes, database=database)
    keys = [make_node_key(tmp_path / "node-keys", f"supernode-{i}") for i in range(num_nodes)]
    node_ids = [register_supernode(link, key) for key in keys]
    state_dirs = [tmp_path / "node-state" / f"supernode-{i}" for i in range(num_nodes)]
    nodes, logs = [], []
    for i, key in enumerate(keys):
        process, log = start_secure_supernode(link, f"supernode-{i}", i, key, processes, num_partitions=num_nodes,
                                              node_config=f'state-dir="{state_dirs[i]}"')
        nodes.append(process)
        logs.append(log)
    wait_until_online(link, node_ids, [link.log, *logs])
    return link, superlink, node_ids, nodes, logs, state_dirs


def settings(num_nodes: int, num_rounds: int, min_clients: int) -> str:
    return (f"num-clients={num_nodes} num-rounds={num_rounds} min-clients={min_clients} "
            f"round-timeout={ROUND_TIMEOUT_S} node-wait={NODE_WAIT_S} {TINY_SIZES}")


# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------


def test_two_supernodes_killed_mid_round(tmp_path: Path, tiny_policy_dir: Path, processes: ProcessTracker) -> None:
    num_nodes, victims = 6, (4, 5)
    run_dir = tmp_path / "run"
    link, _, node_ids, nodes, logs, state_dirs = deploy(tmp_path, processes, num_nodes)
    all_logs = [link.log, *logs]

    run_log = tmp_path / "flwr-run.log"
    run = submit(link, run_config_args(run_dir, tiny_policy_dir, settings(num_nodes, 2, min_clients=4)), run_log,
                 stream=True)
    # mid-round: both victims have pulled their round-1 message and started its ClientApp
    wait_for(lambda: all(train_messages_received(logs[i]) >= 1 for i in victims), "round 1 reaching the victims",
             all_logs)
    assert completed_rounds(run_dir) == 0
    killed_at = time.monotonic()
    for i in victims:
        assert kill_tree(nodes[i].pid), f"supernode-{i} was not running"
    wait_for_run(run, run_log, all_logs)
    duration_after_kill = time.monotonic() - killed_at

    assert set(runs(link).values()) == {"finished:completed"}, log_tails([run_log], 60)
    records = metrics(run_dir)
    dead = {node_ids[i] for i in victims}
    alive = set(node_ids) - dead
    for round_number in (1, 2):
        clients = [r for r in records if r["type"] == "client" and r["round"] == round_number]
        [round_record] = [r for r in records if r["type"] == "round" and r["round"] == round_number]
        assert {c["node_id"] for c in clients} == alive and len(clients) == 4, (round_number, clients)
        assert sorted(c["partition-id"] for c in clients) == [0, 1, 2, 3]
        assert round_record["clients"] == 4 and round_record["rejected"] == [], round_record
        if round_number == 1:  # the two dead nodes, each with why
            assert {f["node_id"] for f in round_record["failed"]} == dead, round_record["failed"]
            for failure in round_record["failed"]:
                assert ("Node Unavailable" in failure["reason"]
                        or "no reply within round_timeout" in failure["reason"]), failure
        else:  # round 2 sampled the 4 connected nodes only: nobody failed
            assert round_record["failed"] == [], round_record["failed"]
    assert not [r for r in records if r["type"] == "round-failed"]
    assert completed_rounds(run_dir) == 2
    assert (run_dir / "adapters" / "round-002" / "adapter_model.safetensors").is_file()
    # the live clients kept their state on their own node: rows seen 2 per round
    for i in range(4):
        assert saved_state(state_dirs[i]) == {1: 2.0, 2: 4.0}, (i, saved_state(state_dirs[i]))
    print(f"\nround 1 failures: {[r for r in records if r['type'] == 'round'][0]['failed']}; "
          f"run finished {duration_after_kill:.0f} s after the kill")

    assert processes.stop() == []
    assert_no_process_left(tmp_path)


def test_superlink_killed_mid_run_and_the_run_resumes(tmp_path: Path, tiny_policy_dir: Path,
                                                      processes: ProcessTracker) -> None:
    num_nodes, num_rounds = 2, 3
    run_dir, database = tmp_path / "run", tmp_path / "superlink.sqlite"
    link, superlink, node_ids, nodes, logs, state_dirs = deploy(tmp_path, processes, num_nodes, database=database)
    args = run_config_args(run_dir, tiny_policy_dir, settings(num_nodes, num_rounds, min_clients=num_nodes))

    first_log = tmp_path / "flwr-run-1.log"
    first = submit(link, args, first_log, stream=False)  # returns once the run is submitted
    # mid-run and mid-round: round 1 is in the run directory and both nodes run round 2's ClientApp
    wait_for(lambda: completed_rounds(run_dir) >= 1 and all(train_messages_received(log) >= 2 for log in logs),
             "round 2 reaching the nodes", [first_log, link.log, *logs], every=0.5)
    killed = kill_tree(superlink.pid)  # the SuperLink, its SuperExec and the ServerApp
    done_at_kill = completed_rounds(run_dir)
    assert len(killed) >= 3, f"expected SuperLink, SuperExec and ServerApp, killed {killed}"
    assert done_at_kill == 1, done_at_kill
    assert first.wait(timeout=60) == 0, log_tails([first_log])
    states_at_kill = [saved_state(d) for d in state_dirs]
    assert all(state[1] == 2.0 for state in states_at_kill), states_at_kill  # round 1: 2 rows seen
    # The orphaned round-2 ClientApps may still finish and save a round-2 state that no server ever
    # aggregated; the resumed round 2 must start from round 1's state regardless (checked below).

    # the same SuperLink again: its port, certificates and database
    link, _ = start_secure_superlink(tmp_path, processes, database=database, restart=link,
                                     log_name="superlink-restarted.log")
    assert set(list_supernodes(link)) == set(node_ids), "the node registrations survive in the database"
    # the SuperNodes reconnect by themselves (the database may still call them online from before
    # the kill: that they reconnected shows in the resumed run, which they serve)
    wait_until_online(link, node_ids, [link.log, *logs])
    assert all(node.poll() is None for node in nodes)

    second_log = tmp_path / "flwr-run-2.log"
    wait_for_run(submit(link, args, second_log, stream=True), second_log, [link.log, *logs])

    statuses = runs(link)
    # the resumed run completed; the killed one did not (Flower marks it failed once its ServerApp's
    # task token expires)
    assert len(statuses) == 2 and list(statuses.values()).count("finished:completed") == 1, statuses
    records = metrics(run_dir)
    round_numbers = [r["round"] for r in records if r["type"] == "round"]
    assert round_numbers == list(range(1, num_rounds + 1)), round_numbers  # none lost, none repeated
    for round_number in range(1, num_rounds + 1):
        clients = [r for r in records if r["type"] == "client" and r["round"] == round_number]
        assert sorted(c["node_id"] for c in clients) == sorted(node_ids), (round_number, clients)
    assert not [r for r in records if r["type"] not in ("client", "round")], records
    state = json.loads((run_dir / "state.json").read_text())
    assert state["completed_rounds"] == num_rounds and "error" not in state, state
    # each client continued its own state: round 3 saw 2 rows per round since round 1 (a fresh
    # start at the resume would give 2 or 4), and the last two rounds' files are kept
    for i, state_dir in enumerate(state_dirs):
        assert saved_state(state_dir) == {num_rounds - 1: 2.0 * (num_rounds - 1), num_rounds: 2.0 * num_rounds}, \
            (i, saved_state(state_dir))
    print(f"\nkilled at {done_at_kill} completed round(s), round 2 running on the nodes: processes {killed}; "
          f"node states at the kill {states_at_kill}; runs after restart {statuses}")

    assert processes.stop() == []
    assert_no_process_left(tmp_path)


def test_superlink_restarted_without_database_forgets_its_nodes(tmp_path: Path, processes: ProcessTracker) -> None:
    """Why the SuperLink needs ``--database`` to survive a restart with node authentication on: in
    memory, the registered keys and node ids die with the process. The restarted SuperLink answers
    the reconnecting node's requests with HTTP 401, and the SuperNode gives up and exits (Flower
    1.42 logs the 401 and "SuperNode terminated gracefully"; exit code 0 here): the operator must register its key
    again and restart it."""
    link, superlink = start_secure_superlink(tmp_path, processes)
    key = make_node_key(tmp_path / "node-keys", "supernode-0")
    node_id = register_supernode(link, key)
    node, log = start_secure_supernode(link, "supernode-0", 0, key, processes, num_partitions=1)
    wait_until_online(link, [node_id], [link.log, log])

    kill_tree(superlink.pid)
    link, _ = start_secure_superlink(tmp_path, processes, restart=link, log_name="superlink-restarted.log")
    assert list_supernodes(link) == {}, "an in-memory SuperLink starts without any node"
    try:
        node.wait(timeout=EVENT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the SuperNode kept running\n{log_tails([log, link.log])}") from None
    assert "SuperNode terminated gracefully" in log.read_text(errors="replace"), log_tails([log])
    # its first request after the restart (a heartbeat or a pull, whichever comes first) is refused
    assert re.search(r'"POST /v1/fleet/\S+ HTTP/1.1" 401', link.log.read_text(errors="replace")), log_tails([link.log])
    assert list_supernodes(link) == {}
    assert processes.stop() == []
    assert_no_process_left(tmp_path)
