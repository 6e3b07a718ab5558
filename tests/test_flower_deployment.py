"""End to end: the FIRM ServerApp and ClientApp under Flower's own runtimes, started by `flwr run`.

The other tests call the apps from Python; these run the same apps the way a user does:

* deployment, secured the way docs/deployment.md says: one ``flower-superlink`` with TLS
  (a throw-away CA and server certificate made at test time by ``firm.federation.certificates``)
  and SuperNode authentication (``--enable-supernode-auth``); each of two ``flower-supernode``
  processes has its own key pair, registered with ``flwr supernode register`` before it connects,
  and its own ``partition-id``; then ``flwr run . <connection>`` over TLS. A third SuperNode whose
  key was never registered is refused and gets no work;
* refusal on its own: a SuperNode with an unregistered key, and one with no key at all, are turned
  away by the SuperLink and never appear among its nodes;
* local simulation: ``flwr run . local`` with ``num-supernodes=2``, where ``flwr`` starts a
  managed simulation SuperLink in the background.

The runs train a tiny random Llama for 2 rounds and check the run directory. Everything is isolated:
a temporary ``FLWR_HOME`` (federations, installed FABs, SuperLink state), free loopback ports, and
``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1`` (otherwise the SuperLink reinstalls the app's
dependencies with uv and pulls a CUDA torch). Every process the tests start, and every process
those start, is stopped by process id afterwards, also when a test fails. The helpers (shared with
test_fault_injection.py) are in flower_helpers.py.
"""

from __future__ import annotations

from pathlib import Path

from flower_helpers import (NUM_NODES, SECURE_CONNECTION, TINY_RUN_CONFIG, ProcessTracker, assert_complete_run_dir,
                            assert_no_process_left, assert_refused, flower_env, free_port, list_supernodes,
                            log_tails, make_node_key, processes, processes_mentioning, public_key_base64_line,
                            register_supernode, run_config_args, run_to_completion, run_to_end, skip_without_flower,
                            start_secure_superlink, start_secure_supernode, tiny_policy_dir, wait_until_online,
                            write_flower_config)

pytestmark = skip_without_flower
_FIXTURES = (processes, tiny_policy_dir)  # pytest fixtures from flower_helpers, used by name below


# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------


def test_flwr_run_on_secure_deployment(tmp_path: Path, tiny_policy_dir: Path, processes: ProcessTracker) -> None:
    """TLS + SuperNode authentication end to end: two registered SuperNodes train, an unregistered
    one is refused and gets no work, and the FIRM run completes over TLS."""
    run_dir, keys_dir = tmp_path / "run", tmp_path / "node-keys"
    link, _ = start_secure_superlink(tmp_path, processes)
    # Each SuperNode owns a key pair; the operator registers the public halves before the nodes connect.
    keys = [make_node_key(keys_dir, f"supernode-{i}") for i in range(NUM_NODES)]
    node_ids = [register_supernode(link, key) for key in keys]
    assert list_supernodes(link) == {node_id: "registered" for node_id in node_ids}

    logs = [link.log]
    for partition_id, key in enumerate(keys):
        _, log = start_secure_supernode(link, f"supernode-{partition_id}", partition_id, key, processes)
        logs.append(log)
    intruder_key = make_node_key(keys_dir, "intruder")  # a valid key pair, never registered
    intruder, intruder_log = start_secure_supernode(link, "intruder", 0, intruder_key, processes)
    assert_refused(intruder, intruder_log, "Failed to activate SuperNode")
    wait_until_online(link, node_ids, logs)
    assert set(list_supernodes(link)) == set(node_ids), "the intruder must not be a node of the federation"

    run_to_completion(SECURE_CONNECTION, run_config_args(run_dir, tiny_policy_dir), link.env, tmp_path, logs)

    # every round's work went to the two registered nodes (the intruder has no node id at all)
    assert_complete_run_dir(run_dir, tiny_policy_dir, node_ids=set(node_ids))
    assert "Uvicorn running on https://127.0.0.1" in link.log.read_text(errors="replace")
    assert processes.stop() == []
    assert_no_process_left(tmp_path)


