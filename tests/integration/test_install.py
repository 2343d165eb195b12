"""The wheel, installed into a clean venv outside the repository, creates topics and summarizes.

No source tree on the path: the schemas and default config the processes read must come from the
wheel itself (package data), and the data directory defaults to a per-user one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from confluent_kafka.admin import AdminClient

from pipeline.core.settings import KafkaSettings
from pipeline.core.topics import TopicNames
from pipeline.kafka.admin import delete_topics
from pipeline.llm.extractive import summarize
from tests.harness import free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
# What a wheel is built from; a copy, so that the build leaves nothing in the checkout.
SOURCES = ("pyproject.toml", "README.md", "pipeline", "gateway", "schemas", "config")
DOCUMENT = " ".join(
    f"Sentence {i} says that Kafka partitions keep records of topic {i % 7} in order."
    for i in range(40)
)


@dataclass(frozen=True)
class Installed:
    """A venv holding only the sumstream wheel and its dependencies, and a cwd outside the repo."""

    bin: Path
    cwd: Path
    home: Path


def _run(
    args: list[str],
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float | None = None,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=cwd, env=env, timeout=timeout, capture_output=True, text=True, check=False
    )


def _copy_sources(source: Path) -> None:
    source.mkdir()
    for name in SOURCES:
        path = REPO / name
        if path.is_dir() and not path.is_symlink():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:  # schemas/ is a link into the package and stays one, as in a checkout
            shutil.copy2(path, source / name, follow_symlinks=False)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    root = tmp_path_factory.mktemp("install")
    _copy_sources(root / "source")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    built = _run([*pip, "wheel", "--no-deps", "-q", "-w", str(root / "dist"), str(root / "source")])
    assert built.returncode == 0, built.stderr
    (wheel,) = (root / "dist").glob("sumstream-*.whl")
    venv = root / "venv"
    made = _run([sys.executable, "-m", "venv", str(venv)])
    assert made.returncode == 0, made.stderr
    venv_pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
    started = time.monotonic()
    done = _run(
        [*venv_pip, "install", "-q", str(wheel)], env=_without_source_path(dict(os.environ))
    )
    assert done.returncode == 0, done.stderr
    # Reported, not asserted: it depends on the pip cache and the network.
    print(f"wheel installed with its dependencies in {time.monotonic() - started:.0f} s")
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    return Installed(venv / "bin", elsewhere, root / "home")


def _without_source_path(env: dict[str, str]) -> dict[str, str]:
    env.pop("PYTHONPATH", None)
    return env


@pytest.fixture
def prefix(bootstrap: str) -> Iterator[str]:
    name = f"inst-{uuid.uuid4().hex[:8]}."
    yield name
    delete_topics(KafkaSettings(bootstrap_servers=bootstrap, topic_prefix=name))


def _env(installed: Installed, bootstrap: str, prefix: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SUMSTREAM_", "ANTHROPIC_"))}
    env = _without_source_path(env)
    marker = os.environ.get("SUMSTREAM_TEST_RUN")
    if marker:  # scripts/test ends leftover processes by this marker
        env["SUMSTREAM_TEST_RUN"] = marker
    env.update(
        HOME=str(installed.home),
        PYTHONUNBUFFERED="1",
        SUMSTREAM_BOOTSTRAP_SERVERS=bootstrap,
        SUMSTREAM_TOPIC_PREFIX=prefix,
        SUMSTREAM_STREAM_PARTITIONS="2",
        SUMSTREAM_WORK_PARTITIONS="2",
        **extra,
    )
    return env


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the simulator exited"
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.1)  # poll interval while the server binds, not a stand-in for a condition
    raise AssertionError(f"{url} did not answer within {timeout_s} s")


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def _simulator_and_worker(installed: Installed, bootstrap: str, prefix: str) -> Iterator[Path]:
    """`sumstream llm-sim` and `sumstream worker` from the venv; yields their log folder."""
    sumstream = str(installed.bin / "sumstream")
    port = free_port()
    logs = installed.cwd / "logs"
    logs.mkdir(exist_ok=True)
    sim_args = ["llm-sim", "--port", str(port), "--ttft-ms", "1", "--token-delay-ms", "0"]
    worker_env = _env(
        installed,
        bootstrap,
        prefix,
        SUMSTREAM_APP_ID=f"inst-{uuid.uuid4().hex[:8]}",
        SUMSTREAM_LLM_SIM_URL=f"http://127.0.0.1:{port}",
    )
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with (logs / "sim.log").open("wb") as sim_log, (logs / "worker.log").open("wb") as w_log:
            sim = subprocess.Popen(
                [sumstream, *sim_args],
                cwd=installed.cwd,
                env=_env(installed, bootstrap, prefix),
                stdout=sim_log,
                stderr=subprocess.STDOUT,
            )
            procs.append(sim)
            _wait_healthy(f"http://127.0.0.1:{port}/healthz", sim)
            worker = subprocess.Popen(
                [sumstream, "worker", "--metrics-port", "0"],
                cwd=installed.cwd,
                env=worker_env,
                stdout=w_log,
                stderr=subprocess.STDOUT,
            )
            procs.append(worker)
            yield logs
    finally:
        _stop(procs)


def test_installed_wheel_creates_topics_and_summarizes_from_another_cwd(
    installed: Installed, bootstrap: str, prefix: str
) -> None:
    sumstream = str(installed.bin / "sumstream")
    env = _env(installed, bootstrap, prefix)
    created = _run([sumstream, "topics", "create"], cwd=installed.cwd, env=env, timeout=120)
    assert created.returncode == 0, created.stderr
    listed = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=30).topics
    topics = TopicNames.from_settings(KafkaSettings(topic_prefix=prefix))
    assert {topics.requests, topics.tokens, topics.results} <= set(listed)

    (installed.cwd / "doc.txt").write_text(DOCUMENT)
    with _simulator_and_worker(installed, bootstrap, prefix) as logs:
        submit = [sumstream, "submit", "doc.txt", "--timeout", "120"]
        submitted = _run(submit, cwd=installed.cwd, env=env, timeout=240)
    worker_log = (logs / "worker.log").read_text(errors="replace")
    assert submitted.returncode == 0, submitted.stderr + worker_log[-3000:]
    assert submitted.stdout.strip() == summarize(DOCUMENT, 1024).strip()
    assert "COMPLETED" in submitted.stderr
    # The per-user default data directory, not a folder next to site-packages.
    assert (installed.home / ".local" / "share" / "sumstream" / "faust").is_dir()
