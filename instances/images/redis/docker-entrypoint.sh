#!/bin/sh
# Entrypoint of the local redis image, compatible with the official one: arguments that
# start with "-" (or a *.conf file) go to redis-server; started as root it drops to the
# redis user. Without a config file of your own, redis listens on all interfaces with
# protected mode off (the official image compiles it off: the container sits on a private
# network) and keeps no snapshot or AOF; your own --options come last and win.
set -eu

case "${1:-}" in
    -*|*.conf) set -- redis-server "$@" ;;
esac

if [ "${1:-}" = redis-server ]; then
    if [ "$(id -u)" = 0 ]; then
        find . \! -user redis -exec chown redis '{}' +
        exec setpriv --reuid=redis --regid=redis --init-groups "$0" "$@"
    fi
    shift
    case "${1:-}" in
        ""|-*) set -- redis-server --protected-mode no --save '' --appendonly no "$@" ;;
        *) set -- redis-server "$@" ;;  # a config file: it decides
    esac
fi

exec "$@"
