"""scripts/python_env.sh: the one interpreter that setup_env.sh, demo.sh and test.sh use.

The scripts run from a temporary copy of ``scripts/`` (their repository root is then the temporary folder, where a
``.venv`` may be created). Externally managed interpreters (PEP 668) are simulated with a small ``python3`` script
first on PATH that reports a stdlib folder holding an ``EXTERNALLY-MANAGED`` file and hands everything else,
``-m venv`` included, to the real interpreter; Debian without ``python3-venv`` is a ``-m venv`` that fails as there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Dict, Optional

import pytest

ROOT = Path(__file__).resolve().parent.parent
REAL_PYTHON = sys.executable


def _root(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    shutil.copytree(ROOT / "scripts", root / "scripts", ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    return root


def _env(path_first: Optional[Path] = None, **extra: str) -> Dict[str, str]:
    """The current environment without PYTHON / VIRTUAL_ENV, ``path_first`` first on PATH, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "VIRTUAL_ENV")}
    if path_first is not None:
        env["PATH"] = f"{path_first}{os.pathsep}{env['PATH']}"
    env.update(extra)
    return env


def _pick(root: Path, env: Dict[str, str]) -> subprocess.CompletedProcess:
    """Source python_env.sh as the scripts do; prints PYTHON, the first PATH entry and PYTHON's sys.prefix."""
    script = ('set -euo pipefail; source scripts/python_env.sh; echo "PYTHON=$PYTHON"; echo "PATH1=${PATH%%:*}"; '
              '"$PYTHON" -c "import sys; print(\'PREFIX=\' + sys.prefix)"')
    return subprocess.run(["bash", "-c", script], cwd=root, env=env, capture_output=True, text=True, timeout=300)


def _values(out: str) -> Dict[str, str]:
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def _fake_python3(folder: Path, stdlib: Path, venv_fails: bool = False, in_venv: bool = False) -> Path:
    """A ``python3`` that reports ``stdlib`` (and whether it runs in a virtual environment) to the probe and runs the
    real one otherwise."""
    folder.mkdir(parents=True, exist_ok=True)
    venv = ('echo "The virtual environment was not created successfully because ensurepip is not available." >&2; '
            'mkdir -p "$3/bin"; exit 1' if venv_fails else f'exec "{REAL_PYTHON}" "$@"')
    script = folder / "python3"
    script.write_text(
        "#!/usr/bin/env bash\n"
        f'case "$1 $2" in\n'
        f'  "-c import sys, sysconfig"*) echo "{stdlib}"; echo {int(in_venv)} ;;\n'
        f'  "-m venv") {venv} ;;\n'
        f'  *) exec "{REAL_PYTHON}" "$@" ;;\n'
        "esac\n"
    )
    script.chmod(0o755)
    return folder


def _managed_stdlib(tmp_path: Path) -> Path:
    stdlib = tmp_path / "stdlib"
    stdlib.mkdir()
    (stdlib / "EXTERNALLY-MANAGED").write_text("[externally-managed]\nError=use a virtual environment\n")
    return stdlib


def test_plain_python3_when_it_is_not_externally_managed(tmp_path):
    """This machine's and CI's case (a pyenv Python): python3 itself, no .venv, PATH untouched."""
    root = _root(tmp_path)
    marker = Path(sysconfig.get_path("stdlib")) / "EXTERNALLY-MANAGED"
    in_venv = sys.prefix != sys.base_prefix
    if marker.is_file() and not in_venv:
        pytest.skip("this interpreter is externally managed: the plain-python3 case cannot be run with it")
    env = _env(Path(REAL_PYTHON).parent)
    done = _pick(root, env)
    assert done.returncode == 0, done.stderr
    values = _values(done.stdout)
    assert values["PYTHON"] == "python3" and values["PATH1"] == str(Path(REAL_PYTHON).parent)
    assert not (root / ".venv").exists() and done.stderr == ""


def test_python_variable_wins_and_its_bin_folder_goes_first_on_path(tmp_path):
    root = _root(tmp_path)
    venv = tmp_path / "elsewhere"
    subprocess.run([REAL_PYTHON, "-m", "venv", "--without-pip", str(venv)], check=True)
    stdlib = _managed_stdlib(tmp_path)
    env = _env(_fake_python3(tmp_path / "fake", stdlib), PYTHON=str(venv / "bin" / "python"), VIRTUAL_ENV=str(tmp_path / "other"))
    done = _pick(root, env)
    assert done.returncode == 0, done.stderr
    values = _values(done.stdout)
    assert values["PYTHON"] == str(venv / "bin" / "python") and values["PATH1"] == str(venv / "bin")
    assert values["PREFIX"] == str(venv) and not (root / ".venv").exists()
    bad = _pick(root, _env(PYTHON=str(tmp_path / "no-such-python")))
    assert bad.returncode != 0 and f"PYTHON={tmp_path / 'no-such-python'} cannot be run" in bad.stderr


