#!/usr/bin/env bash
# install.sh: install smapd as a service, from this checkout.
#
#   sudo ./install.sh                 install or upgrade (running it again changes nothing)
#   sudo ./install.sh --uninstall     remove the program and the unit; keep spool, config, user, cache
#   sudo ./install.sh --purge         also remove the config, the model cache, the spool (unless it is
#                                     on a network filesystem) and the user
#
# What it does, each step only when needed:
#   - a static system user and group (default smapd; --uid/--gid fix the numbers, which NFS needs
#     to be the same on every node sharing a spool);
#   - the spool layout (default /var/spool/smapd), owned by the user, setgid group smapd:
#       inbox/ 2775 and outbox/ 2770: members of the group drop files and collect (and delete) results;
#       processing/ archive/ failed/ .smapd/ 2750: the daemon's; the group may look (smapd status);
#     add people to the group (usermod -aG smapd NAME) to let them use the spool;
#   - a virtual environment PREFIX/venv (default /opt/smapd) with smapd and its embedded model
#     package installed from this checkout (pip, from the configured package index: the only
#     network access), and `smapd` on PATH via /usr/local/bin/smapd;
#   - the embedded model assembled into /var/cache/smapd as the service user;
#   - /etc/smapd/smapd.env from config/ (an edited one is never overwritten: the new version goes
#     next to it as smapd.env.new);
#   - the unit /etc/systemd/system/smapd.service, then `systemctl daemon-reload` when systemd runs.
# On a machine without systemd everything but the unit works: `smapd transcribe`, `smapd run`.
set -euo pipefail

