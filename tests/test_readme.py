"""Every snippet in README.md runs as written (issue 13, part 2).

The test reads README.md, extracts every fenced ``python``, ``sh``, ``bash`` and
``console`` block and runs it the way a reader would: a Python snippet as a script
in a fresh directory (or with pytest, when it is a ``test_*.py`` file), a shell
snippet with ``bash -e``. All of them talk to one embedded server for the session
(``WERKFLUSS_DIR``), each scene under a key prefix of its own.

What a snippet says about itself, in its first comment lines, a reader sees too:

- ``# first.py`` names the file it is saved as (default: ``snippet.py``);
- ``# continues "Heading"`` puts the code of the snippet under that heading first;
- ``# in the directory of "Heading"`` runs it where that snippet ran, after it,
  on the same runs (a *scene*). Shell snippets run in the scene of the latest
  Python snippet of their ``##`` section, or in a fresh directory.

An HTML comment right before a fence tells the test how to drive it:

- ``<!-- readme-test: skip (why) -->``: not run; the reason is required, and the
  skipped snippets are listed in `SKIPPED` below;
- ``<!-- readme-test: background (why) -->``: started in the background (a worker),
  stopped with SIGINT when its scene ends; before each later snippet of the scene
  the test waits until the worker has nothing left to do;
- ``<!-- readme-test: own server (why) -->``: runs in a fresh directory with an
  embedded server of its own in ``./.werkfluss`` (for commands that stop it).

A ``text`` block that is the next fence after a snippet, under the same heading, is
its output: each of its lines (up to a ``…``) must appear in what the snippet printed.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from werkfluss import Settings, list_runs, pending_hooks
from werkfluss._store._embedded import ensure_server, stop_server

from .conftest import ROOT

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = pytest.mark.slow

README = ROOT / "README.md"
RUN_LANGS = {"python", "sh", "bash", "console"}

# The snippets the test does not run, by their first line. Keep this short: each
# one is a place where the README could drift from the code unnoticed.
SKIPPED = {
    "python3 -m venv .venv && . .venv/bin/activate && pip install -e . && python example.py",
    "python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[test]' && python -m pytest",
    "python3 -m venv /tmp/benchvenv && . /tmp/benchvenv/bin/activate",
}

# What a snippet prints (a part of each line), where the README says it in a comment.
EXPECTED = {
    "Steps and workflows": ["welcome mail to user-123@example.com", "onboarded user-123"],
    "Starting runs": ["onboarded user-123"],
    "Retries and timeouts": ["{'status': 'ok', 'attempts': 2}"],
    "When a step fails": ["step 'checkout:charge' (#1 of run '", "failed after 1 attempt: ValueError: declined"],
    "Idempotency keys": ["receipt-order-10:1"],
    "Parallel steps": ["['a.thumb.png', 'b.thumb.png', 'c.thumb.png']"],
    "Hooks: waiting for the outside world": ["order-8 shipped"],
    "Durable sleep": ["to user-123: welcome", "to user-123: how is it going?", "to user-123: your trial ends today"],
    "Race: the first of several": ["expired"],
    "Child workflows": ["['order-1: 7 parcels', 'order-22: 8 parcels']", "order-22: 8 parcels"],
    "Cancellation": ["True", "False", "run 'order-43' was cancelled: customer cancelled"],
    "Workers and the queue": ["order-41", "order-42"],
    "Queries from Python": ["completed shipped 3 parcels (receipt-order-42)", "order-41 [Wait(kind='hook'"],
    "Testing: replay checks and a throwaway server": ["1 passed"],
    "Testing with a test clock": ["2 passed"],
    "Configuration": ["running: pid", "stopped"],
}


@dataclass
class Snippet:
    line: int  # 1-based line of the opening fence
    section: str  # the `##` heading it is under
    heading: str  # the nearest heading (`##` or `###`)
    lang: str
    code: str
    marker: str | None  # the readme-test HTML comment before the fence, without the prefix
    output: str | None = None  # a ```text block right after it

    @property
    def first_line(self) -> str:
        return self.code.strip().splitlines()[0]

    def comment(self, pattern: str) -> str | None:
        """The group of `pattern` in the snippet's leading comment lines."""
        for line in self.code.splitlines():
            if not line.startswith("#"):
                break
            found = re.search(pattern, line)
            if found:
                return found.group(1)
        return None

    @property
    def filename(self) -> str:
        return self.comment(r"^# (\w+\.py)\b") or "snippet.py"

    def __str__(self) -> str:
        return f"README.md:{self.line} ({self.heading})"


