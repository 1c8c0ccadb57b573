#!/usr/bin/env bash
# Builds the demo corpus data/corpus/kjv.h5 from Debian's bible-kjv-text package (King James Bible,
# public domain): one document per chapter (1189 documents, ~1M tokens), tokenized with a byte-level
# BPE of 4096 tokens trained on the text (saved as data/corpus/tokenizer.json).
#
#   bash data/make_kjv.sh [OUT_DIR]        (default: data/corpus in the repository)
#
# bible-kjv-text ships /usr/lib/bible.data, not plain text: a header ("EC02Compressed Data File"),
# a chunk count and a table of big-endian uint32 file offsets, then chunks of 64 KiB of text, each
# compressed with Unix compress (LZW) without the 3-byte .Z header. We put the header back and let
# gzip (which reads .Z) decompress each chunk. The text has one verse per line: "Ge1:1 In the ...".
# If that fails and the `bible` reader (package bible-kjv) is installed, it gives the same text.
# Each chapter becomes "Genesis 1\n1 In the beginning ...\n2 And the earth ...".
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT_DIR=${1:-$ROOT/data/corpus}
PY=${PYTHON:-python3}

DATA_FILE=${KJV_BIBLE_DATA:-}
if [[ -z "$DATA_FILE" ]]; then
  if command -v dpkg >/dev/null 2>&1; then
    DATA_FILE=$(dpkg -L bible-kjv-text 2>/dev/null | grep -E '/bible\.data$' | head -n1 || true)
  fi
  [[ -n "$DATA_FILE" ]] || DATA_FILE=/usr/lib/bible.data
fi
if [[ ! -f "$DATA_FILE" ]]; then
  echo "make_kjv.sh: error: $DATA_FILE not found: install the Debian/Ubuntu package bible-kjv-text" >&2
  echo "  (apt-get install bible-kjv-text) or point KJV_BIBLE_DATA at its bible.data file" >&2
  exit 1
fi

mkdir -p "$OUT_DIR"
TEXT="$OUT_DIR/kjv.txt"
VERSES="$OUT_DIR/kjv_verses.txt.tmp"
trap 'rm -f "$VERSES"' EXIT

echo "make_kjv.sh: decoding verses from $DATA_FILE"
if ! "$PY" - "$DATA_FILE" "$VERSES" <<'EOF'
import struct, subprocess, sys
src, dst = sys.argv[1], sys.argv[2]
data = open(src, "rb").read()
if not data.startswith(b"EC02"):
    sys.exit(f"make_kjv.sh: {src}: not an EC02 bible data file")
count = struct.unpack(">I", data[0x58:0x5C])[0]
offsets = struct.unpack(f">{count + 1}I", data[0x5C:0x5C + 4 * (count + 1)])
if offsets[-1] != len(data) or list(offsets) != sorted(offsets):
    sys.exit(f"make_kjv.sh: {src}: unexpected chunk table")
with open(dst, "wb") as out:
    for i in range(count):
        chunk = b"\x1f\x9d\x90" + data[offsets[i]:offsets[i + 1]]  # .Z header: 16-bit codes, block mode
        r = subprocess.run(["gzip", "-dc"], input=chunk, capture_output=True)
        if r.returncode != 0 or not r.stdout:
            sys.exit(f"make_kjv.sh: {src}: chunk {i} does not decompress: {r.stderr.decode().strip()}")
        out.write(r.stdout)
EOF
then
  # Same text through the package's own reader (bible-kjv), when installed.
  if command -v bible >/dev/null 2>&1 && bible -f Gen1:1-Rev22:21 >"$VERSES" && [[ -s "$VERSES" ]]; then
    echo "make_kjv.sh: used the bible reader ($(command -v bible)) instead"
  else
    echo "make_kjv.sh: error: cannot decode $DATA_FILE (install bible-kjv for its reader)" >&2
    exit 1
  fi
fi

# Verses -> chapters (blank-line separated documents).
"$PY" - "$VERSES" "$TEXT" <<'EOF'
import re, sys
BOOKS = """\
Genesis|Exodus|Leviticus|Numbers|Deuteronomy|Joshua|Judges|Ruth|1 Samuel|2 Samuel|1 Kings|2 Kings|
1 Chronicles|2 Chronicles|Ezra|Nehemiah|Esther|Job|Psalms|Proverbs|Ecclesiastes|Song of Solomon|
Isaiah|Jeremiah|Lamentations|Ezekiel|Daniel|Hosea|Joel|Amos|Obadiah|Jonah|Micah|Nahum|Habakkuk|
Zephaniah|Haggai|Zechariah|Malachi|Matthew|Mark|Luke|John|Acts|Romans|1 Corinthians|2 Corinthians|
Galatians|Ephesians|Philippians|Colossians|1 Thessalonians|2 Thessalonians|1 Timothy|2 Timothy|Titus|
Philemon|Hebrews|James|1 Peter|2 Peter|1 John|2 John|3 John|Jude|Revelation""".replace("\n", "").split("|")
verse = re.compile(r"^([1-3]?[A-Za-z]+)(\d+):(\d+) (.*)$")
abbrevs, chapters = [], []
key = None
for line in open(sys.argv[1], encoding="utf-8", errors="strict"):
    m = verse.match(line.rstrip("\n"))
    if not m:
        continue  # the file's title line
    book, chap, num, text = m.groups()
    if not abbrevs or abbrevs[-1] != book:
        abbrevs.append(book)
    if (book, chap) != key:
        key = (book, chap)
        chapters.append([f"{BOOKS[min(len(abbrevs), len(BOOKS)) - 1]} {chap}"])
    chapters[-1].append(f"{num} {text.strip()}")
if len(abbrevs) != 66 or len(chapters) != 1189:
    sys.exit(f"make_kjv.sh: error: expected 66 books and 1189 chapters, found {len(abbrevs)} and {len(chapters)}")
with open(sys.argv[2], "w", encoding="utf-8") as out:
    out.write("\n\n".join("\n".join(c) for c in chapters) + "\n")
print(f"make_kjv.sh: {len(chapters)} chapters of {len(abbrevs)} books -> {sys.argv[2]}")
EOF

"$PY" "$ROOT/data/prepare.py" --input "$TEXT" --out "$OUT_DIR/kjv.h5" --train-bpe 4096 \
  --format text --doc-separator blank-lines
