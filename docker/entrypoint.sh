#!/bin/sh
# Entrypoint of the qlora-kit image: make HOME usable for any --user, then run the command.
#
# `make docker-*` runs the container as the calling user (--user UID:GID). When that UID is the
# one the image was built for (the default), HOME is /home/app. For any other UID there is no
# passwd entry and no writable HOME, and tools that write there (git, matplotlib, triton, the
# CUDA JIT cache) would fail, so HOME moves to a fresh directory under /tmp.
set -eu

if [ -z "${HOME:-}" ] || [ "${HOME}" = "/" ] || [ ! -w "${HOME}" ]; then
    HOME="$(mktemp -d /tmp/home.XXXXXX)"
    export HOME
fi

# git refuses a repository owned by another user ("dubious ownership"); the bind-mounted repo
# is owned by the host user, which differs from ours only when --user was overridden.
if [ -d /workspace/.git ] && [ "$(stat -c %u /workspace)" != "$(id -u)" ]; then
    git config --global --add safe.directory /workspace
fi

exec "$@"
