"""End to end: the FIRM ServerApp and ClientApp under Flower's own runtimes, started by `flwr run`.

The other tests call the apps from Python; these run the same apps the way a user does:

* deployment: one ``flower-superlink`` and two ``flower-supernode`` processes on loopback
  (``--insecure``), each SuperNode with its own ``partition-id``; then ``flwr run . <connection>``;
* local simulation: ``flwr run . local`` with ``num-supernodes=2``, where ``flwr`` starts a
  managed simulation SuperLink in the background.

Both train a tiny random Llama for 2 rounds and check the run directory. Everything is isolated:
a temporary ``FLWR_HOME`` (federations, installed FABs, SuperLink state), free loopback ports, and
``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1`` (otherwise the SuperLink reinstalls the app's
dependencies with uv and pulls a CUDA torch). Every process the tests start, and every process
those start, is stopped by process id afterwards, also when a test fails.
"""

from __future__ import annotations

import json
import os
import socket
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

REPO_ROOT = Path(__file__).resolve().parents[1]
# flwr starts `flower-superlink` / `flower-superexec` / `flwr-serverapp` by name, so the directory of
# this interpreter's console scripts goes first on PATH.
SCRIPTS_DIR = Path(sys.executable).parent
FLOWER_EXECUTABLES = ("flwr", "flower-superlink", "flower-supernode", "flower-superexec")
NUM_NODES = 2
NUM_ROUNDS = 2
# Tiny on purpose: both runtimes start a fresh Python process per ClientApp message (import torch,
# transformers, MiniLM for the relevance reward), which dominates the run time.
TINY_RUN_CONFIG = (
    f"num-clients={NUM_NODES} num-rounds={NUM_ROUNDS} rollout-batch-size=2 max-new-tokens=4 "
    "ppo-epochs=1 num-minibatches=1 max-prompt-tokens=32"
)
PRESET = "simple-rewards"  # rewards = relevance,civility: offline, no fitted weights needed
STARTUP_TIMEOUT_S = 60.0
RUN_TIMEOUT_S = 300.0  # measured here: ~45 s (simulation), ~75 s (deployment) on 2 cores under load


def missing_executables() -> list[str]:
    return [name for name in FLOWER_EXECUTABLES if not (SCRIPTS_DIR / name).is_file()]


pytestmark = pytest.mark.skipif(
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


def run_config_args(run_dir: Path, policy_dir: Path) -> list[str]:
    """`--run-config` for the app: every FIRM setting is a key; TOML values, so strings are quoted."""
    return ["--run-config", f'preset="{PRESET}" policy="{policy_dir}" run-dir="{run_dir}" {TINY_RUN_CONFIG}']


def flwr(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 60.0) -> str:
    """Run one `flwr` CLI command and return its stdout; a non-zero exit fails with its output."""
    result = subprocess.run(
        [str(SCRIPTS_DIR / "flwr"), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    if result.returncode != 0:
        raise AssertionError(f"flwr {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result.stdout


def run_to_completion(connection: str, extra_args: list[str], env: dict[str, str], cwd: Path,
                      logs: list[Path]) -> dict:
    """Submit the app with `flwr run --stream`, which returns once the run has finished (its output
    is the ServerApp's log, traceback included), then ask `flwr ls` how the run ended."""
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
    assert runs[0]["status"] == "finished:completed", f"{runs[0]}\n{log_tails([stream_log, *logs], lines=60)}"
    return runs[0]


def wait_for_superlink(port: int, process: subprocess.Popen, log: Path) -> None:
    """The SuperLink serves Fleet, Control and Runtime APIs on one HTTP port with a /health route."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"flower-superlink exited with code {process.returncode}\n{log_tails([log])}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as reply:
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


def processes_working_in(directory: Path) -> list[str]:
    """Live processes whose working directory is `directory`: every Flower process a test starts
    runs there (the children inherit it), so none may be left once the test has stopped them."""
    found = []
    for proc in psutil.process_iter(["cwd", "cmdline"]):
        if proc.info["cwd"] == str(directory) and still_running(proc):
            found.append(f"{proc.pid} {' '.join((proc.info['cmdline'] or [])[:2])}")
    return found


def start_process(command: list[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen:
    """Start a long-running Flower process in its own session, its output going to `log`."""
    with log.open("w") as out:
        return subprocess.Popen(command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def assert_complete_run_dir(run_dir: Path, policy_dir: Path) -> None:
    """What a finished FIRM run leaves behind: config, metrics of every round, adapters, plots."""
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
        for record in clients:
            assert len(record["lambda_mean"]) == 2 and abs(sum(record["lambda_mean"]) - 1) < 1e-5
            assert record["reward/relevance"] is not None and record["reward/civility"] is not None

    for round_number in range(1, NUM_ROUNDS + 1):
        assert (run_dir / "adapters" / f"round-{round_number:03d}" / "adapter_model.safetensors").is_file()
    plots = sorted(p.name for p in (run_dir / "plots").glob("*.png"))
    assert plots, f"no plots in {run_dir / 'plots'}"


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


# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------


def test_flwr_run_on_deployment_superlink_and_two_supernodes(tmp_path: Path, tiny_policy_dir: Path,
                                                              processes: ProcessTracker) -> None:
    flwr_home, run_dir = tmp_path / "flwr-home", tmp_path / "run"
    superlink_port = free_port()
    write_flower_config(flwr_home, {"firm-deployment": {"address": f"127.0.0.1:{superlink_port}", "insecure": True}})
    env = flower_env(flwr_home)
    logs = [tmp_path / "superlink.log", *(tmp_path / f"supernode-{i}.log" for i in range(NUM_NODES))]

    superlink = start_process(
        [str(SCRIPTS_DIR / "flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
         "--host", "127.0.0.1", "--port", str(superlink_port)],
        env, tmp_path, logs[0],
    )
    processes.add(superlink.pid)
    wait_for_superlink(superlink_port, superlink, logs[0])
    for partition_id in range(NUM_NODES):
        supernode = start_process(
            [str(SCRIPTS_DIR / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{superlink_port}",
             "--host", "127.0.0.1", "--port", str(free_port()),
             "--node-config", f"partition-id={partition_id} num-partitions={NUM_NODES}"],
            env, tmp_path, logs[1 + partition_id],
        )
        processes.add(supernode.pid)

    run_to_completion("firm-deployment", run_config_args(run_dir, tiny_policy_dir), env, tmp_path, logs)

    assert_complete_run_dir(run_dir, tiny_policy_dir)
    assert processes.stop() == []
    assert processes_working_in(tmp_path) == []


def test_flwr_run_on_local_simulation(tmp_path: Path, tiny_policy_dir: Path, processes: ProcessTracker) -> None:
    flwr_home, run_dir = tmp_path / "flwr-home", tmp_path / "run"
    write_flower_config(flwr_home, {"local": {"address": ":local:"}})
    # `flwr` starts the managed local SuperLink on these ports (defaults 39091/39093, shared by
    # everyone on the machine): free ones keep this test off other users' SuperLinks.
    env = flower_env(flwr_home, FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()),
                     FLWR_LOCAL_CONTROL_API_PORT=str(free_port()))
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
    assert processes.stop() == []
    assert processes_working_in(tmp_path) == []