PROG=${0##*/}
SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PREFIX=/opt/smapd
SPOOL=/var/spool/smapd
SVC_USER=smapd
SVC_UID=
SVC_GID=
# The system's Python: the service user cannot use one under /root or /home (ProtectHome=).
PYTHON=${PYTHON:-$( [[ -x /usr/bin/python3 ]] && echo /usr/bin/python3 || echo python3 )}
ACTION=install
CONF_DIR=/etc/smapd
UNIT_DIR=/etc/systemd/system
UNIT=smapd.service
CACHE_DIR=/var/cache/smapd  # the unit's CacheDirectory=smapd
BIN_LINK=/usr/local/bin/smapd

usage() {
    cat <<EOF
Usage: sudo $PROG [OPTIONS]

Install smapd (program, user, spool, model, config, systemd unit) from this checkout.
Idempotent: running it again with the same options changes nothing.

Options:
  --prefix DIR     where the program goes (default /opt/smapd; the venv is DIR/venv)
  --spool DIR      the spool directory (default /var/spool/smapd); may be an NFS mount
  --user NAME      the service user and group (default smapd)
  --uid N          numeric UID for a new user (use the same on every node sharing an NFS spool)
  --gid N          numeric GID for a new group (same)
  --python PATH    the interpreter for the venv (default /usr/bin/python3; 3.10 or newer;
                   not one under /root or /home, which the service cannot see)
  --uninstall      remove the program and the unit; keep the spool, the config, the cache, the user
  --purge          --uninstall, and also remove $CONF_DIR, $CACHE_DIR, the user and the spool
                   (a spool on a network filesystem is never removed)
  -h, --help       this help

After installing: edit $CONF_DIR/smapd.env, then \`systemctl enable --now smapd\`.
Uninstall with the same --prefix/--spool/--user you installed with.
EOF
}

say() { printf '%s: %s\n' "$PROG" "$*"; }
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }

while (($#)); do
    case $1 in
        --prefix) PREFIX=${2:?--prefix needs a directory}; shift 2 ;;
        --prefix=*) PREFIX=${1#*=}; shift ;;
        --spool) SPOOL=${2:?--spool needs a directory}; shift 2 ;;
        --spool=*) SPOOL=${1#*=}; shift ;;
        --user) SVC_USER=${2:?--user needs a name}; shift 2 ;;
        --user=*) SVC_USER=${1#*=}; shift ;;
        --uid) SVC_UID=${2:?--uid needs a number}; shift 2 ;;
        --uid=*) SVC_UID=${1#*=}; shift ;;
        --gid) SVC_GID=${2:?--gid needs a number}; shift 2 ;;
        --gid=*) SVC_GID=${1#*=}; shift ;;
        --python) PYTHON=${2:?--python needs a path}; shift 2 ;;
        --python=*) PYTHON=${1#*=}; shift ;;
        --uninstall) ACTION=uninstall; shift ;;
        --purge) ACTION=purge; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option: $1" ;;
    esac
done

for v in PREFIX SPOOL; do
    # The unit lists these paths space-separated: no whitespace, absolute, no trailing slash.
    path=${!v%/}
    [[ $path == /?* && $path != *[[:space:]]* && $path != *'"'* ]] \
        || die "--${v,,} must be an absolute path without spaces or quotes, got '${!v}'"
    printf -v "$v" '%s' "$path"
done
[[ $PREFIX != / && $PREFIX != /usr && $PREFIX != /opt ]] || die "--prefix $PREFIX would mix smapd into the system"
[[ $SVC_USER =~ ^[a-z_][a-z0-9_-]{0,31}$ ]] || die "--user must be a valid user name, got '$SVC_USER'"
[[ -z $SVC_UID || $SVC_UID =~ ^[0-9]+$ ]] || die "--uid must be a number, got '$SVC_UID'"
[[ -z $SVC_GID || $SVC_GID =~ ^[0-9]+$ ]] || die "--gid must be a number, got '$SVC_GID'"
[[ $(id -u) -eq 0 ]] || die "must run as root (try: sudo ./$PROG)"

umask 022  # the service user must be able to read the program and the config
VENV=$PREFIX/venv

systemd_running() {
    # sd_booted(3): systemd is PID 1 when /run/systemd/system/ exists.
    [[ -d /run/systemd/system && $(cat /proc/1/comm 2>/dev/null) == systemd ]]
}

# ---------------------------------------------------------------------------------------------
# uninstall / purge
# ---------------------------------------------------------------------------------------------
uninstall() {
    if systemd_running && [[ -e $UNIT_DIR/$UNIT ]]; then
        say "stopping and disabling $UNIT"
        systemctl disable --now "$UNIT" >/dev/null 2>&1 || true
    fi
    if [[ -e $UNIT_DIR/$UNIT || -d $UNIT_DIR/$UNIT.d ]]; then
        say "removing $UNIT_DIR/$UNIT"
        rm -f "$UNIT_DIR/$UNIT"
        systemd_running && systemctl daemon-reload
    fi
    if [[ -L $BIN_LINK && $(readlink "$BIN_LINK") == "$VENV/bin/smapd" ]]; then
        say "removing $BIN_LINK"
        rm -f "$BIN_LINK"
    fi
    # Only what install.sh put there: the prefix may hold other things.
    if [[ -e $VENV || -e $PREFIX/.smapd-install || -e $PREFIX/share/smapd.env ]]; then
        say "removing $VENV"
        rm -rf -- "$VENV" "$PREFIX/.smapd-install" "$PREFIX/share/smapd.env"
        rmdir -- "$PREFIX/share" "$PREFIX" 2>/dev/null || true
    fi
    [[ $ACTION == purge ]] || { say "uninstalled; kept $SPOOL, $CONF_DIR, $CACHE_DIR and user $SVC_USER"; return; }

    if [[ -d $UNIT_DIR/$UNIT.d ]]; then
        say "removing drop-ins $UNIT_DIR/$UNIT.d"
        rm -rf -- "${UNIT_DIR:?}/$UNIT.d"
        systemd_running && systemctl daemon-reload
    fi
    for d in "$CONF_DIR" "$CACHE_DIR"; do
        [[ -e $d ]] && { say "removing $d"; rm -rf -- "$d"; }
    done
    if [[ -d $SPOOL ]]; then
        fstype=$(stat -f -c %T "$SPOOL")
        case $fstype in
            nfs*|cifs|smb*|fuse*|ceph|glusterfs|lustre|gpfs|9p)
                say "keeping $SPOOL: it is on a network filesystem ($fstype), other nodes may use it" ;;
            *) say "removing $SPOOL"; rm -rf -- "$SPOOL" ;;
        esac
    fi
    if getent passwd "$SVC_USER" >/dev/null; then
        say "removing user $SVC_USER"
        userdel "$SVC_USER"
    fi
    if getent group "$SVC_USER" >/dev/null; then
        groupdel "$SVC_USER"
    fi
    say "purged"
}

if [[ $ACTION != install ]]; then
    uninstall
    exit 0
fi

# ---------------------------------------------------------------------------------------------
# install
# ---------------------------------------------------------------------------------------------
[[ -f $SRC/pyproject.toml && -d $SRC/smapd && -f $SRC/systemd/$UNIT && -f $SRC/config/smapd.env ]] \
    || die "run $PROG from an smapd checkout (missing pyproject.toml, smapd/, systemd/ or config/ in $SRC)"

# --- Python with venv -------------------------------------------------------------------------
if ! command -v "$PYTHON" >/dev/null || ! "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null; then
    if [[ $PYTHON == python3 || $PYTHON == /usr/bin/python3 ]] && command -v apt-get >/dev/null; then
        say "installing python3 and python3-venv (apt)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv \
            || die "apt-get could not install python3-venv; install it and run $PROG again"
    else
        die "$PYTHON with the venv module is required (Debian/Ubuntu: apt-get install python3-venv)"
    fi
fi
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || die "smapd needs Python 3.10 or newer; $PYTHON is $("$PYTHON" --version 2>&1)"
real_python=$("$PYTHON" -c 'import os, sys; print(os.path.realpath(sys.executable))')
case $real_python in
    /root/*|/home/*|/run/user/*)
        die "$PYTHON is $real_python, which the service user cannot reach (ProtectHome=); use --python /usr/bin/python3" ;;
esac

# --- the user and group -----------------------------------------------------------------------
if getent group "$SVC_USER" >/dev/null; then
    gid=$(getent group "$SVC_USER" | cut -d: -f3)
    [[ -z $SVC_GID || $SVC_GID == "$gid" ]] \
        || die "group $SVC_USER exists with GID $gid, not the requested $SVC_GID (NFS needs the same GID on every node)"
else
    say "creating group $SVC_USER${SVC_GID:+ (GID $SVC_GID)}"
    groupadd --system ${SVC_GID:+--gid "$SVC_GID"} "$SVC_USER"
fi
if getent passwd "$SVC_USER" >/dev/null; then
    uid=$(getent passwd "$SVC_USER" | cut -d: -f3)
    [[ -z $SVC_UID || $SVC_UID == "$uid" ]] \
        || die "user $SVC_USER exists with UID $uid, not the requested $SVC_UID (NFS needs the same UID on every node)"
else
    say "creating system user $SVC_USER${SVC_UID:+ (UID $SVC_UID)}"
    useradd --system ${SVC_UID:+--uid "$SVC_UID"} --gid "$SVC_USER" --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin --comment "smapd transcription daemon" "$SVC_USER"
fi

# ensure_dir PATH MODE OWNER GROUP: create, or fix owner and mode; a root-squashed NFS spool may
# refuse the fix, which is then the admin's to make (warn, do not fail).
ensure_dir() {
    local path=$1 mode=$2 owner=$3 group=$4 have
    if [[ ! -d $path ]]; then
        say "creating $path ($mode $owner:$group)"
        install -d -m "$mode" -o "$owner" -g "$group" "$path"
        return
    fi
    have=$(stat -c '%a %U %G' "$path")
    [[ $have == "${mode#0} $owner $group" ]] && return
    say "fixing $path: $have -> ${mode#0} $owner $group"
    { chown "$owner:$group" "$path" && chmod "$mode" "$path"; } 2>/dev/null \
        || say "warning: cannot change $path (root-squashed NFS?); set it to ${mode#0} $owner:$group there"
}

# --- the spool --------------------------------------------------------------------------------
ensure_dir "$SPOOL" 2775 "$SVC_USER" "$SVC_USER"
ensure_dir "$SPOOL/inbox" 2775 "$SVC_USER" "$SVC_USER"
ensure_dir "$SPOOL/outbox" 2770 "$SVC_USER" "$SVC_USER"
for d in processing archive failed .smapd; do
    ensure_dir "$SPOOL/$d" 2750 "$SVC_USER" "$SVC_USER"
done

# --- the program --------------------------------------------------------------------------------
# A fingerprint of what pip would install; the same fingerprint means nothing to do.
fingerprint() {
    local files=(pyproject.toml) f
    for f in README.md LICENSE LICENSE.txt; do if [[ -f $SRC/$f ]]; then files+=("$f"); fi; done
    (cd "$SRC" && "$PYTHON" --version && sha256sum "${files[@]}" \
        && find smapd -type f ! -name '*.pyc' ! -path '*/__pycache__/*' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum) \
        | sha256sum | cut -d' ' -f1
}
want=$(fingerprint)
stamp=$PREFIX/.smapd-install
if [[ -x $VENV/bin/smapd && -f $stamp && $(cat "$stamp") == "$want" ]] && "$VENV/bin/python" -c 'import smapd' 2>/dev/null; then
    say "smapd already installed in $VENV"
else
    install -d -m 0755 "$PREFIX"
    if ! "$VENV/bin/python" -c '' 2>/dev/null; then
        say "creating virtual environment $VENV ($("$PYTHON" --version 2>&1))"
        rm -rf -- "$VENV"
        "$PYTHON" -m venv "$VENV"
    fi
    # Build from a copy: pip builds in the source tree, which must stay clean (and may be read-only).
    build=$(mktemp -d)
    trap 'rm -rf -- "$build"' EXIT
    cp -r "$SRC/pyproject.toml" "$SRC/smapd" "$build/"
    for f in README.md LICENSE LICENSE.txt; do if [[ -f $SRC/$f ]]; then cp "$SRC/$f" "$build/"; fi; done
    find "$build" -name __pycache__ -prune -exec rm -rf {} +
    [[ -f $build/README.md ]] || echo "smapd" > "$build/README.md"  # pyproject names it
    say "installing smapd into $VENV (pip)"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input "$build" \
        || die "pip install failed (see above); the package index must be reachable"
    echo "$want" > "$stamp"
fi
if [[ -L $BIN_LINK || ! -e $BIN_LINK ]]; then
    if [[ $(readlink "$BIN_LINK" 2>/dev/null) != "$VENV/bin/smapd" ]]; then
        say "linking $BIN_LINK -> $VENV/bin/smapd"
        install -d -m 0755 "$(dirname "$BIN_LINK")"
        ln -sfn "$VENV/bin/smapd" "$BIN_LINK"
    fi
else
    say "warning: $BIN_LINK exists and is not a link; leaving it (run $VENV/bin/smapd)"
fi

# --- the config ---------------------------------------------------------------------------------
# PREFIX/share keeps the shipped version: an /etc file equal to it is unedited and may be upgraded.
install -d -m 0755 "$CONF_DIR" "$PREFIX/share"
new=$SRC/config/smapd.env conf=$CONF_DIR/smapd.env dist=$PREFIX/share/smapd.env
if [[ ! -e $conf ]] || { [[ -f $dist ]] && cmp -s "$dist" "$conf" && ! cmp -s "$new" "$conf"; }; then
    say "installing $conf"
    install -m 0644 "$new" "$conf"
elif ! cmp -s "$new" "$conf"; then
    if ! cmp -s "$new" "$conf.new"; then
        say "$conf was edited: leaving it, the shipped version is $conf.new (compare them)"
        install -m 0644 "$new" "$conf.new"
    fi
fi
cmp -s "$new" "$dist" || install -m 0644 "$new" "$dist"

# --- the model, as the service user (the service reads it from its CacheDirectory) -------------
ensure_dir "$CACHE_DIR" 0750 "$SVC_USER" "$SVC_USER"
as_service() {
    # The environment the unit gives the daemon, with the config file; one worker is enough here.
    (cd / && runuser -u "$SVC_USER" -- env -i PATH=/usr/bin:/bin LANG=C.UTF-8 CACHE_DIRECTORY="$CACHE_DIR" \
        SMAPD_CONFIG="$conf" MAX_PARALLEL_WORKERS=1 "$@")
}
as_service "$VENV/bin/python" -c \
    'import sys; from pathlib import Path; from smapd.model import ensure_embedded; ensure_embedded(Path(sys.argv[1]))' \
    "$CACHE_DIR" || die "could not assemble the embedded model into $CACHE_DIR"
say "embedded model ready in $CACHE_DIR; checking the configuration and loading the model (smapd check)"
as_service "$VENV/bin/smapd" check || die "smapd check failed with $conf (see above)"

# --- the unit -------------------------------------------------------------------------------------
unit_text=$(sed -e "s|/opt/smapd/|$PREFIX/|g" -e "s|/var/spool/smapd|$SPOOL|g" \
    -e "s|^User=smapd\$|User=$SVC_USER|" -e "s|^Group=smapd\$|Group=$SVC_USER|" "$SRC/systemd/$UNIT")
changed=no
if [[ ! -f $UNIT_DIR/$UNIT || $(cat "$UNIT_DIR/$UNIT") != "$unit_text" ]]; then
    say "installing $UNIT_DIR/$UNIT"
    install -d -m 0755 "$UNIT_DIR"
    printf '%s\n' "$unit_text" > "$UNIT_DIR/$UNIT.tmp"
    chmod 0644 "$UNIT_DIR/$UNIT.tmp"
    mv -f "$UNIT_DIR/$UNIT.tmp" "$UNIT_DIR/$UNIT"
    changed=yes
fi
if systemd_running; then
    [[ $changed == yes ]] && systemctl daemon-reload
    if systemctl is-active --quiet "$UNIT"; then
        say "smapd is running; to use the new version: systemctl restart smapd"
    else
        say "done. Edit $conf, then: systemctl enable --now smapd"
    fi
else
    say "done (systemd is not running here: the unit is installed but not loaded; \`smapd run\` works by hand)"
fi
