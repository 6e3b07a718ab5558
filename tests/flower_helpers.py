"""Shared helpers of the tests that run FIRM under Flower's own runtimes (test_flower_deployment.py,
test_fault_injection.py): free loopback ports, an isolated FLWR_HOME and CLI connection, the
``flwr`` CLI, a SuperLink with TLS and SuperNode authentication, SuperNodes with their own keys,
process tracking by process id, log tails, and the fixtures ``tiny_policy_dir`` and ``processes``
(import them into a test module to use them).
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import psutil  # a dependency of peft
import pytest

from firm.federation.certificates import NodeKeyFiles, TlsFiles, make_node_key, make_tls_certificates

REPO_ROOT = Path(__file__).resolve().parents[1]
# flwr starts `flower-superlink` / `flower-superexec` / `flwr-serverapp` by name, so the directory of
# this interpreter's console scripts goes first on PATH.
SCRIPTS_DIR = Path(sys.executable).parent
FLOWER_EXECUTABLES = ("flwr", "flower-superlink", "flower-supernode", "flower-superexec")
NUM_NODES = 2
NUM_ROUNDS = 2
# Tiny on purpose: both runtimes start a fresh Python process per ClientApp message (import torch,
# transformers, MiniLM for the relevance reward), which dominates the run time.
TINY_SIZES = "rollout-batch-size=2 max-new-tokens=4 ppo-epochs=1 num-minibatches=1 max-prompt-tokens=32"
TINY_RUN_CONFIG = f"num-clients={NUM_NODES} num-rounds={NUM_ROUNDS} {TINY_SIZES}"
PRESET = "simple-rewards"  # rewards = relevance,civility: offline, no fitted weights needed
STARTUP_TIMEOUT_S = 60.0
REFUSAL_TIMEOUT_S = 90.0  # a refused SuperNode exits after one failed activation (~10 s here, imports included)
RUN_TIMEOUT_S = 600.0  # measured here: ~45 s (simulation), 75-240 s (secure deployment, whole test) on 2 busy cores


def missing_executables() -> list[str]:
    return [name for name in FLOWER_EXECUTABLES if not (SCRIPTS_DIR / name).is_file()]


# Every test module that uses these sets `pytestmark = skip_without_flower`.
skip_without_flower = pytest.mark.skipif(
    bool(missing_executables()),
    reason=f"Flower executables not installed beside {sys.executable}: {', '.join(missing_executables())}",
)


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------


def free_port() -> int:
    """A loopback port nobody listens on right now (the OS picks it when binding port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def flower_env(flwr_home: Path, **extra: str) -> dict[str, str]:
    env = os.environ.copy()
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_DISABLE_UPDATE_CHECK="1",  # no network
        PATH=f"{SCRIPTS_DIR}{os.pathsep}{env.get('PATH', '')}",
        OMP_NUM_THREADS="1",  # the tests share two cores with the SuperLink and two SuperNodes
        FIRM_RUN_ROOT=str(flwr_home.parent),  # the ServerApp writes run directories only under the test's folder
        **extra,
    )
    return env


def write_flower_config(flwr_home: Path, connections: dict[str, dict[str, object]]) -> None:
    """The CLI reads its SuperLink connections ("federations") from $FLWR_HOME/config.toml."""
    lines = ["[superlink]", f'default = "{next(iter(connections))}"', ""]
    for name, values in connections.items():
        lines.append(f"[superlink.{name}]")
        for key, value in values.items():
            lines.append(f"{key} = {json.dumps(value)}")  # JSON str/bool/int literals are valid TOML
        lines.append("")
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text("\n".join(lines))


def run_config_args(run_dir: Path, policy_dir: Path, settings: str = TINY_RUN_CONFIG) -> list[str]:
    """`--run-config` for the app: every FIRM setting is a key; TOML values, so strings are quoted."""
    return ["--run-config", f'preset="{PRESET}" policy="{policy_dir}" run-dir="{run_dir}" {settings}']


