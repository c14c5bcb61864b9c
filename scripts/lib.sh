# Shared helpers for scripts/*.sh (sourced, not run).

# Install Debian packages that are missing (only as root on a Debian/Ubuntu machine).
# Usage: ensure_packages CMD:PACKAGE ...   (CMD is checked with `command -v` or as a path glob)
ensure_packages() {
    local missing=() pair cmd pkg
    for pair in "$@"; do
        cmd=${pair%%:*}
        pkg=${pair#*:}
        if ! command -v "$cmd" >/dev/null 2>&1 && ! compgen -G "$cmd" >/dev/null; then
            missing+=("$pkg")
        fi
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
        echo "missing packages: ${missing[*]} (install them, or run as root on Debian/Ubuntu)" >&2
        return 1
    fi
    echo "== installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # A freshly booted machine often runs its own apt (unattended upgrades): wait for its lock
    # (up to 10 minutes) instead of failing at once.
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq "${missing[@]}" >/dev/null
}
