"""Find this machine's Debian mirrors in its apt sources.

Usage: python3 debian_sources.py SUITE...

Reads /etc/apt/sources.list and /etc/apt/sources.list.d/*.list (one-line
format) and /etc/apt/sources.list.d/*.sources (deb822 format), and prints
"SUITE URI" for each requested suite that an enabled "deb" entry with the
"main" component serves over http(s); the first such entry wins. Suites that
no entry serves are left out. Used by build.sh (the mirror for debootstrap
and the sources written into the image) and by scripts/setup.sh (whether a
backports suite is configured).
"""
import glob
import re
import sys

SOURCES_LIST = "/etc/apt/sources.list"
SOURCES_DIR = "/etc/apt/sources.list.d"


def read(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def one_line_entries(text):
    for line in text.splitlines():
        line = line.split("#", 1)[0]
        line = re.sub(r"\[[^\]]*\]", " ", line)  # [ options ]
        words = line.split()
        if len(words) >= 3 and words[0] == "deb":
            yield words[1], [words[2]], words[3:]


def deb822_entries(text):
    for stanza in re.split(r"\n[ \t]*\n", text):
        fields, key = {}, None
        for line in stanza.splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if line[0] in " \t":
                if key:
                    fields[key] += " " + line.strip()
                continue
            if ":" in line:
                key, value = line.split(":", 1)
                key = key.strip().lower()
                fields[key] = value.strip()
        if fields.get("enabled", "yes").strip().lower() == "no":
            continue
        if "deb" not in fields.get("types", "").split():
            continue
        for uri in fields.get("uris", "").split():
            yield uri, fields.get("suites", "").split(), fields.get("components", "").split()


def entries():
    yield from one_line_entries(read(SOURCES_LIST))
    for path in sorted(glob.glob(SOURCES_DIR + "/*.list")):
        yield from one_line_entries(read(path))
    for path in sorted(glob.glob(SOURCES_DIR + "/*.sources")):
        yield from deb822_entries(read(path))


def main(suites):
    found = {}
    for uri, entry_suites, components in entries():
        if "main" not in components or not re.match(r"https?://", uri):
            continue
        for suite in entry_suites:
            if suite in suites and suite not in found:
                found[suite] = uri.rstrip("/")
    for suite in suites:
        if suite in found:
            print(suite, found[suite])


if __name__ == "__main__":
    main(sys.argv[1:])