def flwr(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 60.0) -> str:
    """Run one `flwr` CLI command and return its stdout; a non-zero exit fails with its output."""
    result = subprocess.run(
        [str(SCRIPTS_DIR / "flwr"), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    if result.returncode != 0:
        raise AssertionError(f"flwr {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result.stdout


def run_to_end(connection: str, extra_args: list[str], env: dict[str, str], cwd: Path,
               logs: list[Path] = ()) -> dict:
    """Submit the app with `flwr run --stream`, which returns once the run has ended whatever its
    outcome (its output, the ServerApp's log, goes to cwd/flwr-run.log), then ask `flwr ls` how it
    ended: the run's record, its status included."""
    stream_log = cwd / "flwr-run.log"
    with stream_log.open("w") as out:
        try:
            result = subprocess.run([str(SCRIPTS_DIR / "flwr"), "run", str(REPO_ROOT), connection, "--stream", *extra_args],
                                    env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"flwr run did not finish within {RUN_TIMEOUT_S:.0f} s\n"
                                 f"{log_tails([stream_log, *logs])}") from None
    assert result.returncode == 0, f"flwr run exited {result.returncode}\n{log_tails([stream_log])}"
    runs = json.loads(flwr(["ls", connection, "--format", "json"], env, cwd))["runs"]
    assert len(runs) == 1, f"expected the one run of this test on its private SuperLink, got {runs}"
    return runs[0]


def run_to_completion(connection: str, extra_args: list[str], env: dict[str, str], cwd: Path,
                      logs: list[Path]) -> dict:
    """run_to_end for a run that must complete."""
    run = run_to_end(connection, extra_args, env, cwd, logs)
    assert run["status"] == "finished:completed", f"{run}\n{log_tails([cwd / 'flwr-run.log', *logs], lines=60)}"
    return run


def wait_for_superlink(port: int, process: subprocess.Popen, log: Path, ca_certfile: Path | None = None) -> None:
    """The SuperLink serves Fleet, Control and Runtime APIs on one port with a /health route
    (HTTPS checked against our CA when `ca_certfile` is given, plain HTTP otherwise)."""
    scheme, context = ("https", ssl.create_default_context(cafile=str(ca_certfile))) if ca_certfile else ("http", None)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"flower-superlink exited with code {process.returncode}\n{log_tails([log])}")
        try:
            with urllib.request.urlopen(f"{scheme}://127.0.0.1:{port}/health", timeout=1, context=context) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    raise AssertionError(f"flower-superlink not healthy on port {port} after {STARTUP_TIMEOUT_S:.0f} s\n{log_tails([log])}")


def log_tails(paths: list[Path], lines: int = 40) -> str:
    parts = []
    for path in paths:
        text = path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else ["(no log)"]
        parts.append(f"--- {path.name} ---\n" + "\n".join(text))
    return "\n".join(parts)


@dataclass
class ProcessTracker:
    """Processes a test started, stopped with their whole process tree by id.

    Flower detaches its helpers into new sessions (SuperExec, ServerApp, ClientApp), so a process
    group kill would miss them: the tree is collected from parent ids before anything is stopped.
    """

    roots: list[psutil.Process] = field(default_factory=list)

    def add(self, pid: int) -> None:
        self.roots.append(psutil.Process(pid))

    def tree(self) -> list[psutil.Process]:
        found: dict[int, psutil.Process] = {}
        for root in self.roots:
            try:
                for proc in [root, *root.children(recursive=True)]:
                    found[proc.pid] = proc
            except psutil.NoSuchProcess:
                continue
        return list(found.values())

    def stop(self, timeout: float = 15.0) -> list[str]:
        """SIGTERM the tree, SIGKILL what is left after `timeout`; return the ones still alive."""
        procs = self.tree()
        for proc in procs:
            try:
                proc.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=timeout)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(alive, timeout=5)
        return [str(p.pid) for p in alive if still_running(p)]


def still_running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def processes_mentioning(text: str) -> list[int]:
    """Ids of processes whose command line contains `text` (a unique temporary path)."""
    pids = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(text in part for part in proc.info["cmdline"] or []):
            pids.append(proc.pid)
    return pids


def processes_working_in(directory: Path) -> list[psutil.Process]:
    """Live processes whose working directory is `directory`: every Flower process a test starts
    runs there (the children inherit it), so none may be left once the test has stopped them."""
    found = []
    for proc in psutil.process_iter(["cwd"]):
        if proc.info["cwd"] == str(directory) and still_running(proc):
            found.append(proc)
    return found


def assert_no_process_left(directory: Path, grace_s: float = 30.0) -> None:
    """No process of the test may outlive it. Some exit on their own shortly after their parent was
    stopped (the SuperExec watches the SuperLink's pid, Ray's raylet reaps its actors), which takes
    seconds on a loaded machine: wait `grace_s` for them, then stop any left (they run in this test's
    own temporary directory, so they are ours) and fail, naming them."""
    deadline = time.monotonic() + grace_s
    while (left := processes_working_in(directory)) and time.monotonic() < deadline:
        time.sleep(0.5)
    if not left:
        return
    names = []
    for proc in left:
        try:
            names.append(f"{proc.pid} {' '.join(proc.cmdline()[:2])}")
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    assert not names, f"processes left {grace_s:.0f} s after the test stopped everything: {names}"


def start_process(command: list[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen:
    """Start a long-running Flower process in its own session, its output going to `log`."""
    with log.open("w") as out:
        return subprocess.Popen(command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def assert_complete_run_dir(run_dir: Path, policy_dir: Path, node_ids: set[int] | None = None) -> None:
    """What a finished FIRM run leaves behind: config, metrics of every round, adapters, plots.
    With `node_ids`, every round's client records must come from exactly those Flower nodes."""
    config = json.loads((run_dir / "config.json").read_text())
    assert config["policy"] == str(policy_dir)
    assert config["num_rounds"] == NUM_ROUNDS and config["rewards"] == "relevance,civility"
    assert json.loads((run_dir / "state.json").read_text())["completed_rounds"] == NUM_ROUNDS

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    for round_number in range(1, NUM_ROUNDS + 1):
        clients = [r for r in records if r["type"] == "client" and r["round"] == round_number]
        rounds = [r for r in records if r["type"] == "round" and r["round"] == round_number]
        assert len(clients) == NUM_NODES, f"round {round_number}: {len(clients)} client records"
        assert len(rounds) == 1, f"round {round_number}: {len(rounds)} round records"
        # each node trained on its own shard: partition ids 0..N-1, distinct node ids
        assert sorted(r["partition-id"] for r in clients) == list(range(NUM_NODES))
        assert len({r["node_id"] for r in clients}) == NUM_NODES
        if node_ids is not None:
            assert {r["node_id"] for r in clients} == node_ids, f"round {round_number}: work went to other nodes"
        for record in clients:
            assert len(record["lambda_mean"]) == 2 and abs(sum(record["lambda_mean"]) - 1) < 1e-5
            assert record["reward/relevance"] is not None and record["reward/civility"] is not None

    for round_number in range(1, NUM_ROUNDS + 1):
        assert (run_dir / "adapters" / f"round-{round_number:03d}" / "adapter_model.safetensors").is_file()
    plots = sorted(p.name for p in (run_dir / "plots").glob("*.png"))
    assert plots, f"no plots in {run_dir / 'plots'}"


# ------------------------------------------------------------------------------------------------
# A secure deployment: TLS + SuperNode authentication
# ------------------------------------------------------------------------------------------------

SECURE_CONNECTION = "firm-secure-deployment"


@dataclass
class SecureSuperLink:
    """A running SuperLink with TLS and SuperNode authentication, and how the CLI reaches it."""

    port: int
    tls: TlsFiles
    env: dict[str, str]  # FLWR_HOME holds the CLI connection SECURE_CONNECTION (TLS, our CA)
    cwd: Path
    log: Path


def start_secure_superlink(tmp_path: Path, processes: ProcessTracker, database: Path | None = None,
                           restart: SecureSuperLink | None = None,
                           log_name: str = "superlink.log") -> tuple[SecureSuperLink, subprocess.Popen]:
    """Certificates made now, then ``flower-superlink`` with TLS and ``--enable-supernode-auth``.
    ``database``: its state (registered nodes, node ids, runs, messages) in that SQLite file
    instead of in memory. ``restart``: a SuperLink started before, again on its port with its
    certificates and CLI connection (with the same ``database``, it finds its state there)."""
    if restart is None:
        tls = make_tls_certificates(tmp_path / "pki")  # throw-away CA + server certificate for 127.0.0.1
        port, flwr_home = free_port(), tmp_path / "flwr-home"
        write_flower_config(flwr_home, {SECURE_CONNECTION: {
            "address": f"127.0.0.1:{port}", "root-certificates": str(tls.ca_certfile), "insecure": False}})
        env = flower_env(flwr_home)
    else:
        tls, port, env = restart.tls, restart.port, restart.env
    log = tmp_path / log_name
    command = [str(SCRIPTS_DIR / "flower-superlink"),
               "--ssl-ca-certfile", str(tls.ca_certfile), "--ssl-certfile", str(tls.server_certfile),
               "--ssl-keyfile", str(tls.server_keyfile), "--enable-supernode-auth",
               "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(port)]
    if database is not None:
        command += ["--database", str(database)]
    superlink = start_process(command, env, tmp_path, log)
    processes.add(superlink.pid)
    wait_for_superlink(port, superlink, log, ca_certfile=tls.ca_certfile)
    return SecureSuperLink(port, tls, env, tmp_path, log), superlink


def register_supernode(link: SecureSuperLink, key: NodeKeyFiles) -> int:
    """``flwr supernode register <public key>``: the SuperLink admits this key and names its node id."""
    reply = flwr(["supernode", "register", str(key.public_key), SECURE_CONNECTION, "--format", "json"],
                 link.env, link.cwd)
    answer = json.loads(reply[reply.index("{"):])
    assert answer["success"], answer
    return int(answer["node-id"])


def list_supernodes(link: SecureSuperLink) -> dict[int, str]:
    """``flwr supernode list``: node id -> status (registered / online / offline ...)."""
    reply = flwr(["supernode", "list", SECURE_CONNECTION, "--format", "json"], link.env, link.cwd)
    return {int(node["node-id"]): node["status"] for node in json.loads(reply[reply.index("{"):])["nodes"]}


def start_secure_supernode(link: SecureSuperLink, name: str, partition_id: int, key: NodeKeyFiles | None,
                           processes: ProcessTracker, num_partitions: int = NUM_NODES,
                           node_config: str = "") -> tuple[subprocess.Popen, Path]:
    """A SuperNode that checks the SuperLink's certificate against our CA and, given `key`, signs its
    requests with the node's private key; ``node_config`` adds to its node config (e.g.
    ``state-dir="PATH"``). Returns the process and its log."""
    log = link.cwd / f"{name}.log"
    command = [str(SCRIPTS_DIR / "flower-supernode"), "--root-certificates", str(link.tls.ca_certfile),
               "--superlink", f"127.0.0.1:{link.port}", "--host", "127.0.0.1", "--port", str(free_port()),
               # the tests' own nodes on the server's host: they load the tiny policy the server names
               # and keep their state in its run directory (firm.federation.node_policy)
               "--node-config", f"partition-id={partition_id} num-partitions={num_partitions} allow-server-models=true "
                                f"allow-server-run-dir=true {node_config}".strip()]
    if key is not None:
        command += ["--auth-supernode-private-key", str(key.private_key)]
    process = start_process(command, link.env, link.cwd, log)
    processes.add(process.pid)
    return process, log


def assert_refused(process: subprocess.Popen, log: Path, reason: str) -> None:
    """The SuperNode gave up at activation: it exits non-zero and logs the SuperLink's `reason`."""
    try:
        process.wait(timeout=REFUSAL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{log.stem} was not refused within {REFUSAL_TIMEOUT_S:.0f} s\n{log_tails([log])}") from None
    text = log.read_text(errors="replace")
    assert process.returncode != 0, f"{log.stem} exited with 0\n{log_tails([log])}"
    assert "Failed to initialize the connection to the SuperLink" in text and reason in text, log_tails([log])


def wait_until_online(link: SecureSuperLink, node_ids: list[int], logs: list[Path]) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        nodes = list_supernodes(link)
        if all(nodes.get(node_id) == "online" for node_id in node_ids):
            return
        time.sleep(1.0)
    raise AssertionError(f"SuperNodes not online after {STARTUP_TIMEOUT_S:.0f} s: {nodes}\n{log_tails(logs)}")


def public_key_base64_line(key: NodeKeyFiles) -> str:
    """The first base64 line of the node's public key as the SuperLink logs it (PEM, SubjectPublicKeyInfo)."""
    from cryptography.hazmat.primitives import serialization

    public = serialization.load_ssh_public_key(key.public_key.read_bytes())
    pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem.decode().splitlines()[1]


# ------------------------------------------------------------------------------------------------
# Fixtures
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_policy_dir(tmp_path: Path, tiny_tokenizer, tiny_llama_config) -> Path:
    """The conftest's tiny Llama + tokenizer, saved where the Flower processes can load it."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    path = tmp_path / "tiny-llama"
    LlamaForCausalLM(tiny_llama_config).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def processes() -> Iterator[ProcessTracker]:
    tracker = ProcessTracker()
    yield tracker
    tracker.stop()  # also after a failure; the tests assert on the result of their own stop()
