"""Write a ~30 MB JSONL corpus from Debian's python3.11-doc reStructuredText sources.

Usage: python bench/make_rst_corpus.py SOURCES_DIR OUTPUT.jsonl [TARGET_MB]

SOURCES_DIR is the ``_sources`` folder of the extracted package
(``apt-get download python3.11-doc && dpkg-deb -x python3.11-doc_*.deb ex``:
``ex/usr/share/doc/python3.11/html/_sources``). One document per blank-line-separated
section of each file (sorted paths, so every run writes the same bytes); the ~11 MB of text
is written in passes until the file reaches TARGET_MB (default 29), each pass's ids
suffixed with its number.
"""

import json
import sys
from pathlib import Path


def sections(text, max_chars=20000):
    """Split on blank lines into chunks of at most ``max_chars`` (whole paragraphs)."""
    chunk = []
    size = 0
    for paragraph in text.split("\n\n"):
        if chunk and size + len(paragraph) > max_chars:
            yield "\n\n".join(chunk)
            chunk, size = [], 0
        chunk.append(paragraph)
        size += len(paragraph) + 2
    if chunk:
        yield "\n\n".join(chunk)


def main(sources, output, target_mb=29.0):
    files = sorted(p for p in Path(sources).rglob("*") if p.is_file())
    docs = []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        for number, part in enumerate(sections(text)):
            if part.strip():
                docs.append((f"{path.relative_to(sources)}#{number}", part))
    target = int(target_mb * 1e6)
    written = 0
    with open(output, "w", encoding="utf-8") as out:
        for rep in range(1000):
            for doc_id, text in docs:
                line = json.dumps({"id": f"{doc_id}@{rep}", "text": text}) + "\n"
                out.write(line)
                written += len(line.encode("utf-8"))
                if written >= target:
                    print(f"{output}: {written / 1e6:.1f} MB, {len(docs)} sections x {rep + 1}")
                    return


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *(float(a) for a in sys.argv[3:4]))