def test_active_virtual_environment_comes_next(tmp_path):
    root = _root(tmp_path)
    venv = tmp_path / "active"
    subprocess.run([REAL_PYTHON, "-m", "venv", "--without-pip", str(venv)], check=True)
    env = _env(_fake_python3(tmp_path / "fake", _managed_stdlib(tmp_path)), VIRTUAL_ENV=str(venv))
    done = _pick(root, env)
    assert done.returncode == 0, done.stderr
    values = _values(done.stdout)
    assert values["PYTHON"] == str(venv / "bin" / "python") and values["PREFIX"] == str(venv)
    assert values["PATH1"] == str(venv / "bin") and not (root / ".venv").exists()


def test_externally_managed_python3_gets_the_project_venv_created_once(tmp_path):
    root = _root(tmp_path)
    env = _env(_fake_python3(tmp_path / "fake", _managed_stdlib(tmp_path)))
    first = _pick(root, env)
    assert first.returncode == 0, first.stderr
    assert "externally managed" in first.stderr and "creating the project's virtual environment .venv" in first.stderr
    values = _values(first.stdout)
    assert values["PYTHON"] == str(root / ".venv" / "bin" / "python") and values["PREFIX"] == str(root / ".venv")
    assert values["PATH1"] == str(root / ".venv" / "bin")
    pip = subprocess.run([values["PYTHON"], "-m", "pip", "--version"], capture_output=True, text=True)
    assert pip.returncode == 0 and str(root / ".venv") in pip.stdout  # a real venv, with its own pip
    again = _pick(root, env)
    assert again.returncode == 0 and "creating" not in again.stderr  # reused, not created again
    assert _values(again.stdout)["PYTHON"] == values["PYTHON"]


def test_python3_of_a_virtual_environment_on_path_is_used_as_is(tmp_path):
    """pip ignores the marker of the base installation inside a virtual environment (PEP 668), and so do we."""
    root = _root(tmp_path)
    done = _pick(root, _env(_fake_python3(tmp_path / "fake", _managed_stdlib(tmp_path), in_venv=True)))
    assert done.returncode == 0, done.stderr
    assert _values(done.stdout)["PYTHON"] == "python3" and not (root / ".venv").exists()


def test_missing_venv_module_names_the_system_package(tmp_path):
    root = _root(tmp_path)
    env = _env(_fake_python3(tmp_path / "fake", _managed_stdlib(tmp_path), venv_fails=True))
    done = _pick(root, env)
    assert done.returncode != 0 and "PYTHON=" not in done.stdout
    assert "Install the system package python3-venv (Debian/Ubuntu: sudo apt install python3-venv" in done.stderr
    assert not (root / ".venv").exists()  # the half-made folder is removed, so the next run tries again


@pytest.mark.parametrize("script, expected", [("demo.sh", "examples/run_image_classification.py"), ("test.sh", "-m pytest")])
def test_the_two_commands_set_up_and_run_with_the_same_interpreter(tmp_path, script, expected):
    """``PYTHON=<venv python> bash scripts/demo.sh`` installs into and runs that interpreter, never plain python3."""
    root = _root(tmp_path)
    log = tmp_path / "calls.log"
    chosen = tmp_path / "chosen" / "python"
    chosen.parent.mkdir()
    chosen.write_text(f'#!/usr/bin/env bash\necho "chosen $*" >> "{log}"\n')
    stray = tmp_path / "stray"
    stray.mkdir()
    for name in ("python3", "python"):
        (stray / name).write_text(f'#!/usr/bin/env bash\necho "stray {name} $*" >> "{log}"\nexit 1\n')
        (stray / name).chmod(0o755)
    chosen.chmod(0o755)
    done = subprocess.run(["bash", str(root / "scripts" / script)], cwd=tmp_path, env=_env(stray, PYTHON=str(chosen)),
                          capture_output=True, text=True, timeout=120)
    calls = log.read_text().splitlines()
    assert done.returncode == 0, done.stderr + "\n".join(calls)
    assert all(c.startswith("chosen ") for c in calls), calls
    assert any("-m pip install -q -e .[test,bench]" in c for c in calls) and any(expected in c for c in calls), calls