def test_supernode_whose_key_is_not_registered_is_refused(tmp_path: Path, processes: ProcessTracker) -> None:
    """With ``--enable-supernode-auth`` the SuperLink admits only registered keys: a node with an
    unregistered key is refused at activation, a node without a key cannot register itself, both
    exit, and neither becomes a node of the federation (no node id, so no message is ever sent to it)."""
    keys_dir = tmp_path / "node-keys"
    link, _ = start_secure_superlink(tmp_path, processes)
    registered_id = register_supernode(link, make_node_key(keys_dir, "registered"))  # admitted, never started
    unregistered_key = make_node_key(keys_dir, "unregistered")

    with_key, with_key_log = start_secure_supernode(link, "unregistered", 0, unregistered_key, processes)
    without_key, without_key_log = start_secure_supernode(link, "no-key", 1, None, processes)
    assert_refused(with_key, with_key_log, "[code: 2004] Failed to activate SuperNode")
    assert_refused(without_key, without_key_log, "[code: 2001] SuperNode authentication is enabled")

    # the SuperLink says why, naming the refused key
    superlink_log = link.log.read_text(errors="replace").splitlines()
    refusals = [line for line in superlink_log if "No SuperNode found with the given public key" in line]
    assert len(refusals) == 1 and public_key_base64_line(unregistered_key) in refusals[0], log_tails([link.log])
    assert any("/v1/fleet/register-node" in line and "ApiError:2001" in line for line in superlink_log)
    # the federation holds the one registered node, never online; the refused nodes are not in it
    assert list_supernodes(link) == {registered_id: "registered"}
    assert processes.stop() == []
    assert_no_process_left(tmp_path)


def test_flwr_run_on_local_simulation(tmp_path: Path, tiny_policy_dir: Path, processes: ProcessTracker) -> None:
    flwr_home, run_dir = tmp_path / "flwr-home", tmp_path / "run"
    write_flower_config(flwr_home, {"local": {"address": ":local:"}})
    # `flwr` starts the managed local SuperLink on these ports (defaults 39091/39093, shared by
    # everyone on the machine): free ones keep this test off other users' SuperLinks.
    # a local simulation's nodes have no node config: their process environment gives the consents
    # to load the tiny policy the server names and to keep their state in its run directory
    env = flower_env(flwr_home, FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()),
                     FLWR_LOCAL_CONTROL_API_PORT=str(free_port()),
                     FIRM_NODE_ALLOW="allow-server-models,allow-server-run-dir")
    superlink_log = flwr_home / "local-superlink" / "superlink.log"

    try:
        run_to_completion("local", [*run_config_args(run_dir, tiny_policy_dir),
                                    "--federation-config", f"num-supernodes={NUM_NODES}"], env, tmp_path, [superlink_log])
    finally:
        # The managed SuperLink is detached and outlives `flwr run`; its command line names the
        # log file under our temporary FLWR_HOME, which is how we find its id.
        for pid in processes_mentioning(str(flwr_home)):
            processes.add(pid)
    assert processes.roots, "flwr run left no local SuperLink under the temporary FLWR_HOME to stop"
    assert_complete_run_dir(run_dir, tiny_policy_dir)
    # Flower's log of the run: each round's rewards, KL and lambda, no dump of every setting
    log = (tmp_path / "flwr-run.log").read_text(errors="replace")
    assert "'reward/relevance'" in log and "'lambda/civility'" in log and "'kl'" in log, log_tails([tmp_path / "flwr-run.log"])
    assert "FIRM settings, as in" in log and "kl_in_objectives" not in log
    assert "FutureWarning" not in log
    assert processes.stop() == []
    assert_no_process_left(tmp_path)


def test_flwr_run_with_a_bad_value_fails_the_run_with_one_line(tmp_path: Path, tiny_policy_dir: Path,
                                                               processes: ProcessTracker) -> None:
    """A bad run-config value stops the ServerApp before anything is written: one log line naming
    the key, no traceback, and the run finishes as failed (its ServerApp exits non-zero)."""
    flwr_home, run_dir = tmp_path / "flwr-home", tmp_path / "run"
    write_flower_config(flwr_home, {"local": {"address": ":local:"}})
    env = flower_env(flwr_home, FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()),
                     FLWR_LOCAL_CONTROL_API_PORT=str(free_port()))
    try:
        run = run_to_end("local", [*run_config_args(run_dir, tiny_policy_dir, f"{TINY_RUN_CONFIG} beta=-1.0"),
                                   "--federation-config", f"num-supernodes={NUM_NODES}"], env, tmp_path)
    finally:
        for pid in processes_mentioning(str(flwr_home)):
            processes.add(pid)
    assert run["status"] == "finished:failed", run
    log = (tmp_path / "flwr-run.log").read_text(errors="replace")
    lines = [line for line in log.splitlines() if "run config: beta must be >= 0, got -1.0" in line]
    assert len(lines) == 1 and "FIRM run refused: run config: beta must be >= 0, got -1.0" in lines[0], log
    assert "Traceback" not in log
    assert not run_dir.exists()
    assert processes.stop() == []
    assert_no_process_left(tmp_path)
