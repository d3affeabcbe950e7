#!/bin/sh
# Like the official image: a redis-server started without a config file answers clients on
# every interface of its container network (protected mode would refuse them without a password).
set -eu
if [ "${1:-}" = "redis-server" ]; then
    shift
    set -- redis-server --protected-mode no "$@"
fi
exec "$@"
