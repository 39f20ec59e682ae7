"""Run the worker as a per-user service: a systemd user unit (Linux) or a launchd agent (macOS).

The unit starts *this* interpreter (`sys.executable -m ffai_worker.cli serve …`), so it
runs the same installation, virtual environment included, that installed it. The
templates in `deploy/` are rendered by the same functions with placeholder paths
(`python -m ffai_worker.serving.service_install deploy` rewrites them; a test compares).
"""

from __future__ import annotations

import os
import plistlib
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

UNIT_NAME = "ffai-worker.service"
LAUNCHD_LABEL = "com.ffai.worker"
KINDS = ("systemd", "launchd")

# The placeholders the templates in deploy/ are rendered with.
TEMPLATE_PYTHON = "/path/to/ffai/.venv/bin/python"
TEMPLATE_HOME = Path("/Users/you")

SYSTEMD_HEADER = f"""\
# systemd user unit for the FFAI worker, written by `ffai-worker service install`
# (which fills in its own interpreter and any --model/--endpoint); remove it with
# `ffai-worker service uninstall`. Start it with:
#   systemctl --user daemon-reload && systemctl --user enable --now {UNIT_NAME}
# Without --endpoint the worker binds ipc://$XDG_RUNTIME_DIR/ffai/worker.sock,
# where clients look by default. Logs: journalctl --user -u {UNIT_NAME}
"""

SYSTEMD_BODY = """\
[Unit]
Description=FFAI worker (one language model, many clients over ZeroMQ)

[Service]
Type=simple
ExecStart={exec_start}
# SIGTERM ends active requests with `shutting_down` and removes the socket file.
KillSignal=SIGTERM
TimeoutStopSec=15
Restart=on-failure
RestartSec=2

[Install]
WantedBy=default.target
"""

# Characters that need no quoting in an ExecStart word; anything else is double-quoted.
_PLAIN_WORD = re.compile(r"[A-Za-z0-9_@%+=:,./$-]+")


def default_kind() -> str:
    return "launchd" if sys.platform == "darwin" else "systemd"


def unit_path(kind: str) -> Path:
    """Where the service file goes: the per-user unit / agent directory."""
    if kind == "launchd":
        return Path.home() / "Library" / "LaunchAgents" / f"{LAUNCHD_LABEL}.plist"
    xdg = os.environ.get("XDG_CONFIG_HOME", "")
    # The XDG spec says a relative value is invalid and must be ignored.
    config = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".config"
    return config / "systemd" / "user" / UNIT_NAME


def absolute_model(model: str) -> str:
    """A local folder made absolute (the service runs elsewhere); a hub id as given.

    A value that looks like a path (starts with `/`, `.` or `~`) but names no folder is
    refused here, at install time, rather than by a service failing in the background.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return os.path.abspath(path)
    if model.startswith(("/", ".", "~")):
        raise ValueError(f"no model folder at {model}")
    return model


def serve_argv(
    python: str, model: str | None, endpoint: str | None, extra: tuple[str, ...] | list[str] = ()
) -> list[str]:
    """The service's command line: this interpreter running `ffai-worker serve`."""
    argv = [python, "-m", "ffai_worker.cli", "serve"]
    if model is not None:
        argv += ["--model", model]
    if endpoint is not None:
        argv += ["--endpoint", endpoint]
    return argv + list(extra)


def systemd_quote(word: str, command: bool = False) -> str:
    """One ExecStart word, quoted so systemd splits and expands it back to `word`."""
    if "\n" in word or "\r" in word or "\0" in word:
        raise ValueError(f"a service argument cannot hold a line break or NUL: {word!r}")
    if not _PLAIN_WORD.fullmatch(word):
        word = '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'
    # `%` starts a specifier in every word, quoted or not; `$` a variable in the
    # arguments only (the command path is not expanded). Doubled, they are literal.
    word = word.replace("%", "%%")
    return word if command else word.replace("$", "$$")


def render_systemd(argv: list[str]) -> str:
    exec_start = " ".join(systemd_quote(word, command=i == 0) for i, word in enumerate(argv))
    return SYSTEMD_HEADER + SYSTEMD_BODY.format(exec_start=exec_start)


