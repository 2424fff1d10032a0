"""Shared fixtures: tiny tokenizers and models built on the spot, the shared data sets, the CLI."""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under `pytest -n W` (make test), one thread per worker and per process it starts: W workers of two threads
    # each on a 2-core machine would oversubscribe it (OpenMP's spinning threads then crawl). Set before torch loads.
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(variable, "1")


def shared_data_dir() -> Path:
    """../shared/data beside the checkout, or $CHATLOOP_DATA."""
    return Path(os.environ.get("CHATLOOP_DATA", REPO.parent / "shared" / "data"))


def need(path: Path) -> Path:
    """A dependency of a test: skipped when missing on a developer machine, a failure under CI."""
    if not path.exists():
        message = f"missing test dependency: {path}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


def need_module(name: str):
    """An optional test dependency (a Python module): skipped when missing on a developer machine, a failure
    under CI, where `make test` installs it."""
    if IN_CI:
        return importlib.import_module(name)
    return pytest.importorskip(name)


# Files whose tests take minutes, longest first: under `pytest -n W --dist loadgroup` (make test) they start first,
# so that the suite does not end on one worker running them alone while the others idle.
LONGEST_FIRST = ("test_pipeline.py", "test_import.py", "test_resume.py", "test_faults.py", "test_lora.py",
                 "test_distributed.py")


def pytest_collection_modifyitems(config, items) -> None:
    """Longest files first; each file's tests one xdist group (its module fixtures built once), but each test of
    test_pipeline.py its own group: they are whole loops, one worker each."""
    def rank(item) -> int:
        return LONGEST_FIRST.index(item.path.name) if item.path.name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: within a file, the written order
    for item in items:
        item.add_marker(pytest.mark.xdist_group(item.nodeid if item.path.name == "test_pipeline.py"
                                                else item.path.name))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return need(shared_data_dir())


SAMPLE_TEXT = "\n".join(
    f"The {color} fox number {i} jumps over the {size} dog and runs to the {place}."
    for i, (color, size, place) in enumerate(
        [(c, s, p) for c in ("red", "blue", "green", "brown") for s in ("lazy", "small", "big")
         for p in ("river", "hill", "town", "forest")] * 8
    )
)


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(SAMPLE_TEXT + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, corpus_file) -> Path:
    from chatloop.tokenizer import TokenizerConfig, train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(TokenizerConfig(inputs=[str(corpus_file)], out=str(out), vocab_size=320))
    return out


# Tests of exactness (resume after kill -9, 1 vs N processes, parity, bias centring) pin fp32 with these flags:
# bf16 autocast, which `precision: auto` picks on AMX CPUs and GPUs, rounds differently when the work is split
# differently. `grep -n FP32 tests/` lists every such test; tests/test_bf16.py runs the bf16 path on every machine.
FP32 = "--precision=fp32"
RUN_FP32 = [f"--{stage}.precision=fp32" for stage in ("pretrain", "sft", "rm", "ppo", "dpo")]  # `chatloop run`'s


def cli_command(*args: str) -> list[str]:
    """The command line of `chatloop ARGS` in a fresh interpreter."""
    return [sys.executable, "-m", "chatloop.cli", *args]


def metric_rows(out: Path) -> list[dict]:
    """A stage's metrics.jsonl rows written so far: none before the file exists; a kill can tear the last line."""
    path = out / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def kill_when(command: list[str], ready: Callable[[], bool], timeout: float) -> None:
    """Start `command` and SIGKILL it as soon as `ready()` holds (or stop waiting when it exits or time is up)."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.01)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def assert_same_run(out: Path, reference: Path, loss_key: str) -> None:
    """A resumed run `out` ended where the uninterrupted `reference` did: every step logged exactly once with the
    same numbers (all but timings), and the same final metrics."""
    got, want = metric_rows(out), metric_rows(reference)
    assert [r["step"] for r in got] == [r["step"] for r in want]  # every step exactly once
    for a, b in zip(got, want):
        assert loss_key in a or a["step"] == 0
        same = {k: v for k, v in b.items() if not k.startswith("perf/")}
        assert {k: a[k] for k in same} == pytest.approx(same, abs=1e-5), a["step"]
    final = json.loads((out / "chatloop.json").read_text())["metrics"]
    for key, value in json.loads((reference / "chatloop.json").read_text())["metrics"].items():
        assert final[key] == (pytest.approx(value, abs=1e-5) if isinstance(value, float) else value), key


@contextmanager
def tmpfs(directory: Path, size: int) -> Iterator[Callable[[int], None]]:
    """A real small file system (tmpfs, `size` bytes) mounted at `directory` while the block runs; it yields a
    function that resizes it. Needs root (as here and in CI) or a user namespace: skipped elsewhere, a failure
    under CI."""
    directory.mkdir(parents=True, exist_ok=True)

    def mount(*options: str) -> None:
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "none", str(directory)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            message = f"cannot mount a tmpfs (root needed): {result.stderr.strip()}"
            pytest.fail(message) if IN_CI else pytest.skip(message)

    mount(f"size={size}")
    try:
        yield lambda new_size: mount("remount", f"size={new_size}")
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=True)


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`chatloop ARGS` in a fresh interpreter, as a user runs it."""
    return subprocess.run(cli_command(*args), capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)


CHROMIUM = os.environ.get("CHATLOOP_CHROMIUM", "/usr/bin/chromium")


@pytest.fixture(scope="session")
def browser():
    """Playwright driving Debian's chromium (installed by `make setup`); nothing is downloaded."""
    need(Path(CHROMIUM))
    playwright_api = need_module("playwright.sync_api")
    with playwright_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()
