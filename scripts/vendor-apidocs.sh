#!/usr/bin/env bash
# Re-vendors the API reference viewer behind GET /docs: swagger-ui-dist from the npm
# registry at the pinned version below, checked against the pinned integrity, and only
# the files the page loads plus the licence texts, into assets/apidocs/swagger-ui/.
#
#   scripts/vendor-apidocs.sh                              the pinned version, again
#   scripts/vendor-apidocs.sh VERSION sha512-INTEGRITY     another version (then update
#                                                          the pin below and commit both)
#
# The integrity is the registry's `dist.integrity`: `npm view swagger-ui-dist@VERSION
# dist.integrity`. Needs npm (for `npm pack`, which only downloads the tarball: no
# install scripts run and no dependency is fetched) and tar. The build never runs this:
# the vendored files are committed and embedded with include_bytes!, so a machine with
# only Rust and a C compiler builds the project offline.
set -euo pipefail

PACKAGE=swagger-ui-dist
VERSION="${1:-5.35.0}"
INTEGRITY="${2:-sha512-U06rpMtW9V3XPGOBeamTUSr0Z09jMX4IJuANpE/EZbAhw0G8CgwrzU4YmXkn/h0wCDNsXdGarTNNHC3sU8yVUQ==}"
# What GET /docs serves (src/http/api_docs.rs), then the licences that must travel with it.
FILES=(swagger-ui-bundle.js swagger-ui.css LICENSE NOTICE swagger-ui-bundle.js.LICENSE.txt)

REPO="$(cd "$(dirname "$0")/.." && pwd)"
DEST="$REPO/assets/apidocs/swagger-ui"
log() { printf 'vendor-apidocs: %s\n' "$*" >&2; }

if [ $# -eq 1 ]; then
  log "a version other than the pinned one needs its integrity too: $0 VERSION sha512-…"
  exit 2
fi

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

log "fetching $PACKAGE@$VERSION"
(cd "$TMP" && npm pack "$PACKAGE@$VERSION" --pack-destination "$TMP" --silent >/dev/null)
TARBALL="$TMP/$PACKAGE-$VERSION.tgz"
ACTUAL="sha512-$(node -e '
  const h = require("crypto").createHash("sha512");
  h.update(require("fs").readFileSync(process.argv[1]));
  process.stdout.write(h.digest("base64"));' "$TARBALL")"
if [ "$ACTUAL" != "$INTEGRITY" ]; then
  log "integrity mismatch for $PACKAGE@$VERSION: expected $INTEGRITY, got $ACTUAL"
  exit 1
fi

mkdir -p "$TMP/x"
tar -xzf "$TARBALL" -C "$TMP/x"
rm -rf "$DEST"
mkdir -p "$DEST"
for f in "${FILES[@]}"; do
  cp "$TMP/x/package/$f" "$DEST/$f"
done
cat > "$DEST/SOURCE" <<SRC
$PACKAGE $VERSION from the npm registry ($INTEGRITY),
vendored by scripts/vendor-apidocs.sh: ${FILES[*]}.
The files are upstream's, unchanged.
SRC
log "vendored into ${DEST#"$REPO"/}:"
(cd "$DEST" && ls -l "${FILES[@]}" SOURCE >&2)
