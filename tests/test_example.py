"""The README's first command: `python example.py` on a fresh directory, then again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from .conftest import ROOT


def _run(cwd: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=False
    )


def test_example_runs_on_a_fresh_embedded_server_and_resumes_after_ctrl_c(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WERKFLUSS_")}
    env.update(EXAMPLE_FAIL_RATE="0", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    example = str(ROOT / "example.py")
    try:
        # Interrupt it with Ctrl-C while it reserves stock.
        proc = subprocess.Popen(
            [sys.executable, example, "order-9"],
            cwd=tmp_path,
            env={**env, "EXAMPLE_PAUSE": "60"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert proc.stdout is not None
        seen = ""
        for line in proc.stdout:  # the per-test timeout bounds this
            seen += line
            if "reserving stock" in line:
                break
        assert "reserving stock" in seen, seen
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=30)
        assert proc.returncode == 130, seen + rest
        assert "interrupted" in rest

        second = _run(tmp_path, example, "order-9", env={**env, "EXAMPLE_PAUSE": "0"})
        assert second.returncode == 0, second.stderr
        out = second.stdout
        assert "[1/4] ↺ fetch_order: replayed from the log" in out
        assert "[2/4] ↺ charge_card: replayed from the log" in out
        assert "[3/4] ✓ reserve_stock: executed" in out
        assert "[4/4] ✓ send_confirmation: executed" in out
        assert "fetching order-9" not in out and "charging" not in out
        assert "order-9 shipped in 3 parcels (receipt-order-9)" in out

        third = _run(tmp_path, example, "order-9", env=env)
        assert third.returncode == 0, third.stderr
        assert "order-9 shipped in 3 parcels" in third.stdout
        assert "executed" not in third.stdout and "replayed" not in third.stdout
        assert (tmp_path / ".werkfluss" / "appendonlydir").is_dir()
    finally:
        stop = _run(tmp_path, "-m", "werkfluss", "server", "stop", env=env)
        assert stop.returncode == 0, stop.stderr


def test_server_command_reports_starts_and_stops(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WERKFLUSS_")}
    env["PYTHONPATH"] = str(ROOT)
    data = str(tmp_path / "data")
    status = _run(tmp_path, "-m", "werkfluss", "server", "status", "--dir", data, env=env)
    assert status.returncode == 1 and "not running" in status.stdout
    try:
        started = _run(tmp_path, "-m", "werkfluss", "server", "start", "--dir", data, env=env)
        assert started.returncode == 0 and "running: pid" in started.stdout, started.stderr
        status = _run(tmp_path, "-m", "werkfluss", "server", "status", "--dir", data, env=env)
        assert status.returncode == 0 and started.stdout.split(",")[0] in status.stdout
    finally:
        stopped = _run(tmp_path, "-m", "werkfluss", "server", "stop", "--dir", data, env=env)
    assert stopped.stdout.strip() == "stopped"
    status = _run(tmp_path, "-m", "werkfluss", "server", "status", "--dir", data, env=env)
    assert status.returncode == 1
