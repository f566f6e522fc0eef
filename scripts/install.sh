#!/usr/bin/env bash
# Installs the release binaries, the control scripts, config.ini.example and the systemd units
# (`make install` runs it; `make build` first). Safe to run again: files are replaced, an
# existing config.ini is never touched.
#
# Usage: scripts/install.sh [PREFIX]        (PREFIX default /usr/local/rpc_proxy)
#
# Environment:
#   DESTDIR      staging root prepended to every path written (packages, tests); the files
#                themselves name the final paths. With DESTDIR no user is created, nothing
#                is chowned.
#   UNIT_DIR     where the units go (default /etc/systemd/system)
#   BUILD_DIR    where the binaries are taken from (default target/release of this repo)
#   RPC_USER     user and group the units run as (default rpc)
#   CREATE_USER  0: do not create RPC_USER nor chown PREFIX (default: do both when run as
#                root without DESTDIR)
#
# Layout, the original's (reference/original.md section 5):
#   PREFIX/bin/rpc_proxy, PREFIX/bin/rpc_lb
#   PREFIX/control_proxy.sh, PREFIX/control_lb.sh   (./log is PREFIX/log when run from PREFIX)
#   PREFIX/config.ini.example                        (copy to PREFIX/config.ini)
#   PREFIX/lb/                                       (<instance>.ini for rpc_lb@<instance>)
#   PREFIX/log/
#   UNIT_DIR/rpc_proxy.socket, UNIT_DIR/rpc_proxy.service, UNIT_DIR/rpc_lb@.service
# Scripts and units say /usr/local/rpc_proxy; they are rewritten to PREFIX when it differs.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
DEFAULT_PREFIX=/usr/local/rpc_proxy

if [ $# -gt 1 ]; then
    echo "usage: $0 [PREFIX]" >&2
    exit 64
fi
PREFIX=${1:-${PREFIX:-$DEFAULT_PREFIX}}
PREFIX=${PREFIX%/}
# The units name PREFIX unquoted, where systemd splits on spaces and expands %, $ and \.
if [[ $PREFIX != /* ]] || [[ $PREFIX =~ [[:space:]%\$\"\'\\] ]]; then
    echo "install.sh: PREFIX must be an absolute path without spaces, quotes, %, \$ or \\: $PREFIX" >&2
    exit 64
fi
DESTDIR=${DESTDIR:-}
DESTDIR=${DESTDIR%/}
UNIT_DIR=${UNIT_DIR:-/etc/systemd/system}
BUILD_DIR=${BUILD_DIR:-$REPO/target/release}
RPC_USER=${RPC_USER:-rpc}

for bin in rpc_proxy rpc_lb; do
    if [ ! -x "$BUILD_DIR/$bin" ]; then
        echo "install.sh: $BUILD_DIR/$bin not found: run \`make build\` first (or set BUILD_DIR)" >&2
        exit 1
    fi
done

# sed replacement text: escape the delimiter, & and backslashes.
sed_escape() {
    printf '%s' "$1" | sed -e 's/[\\|&]/\\&/g'
}
PREFIX_SED=$(sed_escape "$PREFIX")
USER_SED=$(sed_escape "$RPC_USER")

# Copies a text file, naming PREFIX and RPC_USER where the source names the defaults.
install_rewritten() {
    local mode=$1 src=$2 dest=$3 tmp
    tmp=$(mktemp)
    sed -e "s|$DEFAULT_PREFIX|$PREFIX_SED|g" \
        -e "s|^User=rpc\$|User=$USER_SED|" \
        -e "s|^Group=rpc\$|Group=$USER_SED|" \
        -e "s|^SocketUser=rpc\$|SocketUser=$USER_SED|" \
        -e "s|^SocketGroup=rpc\$|SocketGroup=$USER_SED|" "$src" >"$tmp"
    install -D -m "$mode" "$tmp" "$dest"
    rm -f "$tmp"
}

root=$DESTDIR$PREFIX
echo "install.sh: installing into $root (units into $DESTDIR$UNIT_DIR)"
install -d -m 0755 "$root" "$root/bin" "$root/lb" "$root/log" "$DESTDIR$UNIT_DIR"
install -m 0755 "$BUILD_DIR/rpc_proxy" "$BUILD_DIR/rpc_lb" "$root/bin/"
install_rewritten 0755 "$REPO/scripts/control_proxy.sh" "$root/control_proxy.sh"
install_rewritten 0755 "$REPO/scripts/control_lb.sh" "$root/control_lb.sh"
install -m 0644 "$REPO/config.ini.example" "$root/config.ini.example"
install_rewritten 0644 "$REPO/systemd/rpc_proxy.socket" "$DESTDIR$UNIT_DIR/rpc_proxy.socket"
install_rewritten 0644 "$REPO/systemd/rpc_proxy.service" "$DESTDIR$UNIT_DIR/rpc_proxy.service"
install_rewritten 0644 "$REPO/systemd/rpc_lb@.service" "$DESTDIR$UNIT_DIR/rpc_lb@.service"

# The services run as RPC_USER and create their sockets and logs in PREFIX, PREFIX/log and
# PREFIX/lb: group-writable for RPC_USER, sticky so it cannot rename or replace root's bin/.
if [ -z "$DESTDIR" ] && [ "$(id -u)" -eq 0 ] && [ "${CREATE_USER:-1}" != 0 ]; then
    if ! getent passwd "$RPC_USER" >/dev/null; then
        echo "install.sh: creating system user $RPC_USER"
        useradd --system --user-group --home-dir "$PREFIX" --no-create-home \
            --shell /usr/sbin/nologin "$RPC_USER"
    fi
    chown "root:$RPC_USER" "$PREFIX" "$PREFIX/log" "$PREFIX/lb"
    chmod 1775 "$PREFIX" "$PREFIX/log" "$PREFIX/lb"
fi

cat <<EOF
install.sh: done. Next:
  cp $PREFIX/config.ini.example $PREFIX/config.ini    # then edit zk=, proxy_address=
  # (another proxy_address: the same path in ListenStream= of rpc_proxy.socket)
  systemctl daemon-reload && systemctl enable --now rpc_proxy.socket rpc_proxy
  # one LB per service instance: $PREFIX/lb/<name>.ini, then
  systemctl enable --now rpc_lb@<name>
Clients and workers using the unix sockets must be in group $RPC_USER.
EOF
