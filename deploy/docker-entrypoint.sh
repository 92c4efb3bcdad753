#!/bin/sh
# Entrypoint of the manager image (Dockerfile): gives the manager a stable id of its own,
# then runs the service's command.
#
# LAB_MANAGER_ID labels every Docker resource the manager creates (instances, volumes,
# networks) and names its firewall chains. Outside a container its default is derived
# from the data dir's path, which is the same in every compose project; so here, unless
# set, it is a random id made once and kept in the data dir (the first service to start,
# migrate, makes it; a link makes the creation atomic).
set -eu

DATA="${LAB_DATA_DIR:-/var/lib/otree-lab}"
if [ -z "${LAB_MANAGER_ID:-}" ]; then
    ID_FILE="$DATA/manager-id"
    if [ ! -s "$ID_FILE" ]; then
        mkdir -p "$DATA"
        tmp=$(mktemp "$DATA/.manager-id.XXXXXX")
        od -An -N5 -tx1 /dev/urandom | tr -d ' \n' > "$tmp"
        echo >> "$tmp"
        ln "$tmp" "$ID_FILE" 2>/dev/null || :  # another service may have made it first
        rm -f "$tmp"
    fi
    LAB_MANAGER_ID=$(cat "$ID_FILE")
    export LAB_MANAGER_ID
fi

exec "$@"
