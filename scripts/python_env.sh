# Sourced (from the repository root) by setup_env.sh, demo.sh and test.sh: picks the ONE Python interpreter they all
# use and exports it as PYTHON, so that set-up installs into the interpreter that then runs.
#   1. $PYTHON when set (PYTHON=python3 forces the system interpreter);
#   2. else the active virtual environment: $VIRTUAL_ENV/bin/python;
#   3. else, when python3 refuses `pip install` outside a virtual environment (PEP 668: an EXTERNALLY-MANAGED file in
#      its stdlib folder, as on Debian and Ubuntu), the project's own .venv, created on first use;
#   4. else python3 itself.
# A virtual environment's bin folder goes first on PATH, so `accelerate` and `torchrun` come from the same install.

_hf_fop_pick_python() {
  if [ -n "${PYTHON:-}" ]; then
    if ! command -v "$PYTHON" >/dev/null 2>&1; then
      echo "PYTHON=$PYTHON cannot be run: set PYTHON to a Python >= 3.10 interpreter, or leave it unset." >&2
      return 1
    fi
  elif [ -n "${VIRTUAL_ENV:-}" ]; then
    PYTHON=$VIRTUAL_ENV/bin/python
    if [ ! -x "$PYTHON" ]; then
      echo "The active virtual environment VIRTUAL_ENV=$VIRTUAL_ENV has no bin/python: activate a working one, or deactivate it." >&2
      return 1
    fi
  else
    if ! command -v python3 >/dev/null 2>&1; then
      echo "No python3 found: install Python >= 3.10, or set PYTHON=/path/to/python." >&2
      return 1
    fi
    local probe stdlib in_venv
    probe=$(python3 -c 'import sys, sysconfig; print(sysconfig.get_path("stdlib")); print(int(sys.prefix != sys.base_prefix))') || return 1
    stdlib=$(printf '%s\n' "$probe" | sed -n 1p)
    in_venv=$(printf '%s\n' "$probe" | sed -n 2p)
    if [ "$in_venv" = 1 ] || [ ! -f "$stdlib/EXTERNALLY-MANAGED" ]; then
      PYTHON=python3
      return 0
    fi
    if [ ! -x .venv/bin/python ]; then
      local existed=0
      [ -e .venv ] && existed=1
      echo "python3 refuses pip install outside a virtual environment (PEP 668, externally managed): creating the project's virtual environment .venv" >&2
      if ! python3 -m venv .venv; then
        [ "$existed" = 1 ] || rm -rf .venv
        local version
        version=$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")' 2>/dev/null || echo 3)
        echo "Cannot create the virtual environment .venv: python3's venv module is missing. Install the system package python3-venv (Debian/Ubuntu: sudo apt install python3-venv, or python$version-venv), or activate a virtual environment, or set PYTHON=/path/to/python." >&2
        return 1
      fi
    fi
    PYTHON=$PWD/.venv/bin/python
  fi
  case "$PYTHON" in
    */*) PATH="$(cd "$(dirname "$PYTHON")" && pwd):$PATH" ;;
  esac
}

_hf_fop_pick_python || return 1
export PYTHON PATH
