"""`ffai-worker service install/uninstall/status`, run as a user runs them, in a temporary home.

The written systemd unit is checked by `systemd-analyze verify`, the launchd agent by
plistlib, and the agent's ProgramArguments are run for real: a worker that answers ping.
"""

from __future__ import annotations

import os
import plistlib
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, TINYSTORIES

from ffai_worker.serving import service_install as si

FFAI = str(Path(sys.executable).parent / "ffai")
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None,
    reason="systemd-analyze not installed (Debian/Ubuntu: apt-get install systemd)",
)


def home_env(tmp_path: Path, xdg: bool = True, path: str | None = None) -> dict[str, str]:
    """The environment of a user whose home (and config directory) are under tmp_path."""
    env = {k: v for k, v in os.environ.items() if k not in ("FFAI_ENDPOINT", "XDG_CONFIG_HOME")}
    env["HOME"] = str(tmp_path / "home")
    if xdg:
        env["XDG_CONFIG_HOME"] = str(tmp_path / "config")
    if path is not None:
        env["PATH"] = path
    return env


def worker_cli(
    *args: str, env: dict[str, str], cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ffai_worker.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=cwd,
    )


def verify(unit: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`systemd-analyze verify --user`; it needs a runtime directory even offline."""
    assert SYSTEMD_ANALYZE is not None
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700, exist_ok=True)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime), "SYSTEMD_LOG_COLOR": "0"}
    return subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--user", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


# -- the templates in deploy/ ---------------------------------------------------------------
def test_deploy_templates_are_what_install_writes() -> None:
    for name, data in si.template_files().items():
        on_disk = (REPO / "deploy" / name).read_bytes()
        assert on_disk == data, (
            f"deploy/{name} drifted: run `python -m ffai_worker.serving.service_install`"
        )


@needs_systemd_analyze
def test_deploy_unit_template_verifies(tmp_path: Path) -> None:
    unit = tmp_path / si.UNIT_NAME
    unit.write_text(
        (REPO / "deploy" / si.UNIT_NAME).read_text().replace(si.TEMPLATE_PYTHON, sys.executable)
    )
    done = verify(unit, tmp_path)
    assert done.returncode == 0 and done.stderr == "", done.stderr


# -- systemd ---------------------------------------------------------------------------------
def test_install_writes_a_unit_that_runs_this_python(tmp_path: Path) -> None:
    env = home_env(tmp_path)
    # A relative model folder is written absolute: the service does not run from here.
    done = worker_cli(
        "service", "install", "--kind", "systemd", "--model", "./tinystories-260k",
        "--endpoint", "ipc:///tmp/x.sock", "--", "--max-batch", "4",
        env=env, cwd=TINYSTORIES.parent,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    unit = tmp_path / "config" / "systemd" / "user" / si.UNIT_NAME
    assert done.stdout.splitlines()[0] == f"wrote {unit}"
    assert "systemctl --user daemon-reload" in done.stdout
    lines = unit.read_text().splitlines()
    exec_start = [line for line in lines if line.startswith("ExecStart=")]
    expected = (
        f"ExecStart={sys.executable} -m ffai_worker.cli serve --model {TINYSTORIES} "
        "--endpoint ipc:///tmp/x.sock --max-batch 4"
    )
    assert exec_start == [expected]
    assert "WantedBy=default.target" in lines
    assert not (tmp_path / "home" / ".config").exists()  # XDG_CONFIG_HOME was honoured

    # --print shows exactly what install wrote, and writes nothing.
    again = worker_cli(
        "service", "install", "--print", "--kind", "systemd", "--model", str(TINYSTORIES),
        "--endpoint", "ipc:///tmp/x.sock", "--", "--max-batch", "4", env=home_env(tmp_path / "b"),
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert again.stdout == unit.read_text()
    assert not (tmp_path / "b" / "config").exists()
    assert not (tmp_path / "b" / "home" / ".config").exists()


def test_without_xdg_config_home_the_unit_goes_under_home(tmp_path: Path) -> None:
    done = worker_cli("service", "install", "--kind", "systemd", env=home_env(tmp_path, xdg=False))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "home" / ".config" / "systemd" / "user" / si.UNIT_NAME).is_file()


@needs_systemd_analyze
def test_written_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    env = home_env(tmp_path)
    done = worker_cli("service", "install", "--kind", "systemd", "-m", str(TINYSTORIES), env=env)
    assert done.returncode == 0, done.stderr
    result = verify(tmp_path / "config" / "systemd" / "user" / si.UNIT_NAME, tmp_path)
    assert result.returncode == 0 and result.stderr == "", result.stderr


@needs_systemd_analyze
def test_awkward_paths_are_quoted_for_systemd(tmp_path: Path) -> None:
    # An interpreter path with a space, a specifier and a dollar: systemd finds it only
    # if the quoting and escaping are right.
    folder = tmp_path / "my venv %h $HOME"
    folder.mkdir()
    python = folder / "python"
    python.write_text("#!/bin/sh\n")
    python.chmod(0o755)
    argv = si.serve_argv(str(python), "/models/a b\"c'd\\e%i$x", "ipc:///tmp/s.sock")
    unit = tmp_path / si.UNIT_NAME
    unit.write_text(si.render_systemd(argv))
    result = verify(unit, tmp_path)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    # The check can fail: the same unit with its specifier left unescaped does not verify.
    unit.write_text(unit.read_text().replace("%%h", "%h", 1))
    assert verify(unit, tmp_path).returncode != 0


def test_a_line_break_cannot_reach_the_unit() -> None:
    with pytest.raises(ValueError, match="line break"):
        si.render_systemd(si.serve_argv("/usr/bin/python3", "a\nExecStartPre=/bin/evil", None))


def test_uninstall_and_status(tmp_path: Path) -> None:
    # No systemctl on PATH: uninstall says so and still removes the unit.
    env = home_env(tmp_path, path=str(tmp_path / "empty-bin"))
    unit = tmp_path / "config" / "systemd" / "user" / si.UNIT_NAME
    missing = worker_cli("service", "status", "--kind", "systemd", env=env)
    assert missing.returncode == 1
    assert missing.stdout == f"not installed (it would be {unit})\n"
    assert worker_cli("service", "install", "--kind", "systemd", env=env).returncode == 0
    status = worker_cli("service", "status", "--kind", "systemd", env=env)
    assert status.returncode == 0, status.stderr
    assert status.stdout.splitlines() == [
        f"installed: {unit}",
        f"(systemctl not found; skipped `systemctl --user is-active {si.UNIT_NAME}`)",
    ]
    gone = worker_cli("service", "uninstall", "--kind", "systemd", env=env)
    assert gone.returncode == 0, gone.stderr
    assert f"removed {unit}" in gone.stdout.splitlines()
    assert "systemctl not found; skipped `systemctl --user disable --now" in gone.stdout
    assert not unit.exists()
    again = worker_cli("service", "uninstall", "--kind", "systemd", env=env)
    assert again.returncode == 0 and again.stdout == f"not installed: no {unit}\n"


@pytest.mark.skipif(shutil.which("systemctl") is None, reason="systemctl not installed")
def test_uninstall_never_fails_on_an_unreachable_systemctl(tmp_path: Path) -> None:
    # Real systemctl, but (here, as over ssh or in a container) possibly no user bus.
    env = home_env(tmp_path)
    assert worker_cli("service", "install", "--kind", "systemd", env=env).returncode == 0
    assert worker_cli("service", "status", "--kind", "systemd", env=env).returncode == 0
    gone = worker_cli("service", "uninstall", "--kind", "systemd", env=env)
    assert gone.returncode == 0, gone.stderr
    assert "systemctl --user disable --now" in gone.stdout
    assert not (tmp_path / "config" / "systemd" / "user" / si.UNIT_NAME).exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--", "--max-batch", "0"], "serve options: Invalid value for '--max-batch'"),
        (["--", "--no-such-option"], "serve options: No such option '--no-such-option'"),
        (["--", "--model", "x"], "give --model before `--`"),
        (["--model", "./no-such-folder"], "no model folder at ./no-such-folder"),
        (["--endpoint", "tcp://10.1.2.3:5555"], "not a loopback address"),
    ],
)
def test_bad_install_options_write_nothing(tmp_path: Path, args: list[str], message: str) -> None:
    done = worker_cli("service", "install", "--kind", "systemd", *args, env=home_env(tmp_path))
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "config").exists()


# -- launchd ---------------------------------------------------------------------------------
def test_launchd_agent_parses_and_its_program_serves(tmp_path: Path) -> None:
    env = home_env(tmp_path)
    endpoint = f"ipc://{tmp_path}/agent.sock"
    done = worker_cli(
        "service", "install", "--kind", "launchd", "-m", str(TINYSTORIES), "--endpoint", endpoint,
        env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    path = tmp_path / "home" / "Library" / "LaunchAgents" / "com.ffai.worker.plist"
    with path.open("rb") as f:
        agent = plistlib.load(f)
    argv = [sys.executable, "-m", "ffai_worker.cli", "serve"]
    assert agent["Label"] == "com.ffai.worker"
    assert agent["ProgramArguments"] == [*argv, "--model", str(TINYSTORIES), "--endpoint", endpoint]
    assert agent["RunAtLoad"] is True
    assert agent["StandardErrorPath"] == str(
        tmp_path / "home" / "Library" / "Logs" / "ffai-worker.log"
    )

    # What launchd would run starts a worker that answers.
    log = tmp_path / "agent.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(agent["ProgramArguments"], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while b"serving on" not in log.read_bytes():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        ping = subprocess.run(
            [FFAI, "ping", "--endpoint", endpoint], capture_output=True, text=True, timeout=30
        )
        assert ping.returncode == 0, ping.stderr
    finally:
        proc.terminate()
        proc.wait(15)


def test_plist_escapes_markup(tmp_path: Path) -> None:
    argv = si.serve_argv("/opt/py <&> 'x'/python", None, "ipc:///tmp/a&b<c>.sock")
    agent = plistlib.loads(si.render("launchd", argv, home=tmp_path))
    assert agent["ProgramArguments"] == argv
