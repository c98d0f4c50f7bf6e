"""Rebuild the bundled sample corpus from Debian's `sqlite3-doc` package.

The SQLite documentation is in the public domain (see SOURCE.md). Each HTML
page becomes one JSONL document {"id", "text"}; navigation chrome, scripts and
styles are dropped. Run on a Debian machine:

    apt-get download sqlite3-doc && dpkg -x sqlite3-doc_*.deb /tmp/sq
    python -m data_pipelines.sample.make_sample_corpus /tmp/sq/usr/share/doc/sqlite3
"""

import gzip
import json
import re
import sys
from html.parser import HTMLParser
from pathlib import Path

SKIP_TAGS = {"script", "style", "head", "title"}
NAV_END = "Search Changelog\n"
BLOCK_TAGS = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "blockquote", "dt", "dd", "table"}


class _TextExtractor(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in SKIP_TAGS:
            self._skip += 1
        elif tag in BLOCK_TAGS:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in SKIP_TAGS:
            self._skip = max(0, self._skip - 1)
        elif tag in BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self._skip:
            self.parts.append(data)


def html_to_text(html: str) -> str:
    parser = _TextExtractor()
    parser.feed(html)
    lines = (re.sub(r"[ \t\r\f\v]+", " ", line).strip() for line in "".join(parser.parts).split("\n"))
    text = "\n".join(line for line in lines if line)
    # Every page starts with the site's navigation menu; keep what follows it.
    _, sep, body = text.partition(NAV_END)
    return body if sep else text


def main(doc_dir: str, out: str = str(Path(__file__).with_name("sqlite_docs.jsonl.gz"))) -> None:
    pages = sorted(Path(doc_dir).rglob("*.html"))
    total = 0
    # mtime=0 keeps the archive byte-identical across rebuilds.
    with gzip.GzipFile(out, "wb", compresslevel=9, mtime=0) as f:
        for page in pages:
            text = html_to_text(page.read_text(encoding="utf-8", errors="replace"))
            if len(text) < 500:
                continue
            f.write((json.dumps({"id": page.stem, "text": text}, ensure_ascii=False) + "\n").encode())
            total += len(text.encode())
    print(f"wrote {out}: {total / 1e6:.2f} MB of text from {len(pages)} pages")


if __name__ == "__main__":
    main(*sys.argv[1:])
