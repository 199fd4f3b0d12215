#!/usr/bin/env bash
# Install what the test suite and benchmarks need: Debian packages (only the
# missing ones) and the project itself in editable mode with its test extra.
#
# Idempotent and fast when nothing is missing, because CI calls it before
# every run: no apt-get update, no pip resolver run unless something changed.
# It never starts or reconfigures system services -- tests run their own
# sshd/redis/haproxy on loopback or in network namespaces with private configs.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PACKAGES=(
  openssh-server openssh-client iperf3 socat haproxy nftables iproute2 procps
  redis-server tinyproxy wrk curl chromium dnsmasq-base dnsutils
)

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  SUDO=(sudo)
fi

# A package is present if dpkg says so; on hosts without dpkg fall back to
# looking for its main command, so non-Debian developers are not blocked.
declare -A COMMAND_OF=(
  [openssh-server]=sshd [openssh-client]=ssh [iperf3]=iperf3 [socat]=socat
  [haproxy]=haproxy [nftables]=nft [iproute2]=ip [procps]=sysctl
  [redis-server]=redis-server [tinyproxy]=tinyproxy [wrk]=wrk [curl]=curl
  [chromium]=chromium [dnsmasq-base]=dnsmasq [dnsutils]=dig
)

have_package() {
  local pkg=$1
  if command -v dpkg-query >/dev/null 2>&1; then
    [ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null)" = "install ok installed" ]
  else
    PATH="$PATH:/usr/sbin:/sbin" command -v "${COMMAND_OF[$pkg]}" >/dev/null 2>&1
  fi
}

missing=()
for pkg in "${PACKAGES[@]}"; do
  have_package "$pkg" || missing+=("$pkg")
done

# What the optional C extension (kakehashi.core._dgaead, the datagram AEAD's batch path)
# needs to build: a C compiler, OpenSSL's headers, and Python.h for the interpreter in
# use. Debian's python3-dev only helps Debian's python3; another interpreter (pyenv, a
# venv's base) ships its own headers. Without apt-get they are optional: the extension
# is then not built and the Python path runs.
PY_INCLUDE="$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
build_missing=()
if command -v dpkg-query >/dev/null 2>&1; then
  for pkg in gcc libssl-dev; do
    have_package "$pkg" || build_missing+=("$pkg")
  done
  if [ ! -e "$PY_INCLUDE/Python.h" ]; then
    build_missing+=(python3-dev)
  fi
fi
if [ "${#build_missing[@]}" -gt 0 ] && command -v apt-get >/dev/null 2>&1; then
  missing+=("${build_missing[@]}")
fi

if [ "${#missing[@]}" -gt 0 ]; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-deps: missing ${missing[*]} and no apt-get; install them by hand" >&2
    exit 1
  fi
  echo "install-deps: installing ${missing[*]}" >&2
  # Debian maintainer scripts start daemons (sshd, redis, haproxy, tinyproxy)
  # through invoke-rc.d; a policy-rc.d that answers 101 ("action forbidden")
  # stops that for the duration of the install. Any existing policy is kept
  # aside and restored.
  policy=/usr/sbin/policy-rc.d
  backup=""
  if [ -e "$policy" ]; then
    backup="$(mktemp)"
    "${SUDO[@]}" cp -p "$policy" "$backup"
  fi
  restore_policy() {
    if [ -n "$backup" ]; then
      "${SUDO[@]}" cp -p "$backup" "$policy" && rm -f "$backup"
    else
      "${SUDO[@]}" rm -f "$policy"
    fi
  }
  trap restore_policy EXIT
  printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$policy" >/dev/null
  "${SUDO[@]}" chmod 755 "$policy"

  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
    --no-install-recommends "${missing[@]}"
  restore_policy
  trap - EXIT
fi

# Build the C extension in place, so `PYTHONPATH=src` finds it from a checkout (an
# editable install would leave it elsewhere); only when the source is newer than the
# module, and never fatal: where it cannot be built, the Python path runs.
build_extension() {
  local src=src/kakehashi/core/_dgaead.c
  local so
  so="$(ls src/kakehashi/core/_dgaead.*.so 2>/dev/null | head -n 1 || true)"
  if [ -n "$so" ] && [ "$so" -nt "$src" ] && [ "$so" -nt setup.py ]; then
    return 0
  fi
  if python3 setup.py -q build_ext --inplace >/dev/null 2>&1; then
    echo "install-deps: built kakehashi.core._dgaead" >&2
  else
    echo "install-deps: kakehashi.core._dgaead not built (no compiler, OpenSSL or" \
      "Python headers?); the datagram AEAD runs on its Python path" >&2
  fi
}
build_extension

# Skip pip when the editable install is already in place and every
# requirement in pyproject.toml (runtime + test extra) is satisfied; pip's
# resolver takes several seconds even when it ends up doing nothing.
if [ "${KAKEHASHI_FORCE_PIP:-0}" != "1" ] && python3 - <<'PY'
import importlib.metadata as md
import importlib.util
import pathlib
import sys
import tomllib

try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement

root = pathlib.Path.cwd().resolve()
project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
spec = importlib.util.find_spec(project["name"])
if spec is None or spec.origin is None:
    sys.exit(1)
if not pathlib.Path(spec.origin).resolve().is_relative_to((root / "src").resolve()):
    sys.exit(1)  # installed, but not the editable install of this checkout
installed_scripts = {
    ep.name for ep in md.distribution(project["name"]).entry_points
    if ep.group == "console_scripts"
}
if not set(project.get("scripts", {})) <= installed_scripts:
    sys.exit(1)
wanted = [*project.get("dependencies", [])]
wanted += project.get("optional-dependencies", {}).get("test", [])
for text in wanted:
    req = Requirement(text)
    if req.marker is not None and not req.marker.evaluate({"extra": "test"}):
        continue
    try:
        version = md.version(req.name)
    except md.PackageNotFoundError:
        sys.exit(1)
    if not req.specifier.contains(version, prereleases=True):
        sys.exit(1)
PY
then
  exit 0
fi

echo "install-deps: pip install -e .[test]" >&2
# Running as root in a CI container is expected; silence pip's warning about it.
PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q -e ".[test]"
