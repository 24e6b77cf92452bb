#!/usr/bin/env bash
# Creates or reuses .venv with every component the suite needs; idempotent.
#   scripts/bootstrap.sh            # system packages (root only, when missing) + venv
# On a cluster without root: load MPI and parallel HDF5 modules first, then set
#   REPLANDSCAPE_SKIP_APT=1 HDF5_DIR=/path/to/parallel/hdf5 (or HDF5_PKGCONFIG_NAME=...)
# and run this script; see README "Install on a cluster".
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${VENV:-$ROOT/.venv}
PY=${PYTHON:-python3}
STAMP=$VENV/.replandscape-installed
HASH=$(cat constraints.txt setup.cfg pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)

log() { printf '[bootstrap] %s\n' "$*" >&2; }

APT_PACKAGES=(openmpi-bin libopenmpi-dev libhdf5-openmpi-dev pkg-config libpmix2
  munge slurmctld slurmd slurm-client slurmdbd mariadb-server slurm-wlm-mysql-plugin)

install_system_packages() {
  [ "${REPLANDSCAPE_SKIP_APT:-0}" = 1 ] && return 0
  command -v dpkg-query >/dev/null || return 0
  local missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" != 0 ]; then
    log "missing system packages: ${missing[*]} (not root: install them or load modules, then set REPLANDSCAPE_SKIP_APT=1)"
    return 0
  fi
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

install_venv() {
  if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$HASH" ]; then
    return 0
  fi
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  local pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
  "${pip[@]}" install --upgrade "pip>=24" "setuptools>=77" wheel
  # torch first, alone: the CPU build; anything else asking for torch then finds it satisfied.
  "${pip[@]}" install "torch==2.13.0"
  "${pip[@]}" install -c constraints.txt cython pkgconfig numpy mpi4py
  # h5py with MPI (parallel HDF5). --no-cache-dir: a cached serial wheel must not be reused.
  if ! "$VENV/bin/python" -c 'import h5py,sys; sys.exit(0 if h5py.get_config().mpi else 1)' 2>/dev/null; then
    if command -v mpicc >/dev/null && { [ -n "${HDF5_DIR:-}" ] || pkg-config --exists "${HDF5_PKGCONFIG_NAME:-hdf5-openmpi}" 2>/dev/null; }; then
      log "building h5py against parallel HDF5 (about 3 minutes)"
      CC=mpicc HDF5_MPI=ON HDF5_PKGCONFIG_NAME=${HDF5_PKGCONFIG_NAME:-hdf5-openmpi} \
        "${pip[@]}" install --no-cache-dir --no-build-isolation --no-binary=h5py -c constraints.txt --force-reinstall --no-deps h5py
    else
      log "no parallel HDF5 found: installing serial h5py (per-rank shards will be used)"
      "${pip[@]}" install -c constraints.txt h5py
    fi
  fi
  "${pip[@]}" install -c constraints.txt -e ".[all,dev]"
  echo "$HASH" > "$STAMP"
}

install_system_packages
install_venv
log "ready: $VENV ($("$VENV/bin/python" -c 'import h5py; print("h5py mpi=%s" % h5py.get_config().mpi)'))"