def parse(text: str) -> list[Snippet]:
    snippets: list[Snippet] = []
    lines = text.splitlines()
    section = heading = ""
    previous = ""  # the last non-blank line outside fences
    last_closed: Snippet | None = None  # the latest snippet of this heading, if no fence came after it
    i = 0
    while i < len(lines):
        line = lines[i]
        fence = re.match(r"^(\s*)```(\w*)\s*$", line)
        if fence is None:
            if line.startswith("## "):
                section = heading = line[3:].strip()
                last_closed = None
            elif line.startswith("### "):
                heading = line[4:].strip()
                last_closed = None
            if line.strip():
                previous = line.strip()
            i += 1
            continue
        indent, lang = fence.groups()
        body: list[str] = []
        i += 1
        while not re.match(rf"^{re.escape(indent)}```\s*$", lines[i]):
            body.append(lines[i][len(indent) :])
            i += 1
        code = "\n".join(body) + "\n"
        start = i - len(body)
        if lang == "text" and last_closed is not None:
            last_closed.output = code
            last_closed = None
        elif lang in RUN_LANGS:
            marker = re.fullmatch(r"<!-- readme-test: (.*) -->", previous)
            snippet = Snippet(start, section, heading, lang, code, marker.group(1) if marker else None)
            snippets.append(snippet)
            last_closed = snippet
        else:
            last_closed = None
        previous = "```"
        i += 1
    return snippets


SNIPPETS = parse(README.read_text())


@dataclass
class Scene:
    """Snippets that run one after another in one directory, on one key prefix."""

    name: str
    snippets: list[Snippet] = field(default_factory=list)

    @property
    def own_server(self) -> bool:
        return any(s.marker and s.marker.startswith("own server") for s in self.snippets)


def scenes() -> list[Scene]:
    by_heading: dict[str, Scene] = {}
    found: list[Scene] = []
    current: dict[str, Scene] = {}  # section -> the scene of its latest Python snippet
    for snippet in SNIPPETS:
        if snippet.marker and snippet.marker.startswith("skip"):
            continue
        joined = snippet.comment(r'in the directory of "([^"]+)"')
        if joined is not None:
            scene = by_heading[joined]
        elif snippet.lang == "python":
            scene = Scene(str(snippet))
            found.append(scene)
        elif snippet.section in current:
            scene = current[snippet.section]
        else:
            scene = Scene(str(snippet))
            found.append(scene)
        scene.snippets.append(snippet)
        by_heading.setdefault(snippet.heading, scene)
        current[snippet.section] = scene
    return found


def _code(snippet: Snippet) -> str:
    """The snippet's code with the code of the snippets it continues before it."""
    continued = snippet.comment(r'continues "([^"]+)"')
    if continued is None:
        return snippet.code
    earlier = [s for s in SNIPPETS if s.heading == continued and s.lang == "python"]
    assert earlier, f'{snippet} continues "{continued}", which has no Python snippet'
    return _code(earlier[0]) + "\n" + snippet.code


@pytest.fixture(scope="module")
def shared_server() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="wf-readme-"))
    ensure_server(directory)
    yield directory
    stop_server(directory)
    shutil.rmtree(directory, ignore_errors=True)