def render_launchd(argv: list[str], home: Path) -> bytes:
    """The launchd agent as an XML property list (plistlib: valid by construction)."""
    agent = {
        "Label": LAUNCHD_LABEL,
        "ProgramArguments": argv,
        "RunAtLoad": True,
        # Restart after a crash, not after a clean stop (SIGTERM exits 0).
        "KeepAlive": {"SuccessfulExit": False},
        "ThrottleInterval": 2,
        "ExitTimeOut": 15,
        "StandardErrorPath": str(home / "Library" / "Logs" / "ffai-worker.log"),
    }
    return plistlib.dumps(agent, sort_keys=False)


def render(kind: str, argv: list[str], home: Path | None = None) -> bytes:
    if kind == "launchd":
        return render_launchd(argv, Path.home() if home is None else home)
    return render_systemd(argv).encode()


@dataclass(frozen=True)
class Outcome:
    """What a step did, for the CLI to print: lines of text and whether all went well."""

    lines: list[str]
    ok: bool = True


def install(kind: str, content: bytes) -> Outcome:
    """Write the unit atomically (replacing an older one) and say how to start it."""
    path = unit_path(kind)
    replaced = path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(content)
    os.replace(tmp, path)
    lines = [f"{'replaced' if replaced else 'wrote'} {path}"]
    if kind == "launchd":
        lines.append(f"start it: launchctl load -w {path}")
        if replaced:
            lines.append(f"(reload a running one: launchctl unload {path} first)")
    else:
        lines.append(
            f"start it: systemctl --user daemon-reload && systemctl --user enable --now {UNIT_NAME}"
        )
        if replaced:
            lines.append(f"(restart a running one: systemctl --user restart {UNIT_NAME})")
    return Outcome(lines)


def uninstall(kind: str) -> Outcome:
    """Stop and disable the service where the service manager is there, then remove the file."""
    path = unit_path(kind)
    if not path.exists():
        return Outcome([f"not installed: no {path}"])
    lines: list[str] = []
    if kind == "launchd":
        lines += _try(["launchctl", "unload", "-w", str(path)])
    else:
        lines += _try(["systemctl", "--user", "disable", "--now", UNIT_NAME])
    path.unlink()
    lines.append(f"removed {path}")
    if kind == "systemd":
        lines += _try(["systemctl", "--user", "daemon-reload"])
    return Outcome(lines)


def status(kind: str) -> Outcome:
    """Whether the unit file exists, and what the service manager says, if it can be asked."""
    path = unit_path(kind)
    if not path.exists():
        return Outcome([f"not installed (it would be {path})"], ok=False)
    lines = [f"installed: {path}"]
    if kind == "launchd":
        # `launchctl list LABEL` exits 0 exactly when the agent is loaded.
        lines += _try(["launchctl", "list", LAUNCHD_LABEL], label="loaded", exit_only=True)
    else:
        lines += _try(["systemctl", "--user", "is-active", UNIT_NAME], label="state")
    return Outcome(lines)


def _try(argv: list[str], label: str | None = None, exit_only: bool = False) -> list[str]:
    """Run a service-manager command if it exists; report, never raise (there may be no
    user session bus, e.g. over ssh or in a container)."""
    if shutil.which(argv[0]) is None:
        return [f"({argv[0]} not found; skipped `{' '.join(argv)}`)"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [f"`{' '.join(argv)}` failed: {exc}"]
    output = (done.stdout + done.stderr).strip()
    if exit_only:
        return [f"{label}: {'yes' if done.returncode == 0 else 'no'}"]
    if label is not None:
        return [f"{label}: {output or f'exit {done.returncode}'}"]
    if done.returncode != 0:
        return [f"`{' '.join(argv)}` exited {done.returncode}: {output}"]
    return [f"ran `{' '.join(argv)}`" + (f": {output}" if output else "")]


def template_files() -> dict[str, bytes]:
    """The files in deploy/, rendered with placeholder paths and no --model/--endpoint."""
    argv = serve_argv(TEMPLATE_PYTHON, None, None)
    return {
        UNIT_NAME: render("systemd", argv),
        f"{LAUNCHD_LABEL}.plist": render("launchd", argv, home=TEMPLATE_HOME),
    }


if __name__ == "__main__":  # pragma: no cover
    # `python -m ffai_worker.serving.service_install deploy` rewrites the templates there.
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "deploy")
    for name, data in template_files().items():
        (folder / name).write_bytes(data)
        print(f"wrote {folder / name}")
