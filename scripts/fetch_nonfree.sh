#!/usr/bin/env bash
# Download Debian packages from the non-free/contrib sections without touching the system's apt sources, and unpack
# them into the cache: `bash scripts/fetch_nonfree.sh PACKAGE...` -> $SPEECHLM_CACHE/nonfree/root/usr/...
#
# The demo's real, open-vocabulary speech (The Ur-Quan Masters voice acting: uqm-voice + uqm-content, licence
# CC BY-NC-SA 2.5, non-commercial) and the natural TTS voices (libttspico) live there. Nothing is installed
# system-wide: a private apt configuration points at a copy of the system's own Debian entry with more components,
# with private lists and cache folders. Works as root or not. Idempotent: unpacked packages are skipped.
# `--install PACKAGE...` (root) installs them system-wide instead, through the same private configuration: for
# programs with compiled-in data paths (pico2wave reads /usr/share/pico/lang).
set -euo pipefail
install=0
if [ "${1:-}" = "--install" ]; then install=1; shift; fi
CACHE=${SPEECHLM_CACHE:-$HOME/.cache/speechlm}
BASE="$CACHE/nonfree"
ROOT="$BASE/root"
mkdir -p "$BASE/apt/sources.list.d" "$BASE/apt/lists/partial" "$BASE/apt/cache/archives/partial" "$BASE/debs" "$ROOT"

todo=()
for package in "$@"; do
  if [ $install = 1 ]; then
    dpkg -s "$package" >/dev/null 2>&1 || todo+=("$package")
  else
    [ -f "$BASE/debs/$package.unpacked" ] || todo+=("$package")
  fi
done
[ ${#todo[@]} -eq 0 ] && exit 0

SYSTEM_SOURCES=/etc/apt/sources.list.d/debian.sources
if [ -f "$SYSTEM_SOURCES" ]; then
  # Same URIs, suites and key as the system's first (main archive) entry, with all components.
  awk 'BEGIN{RS=""; ORS="\n\n"} NR==1' "$SYSTEM_SOURCES" \
    | sed -E 's/^Components:.*/Components: main contrib non-free non-free-firmware/' \
    > "$BASE/apt/sources.list.d/debian.sources"
else
  codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
  printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: %s\nComponents: main contrib non-free non-free-firmware\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
    "$codename" > "$BASE/apt/sources.list.d/debian.sources"
fi
cat > "$BASE/apt/apt.conf" <<EOF
Dir::Etc::SourceList "/dev/null";
Dir::Etc::SourceParts "$BASE/apt/sources.list.d";
Dir::State::Lists "$BASE/apt/lists";
Dir::Cache "$BASE/apt/cache";
Dir::Cache::archives "$BASE/apt/cache/archives";
Debug::NoLocking "true";
APT::Sandbox::User "root";
EOF
export APT_CONFIG="$BASE/apt/apt.conf"
if [ -z "$(ls "$BASE/apt/lists" | grep -v partial || true)" ] || [ -n "$(find "$BASE/apt/lists" -maxdepth 0 -mtime +7)" ]; then
  echo "[fetch] apt-get update (private lists, non-free + contrib)"
  apt-get update -qq
fi
if [ $install = 1 ]; then
  echo "[fetch] apt-get install ${todo[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${todo[@]}" >/dev/null
  exit 0
fi
cd "$BASE/debs"
for package in "${todo[@]}"; do
  echo "[fetch] $package"
  rm -f "${package}"_*.deb
  apt-get download -qq "$package"
  dpkg-deb -x "${package}"_*.deb "$ROOT"
  rm -f "${package}"_*.deb
  touch "$package.unpacked"
done
