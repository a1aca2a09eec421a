"""Write /etc/mcp-codeexec/manifest.json at image build time.

Usage: python3 manifest.py OUTPUT PACKAGE...
Records the Python version and the installed version of each listed Debian
package (from dpkg-query). Fails if a listed package is not installed.
"""
import json
import platform
import subprocess
import sys


def main(argv):
    out_path, pkgs = argv[1], argv[2:]
    res = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Package}\t${db:Status-Status}\t${Version}\n", *pkgs],
        capture_output=True, text=True,
    )
    versions = {}
    for line in res.stdout.splitlines():
        name, status, version = line.split("\t")
        if status == "installed":
            versions[name] = version
    missing = [p for p in pkgs if p not in versions]
    if missing:
        sys.exit("manifest.py: not installed: " + " ".join(missing))
    manifest = {
        "python": platform.python_version(),
        "packages": {p: versions[p] for p in pkgs},
    }
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main(sys.argv)