def _env(**extra: str) -> dict[str, str]:
    """A reader's shell: this interpreter's `python` and `werkfluss` first on PATH, no werkfluss settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WERKFLUSS_", "EXAMPLE_"))}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def _run(argv: list[str], cwd: Path, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def _check_output(snippet: Snippet, out: str) -> None:
    if snippet.output is not None:
        for line in snippet.output.splitlines():
            if line.startswith("$ ") or not line.strip():
                continue
            assert line.split("…")[0].rstrip() in out, f"{snippet}: {line!r} is not in what it printed:\n{out}"


def _wait_idle(settings: Settings, timeout: float = 20) -> None:
    """Until a background worker has nothing left to do: no run pending or running, no payload for a run."""
    deadline = time.monotonic() + timeout
    while True:
        busy = [r.run_id for r in list_runs(settings=settings).runs if r.status in ("pending", "running")]
        busy += [h.token for h in pending_hooks(settings=settings) if h.owner is not None]
        if not busy:
            return
        assert time.monotonic() < deadline, f"the worker did not get done with {busy} in {timeout} s"
        time.sleep(0.05)


def test_the_readme_snippets_are_found_and_few_are_skipped() -> None:
    langs = [s.lang for s in SNIPPETS]
    assert langs.count("python") >= 15, langs
    skipped = {s.first_line for s in SNIPPETS if s.marker and s.marker.startswith("skip")}
    assert skipped == SKIPPED
    for snippet in SNIPPETS:
        if snippet.marker is not None:
            assert re.fullmatch(r"(skip|background|own server) \(.+\)", snippet.marker), (
                f"{snippet}: a readme-test marker says what to do and why: {snippet.marker!r}"
            )
    # Every scene that expects output names a heading that exists.
    assert set(EXPECTED) <= {s.heading for s in SNIPPETS}


def test_the_first_workflow_resumes_after_sigkill_as_the_readme_shows(shared_server: Path, tmp_path: Path) -> None:
    """Killed while `save_something_to_db` sleeps, then run twice: the transcript the README shows."""
    first = next(s for s in SNIPPETS if s.heading == "A first workflow")
    assert first.filename == "first.py" and first.output is not None, first
    (tmp_path / "first.py").write_text(first.code)
    env = _env(WERKFLUSS_DIR=str(shared_server), WERKFLUSS_PREFIX=f"rd{uuid.uuid4().hex[:8]}:")
    transcript = [part.splitlines() for part in first.output.split("$ python first.py\n")[1:]]
    assert len(transcript) == 3, first.output

    proc = subprocess.Popen(
        [sys.executable, "first.py"], cwd=tmp_path, env={**env, "SAVE_SECONDS": "60"}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        seen: list[str] = []
        for line in proc.stdout:  # the per-test timeout bounds this
            seen.append(line.rstrip("\n"))
            if line.startswith("saving"):
                break
        assert seen == transcript[0][: len(seen)] and len(seen) == len(transcript[0]) - 1, (seen, transcript[0])
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate()
    for expected in transcript[1:]:
        rerun = _run([sys.executable, "first.py"], tmp_path, {**env, "SAVE_SECONDS": "0.1"})
        assert rerun.returncode == 0, rerun.stderr
        assert rerun.stdout.splitlines() == expected
    fresh = {**env, "WERKFLUSS_PREFIX": f"rd{uuid.uuid4().hex[:8]}:", "SAVE_SECONDS": "0.1"}
    unattended = _run([sys.executable, "first.py"], tmp_path, fresh)
    assert unattended.returncode == 0, unattended.stderr
    assert unattended.stdout.splitlines() == [*transcript[0][:-1], *transcript[1][1:]]


@pytest.mark.parametrize(
    "scene", [s for s in scenes() if s.snippets[0].heading != "A first workflow"], ids=lambda s: s.name
)
def test_a_readme_scene_runs_as_written(scene: Scene, shared_server: Path, tmp_path: Path) -> None:
    prefix = f"rd{uuid.uuid4().hex[:8]}:"
    if scene.own_server:
        env = _env()
        ensure_server(tmp_path / ".werkfluss")
        settings = Settings(directory=str(tmp_path / ".werkfluss"), prefix="werkfluss:")
    else:
        env = _env(WERKFLUSS_DIR=str(shared_server), WERKFLUSS_PREFIX=prefix)
        settings = Settings(directory=str(shared_server), prefix=prefix)
    background: list[subprocess.Popen[str]] = []
    printed: dict[str, str] = {}  # heading -> what its snippets printed
    try:
        for snippet in scene.snippets:
            if background:
                _wait_idle(settings)
            if snippet.lang == "python":
                code = _code(snippet)
                (tmp_path / snippet.filename).write_text(code)
                if snippet.filename.startswith("test_"):
                    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", snippet.filename]
                else:
                    argv = [sys.executable, snippet.filename]
            else:
                argv = ["bash", "-e", "-o", "pipefail", "-c", snippet.code]
            if snippet.marker and snippet.marker.startswith("background"):
                proc = subprocess.Popen(
                    argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                    start_new_session=True,
                )  # fmt: skip
                background.append(proc)
                continue
            done = _run(argv, tmp_path, env)
            assert done.returncode == 0, f"{snippet} exited with {done.returncode}:\n{done.stdout}\n{done.stderr}"
            _check_output(snippet, done.stdout)
            printed[snippet.heading] = printed.get(snippet.heading, "") + done.stdout
        for heading, out in printed.items():
            for part in EXPECTED.get(heading, []):
                assert part in out, f"{heading}: {part!r} is not in what its snippets printed:\n{out}"
    finally:
        for proc in background:
            os.killpg(proc.pid, signal.SIGINT)  # a graceful stop, as Ctrl-C in its terminal
            try:
                out, _ = proc.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                out, _ = proc.communicate()
            assert proc.returncode == 0, f"the background snippet exited with {proc.returncode}:\n{out}"
        if scene.own_server:
            stop_server(tmp_path / ".werkfluss")
