# Sourced by scripts/test: install the system tools the deployment tests run, when missing.
#   promtool, prometheus: Debian package `prometheus` (checks the rules and alerts, end-to-end scrape test)
#   docker-compose:       Debian package `docker-compose` (`docker-compose config` validates docker-compose.yml)
# kubectl (kustomize) and kubernetes-validate come from PyPI with the `dev` extra.
# Needs root (as on CI) or the tools already on PATH; otherwise it stops with the command to run.
set -euo pipefail
_missing=()
command -v promtool >/dev/null 2>&1 || _missing+=(prometheus)
command -v prometheus >/dev/null 2>&1 || _missing+=(prometheus)
command -v docker-compose >/dev/null 2>&1 || _missing+=(docker-compose)
if [ "${#_missing[@]}" -gt 0 ]; then
  _pkgs="$(printf '%s\n' "${_missing[@]}" | sort -u | tr '\n' ' ')"
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "missing tools; install them first: sudo apt-get install -y --no-install-recommends $_pkgs" >&2
    exit 1
  fi
  echo "== installing $_pkgs(apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # shellcheck disable=SC2086
  apt-get install -y -qq --no-install-recommends $_pkgs >/dev/null
fi
unset _missing _pkgs
