#!/usr/bin/env bash
# Install the Debian packages given as arguments when they are missing (as root, no prompts).
# With ONDEVICE_DEB_BACKPORTS=1 on Debian 12 (bookworm), take them from bookworm-backports
# (adding that suite to apt's sources if needed): Mesa 25's lavapipe runs the wgpu backend's
# shaders 3-4x faster than bookworm's Mesa 22.3. CI sets it; elsewhere it is opt-in. Only the
# packages in ONDEVICE_DEB_BACKPORT_PACKAGES (Mesa's) must be the backports build; the others
# (Chromium has no backports build) are fine as installed.
set -euo pipefail
bpo_packages=" ${ONDEVICE_DEB_BACKPORT_PACKAGES:-mesa-vulkan-drivers} "
backports=""
if [ "${ONDEVICE_DEB_BACKPORTS:-0}" = "1" ] && grep -q '^VERSION_CODENAME=bookworm' /etc/os-release 2>/dev/null; then
  backports="bookworm-backports"
fi
missing=()
for pkg in "$@"; do
  if [ -n "$backports" ] && [[ "$bpo_packages" == *" $pkg "* ]]; then
    version=$(dpkg-query -W -f='${Status} ${Version}' "$pkg" 2>/dev/null || true)
    case "$version" in "install ok installed"*bpo12*) continue ;; esac
  else
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" && continue
  fi
  missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null; then
  echo "system-deps: please install ${missing[*]} with your package manager" >&2
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "system-deps: missing ${missing[*]}; run: sudo apt-get install ${missing[*]}" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
target=()
if [ -n "$backports" ]; then
  if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    # The same mirror the system already uses for bookworm (deb822 or one-line sources).
    mirror=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '
      /^URIs:/ {uri = $2}
      /^Suites:/ {for (i = 2; i <= NF; i++) if ($i == "bookworm") {print uri; exit}}
      /^$/ {uri = ""}')
    if [ -z "$mirror" ]; then
      mirror=$(awk '$1 == "deb" && $3 == "bookworm" {print $2; exit}' /etc/apt/sources.list \
        /etc/apt/sources.list.d/*.list 2>/dev/null | head -n1)
    fi
    if [ -z "$mirror" ]; then
      echo "system-deps: no Debian mirror configured for bookworm; add bookworm-backports" >&2
      exit 1
    fi
    cat > /etc/apt/sources.list.d/bookworm-backports.sources <<SRC
Types: deb
URIs: $mirror
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  fi
  target=(-t "$backports")
fi
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${target[@]}" "${missing[@]}" </dev/null
