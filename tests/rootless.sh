#!/usr/bin/env bash
# The pod network's and the streaming tests once more as an ordinary user, as on Binder or a laptop without sudo: that
# user's sandbox builds the same network inside a user namespace of its own. Run as root (`make test`
# does when it runs as root); it makes the user if needed and lets it reach this checkout's Python.
set -euo pipefail
user="${1:-labkit-ci}"
cd "$(dirname "$0")/.."
repo="$PWD"
python="$repo/.venv/bin/python"
if [ "$(id -u)" != 0 ]; then
  echo "tests/rootless.sh runs as root: it runs the tests as another, ordinary user" >&2
  exit 2
fi
id "$user" >/dev/null 2>&1 || useradd --create-home --shell /bin/bash "$user"
# The user must be able to walk to this checkout and to the Python the venv points at (pyenv keeps it under
# /root, which others may not enter): give others the right to pass through, and nothing more.
cache="$("$python" -c 'from labkit.paths import cache_root; print(cache_root())')"
for target in "$repo" "$(readlink -f "$python")" "$cache"; do
  dir="$(dirname "$target")"
  while [ "$dir" != / ]; do
    perms="$(stat -c %A "$dir")"
    if [ "${perms:9:1}" = "-" ]; then chmod o+x "$dir"; fi
    dir="$(dirname "$dir")"
  done
done
chmod -R o+rX "$cache"  # the pinned binaries (nothing secret), for the user's sandbox to run
echo "running tests/test_network.py and tests/test_streaming.py as $user (rootless sandbox)"
exec runuser -u "$user" -- env -i HOME="$(getent passwd "$user" | cut -d: -f6)" PATH="$repo/.venv/bin:/usr/local/bin:/usr/bin:/bin" \
  LABKIT_CACHE_DIR="$cache" "$python" -m pytest -p no:cacheprovider -q tests/test_network.py tests/test_streaming.py "${@:2}"
