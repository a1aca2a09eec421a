"""Write /etc/mcp-codeexec/manifest.json at image build time, after checking the image.

Usage (inside the image being built): python3 manifest.py OUTPUT PINS PACKAGES

Checks, and fails the build if any check fails:
- every library of SPEC section 4 imports, from the image's wheel directory (nothing of
  Debian's shadows it), at the version pins.txt locked;
- every installed wheel distribution is the locked version, and nothing else is there;
- every tool of SPEC section 4 is on PATH;
- every Debian package of packages.txt is installed.

The manifest records what the server tells the model (server.py reads it through the
image's `org.mcp-codeexec.manifest` label, or from the image's file):
  python          the interpreter's version
  libraries       SPEC's libraries: distribution -> {"import": module, "version": v}
  python_packages every wheel distribution installed -> version
  tools           command -> {"path", "package" (Debian), "version" (Debian's)}
  debian_packages every package of packages.txt -> version
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys

SITE = "/usr/local/lib/python3.11/dist-packages"

# SPEC section 4's libraries: (distribution, import name).
LIBRARIES = [
    ("pandas", "pandas"),
    ("numpy", "numpy"),
    ("scipy", "scipy"),
    ("scikit-learn", "sklearn"),
    ("statsmodels", "statsmodels"),
    ("matplotlib", "matplotlib"),
    ("seaborn", "seaborn"),
    ("pyarrow", "pyarrow"),
    ("openpyxl", "openpyxl"),
    ("xlsxwriter", "xlsxwriter"),
    ("xlrd", "xlrd"),
    ("pillow", "PIL"),
    ("python-pptx", "pptx"),
    ("python-docx", "docx"),
    ("pypdf", "pypdf"),
    ("pdfplumber", "pdfplumber"),
    ("pypdfium2", "pypdfium2"),
    ("pdf2image", "pdf2image"),
    ("pdfkit", "pdfkit"),
    ("tabula-py", "tabula"),
    ("reportlab", "reportlab"),
    ("img2pdf", "img2pdf"),
    ("sympy", "sympy"),
    ("mpmath", "mpmath"),
    ("tqdm", "tqdm"),
    ("python-dateutil", "dateutil"),
    ("pytz", "pytz"),
    ("joblib", "joblib"),
]

# SPEC section 4's tools, and the programs libraries run: command -> Debian package.
TOOLS = {
    "unzip": "unzip",
    "zip": "zip",
    "unrar": "unrar-free",
    "7z": "p7zip-full",
    "bc": "bc",
    "rg": "ripgrep",
    "fd": "fd-find",
    "sqlite3": "sqlite3",
    "pdftoppm": "poppler-utils",
    "java": "openjdk-17-jre-headless",
    "wkhtmltopdf": "wkhtmltopdf",
    "pip": "python3-pip",
}

MARKER_PREFIX = "# ---- locked:"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_locked(path: str) -> dict[str, str]:
    locked, below = {}, False
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith(MARKER_PREFIX):
                below = True
            elif below and line.strip() and not line.startswith("#"):
                name, version = line.split()[0].split("==")
                locked[canonical(name)] = version
    return locked


def read_packages(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [w for line in f for w in line.split("#", 1)[0].split()]


def dpkg_versions(pkgs: list[str]) -> dict[str, str]:
    res = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Package}\t${db:Status-Status}\t${Version}\n", *pkgs],
        capture_output=True, text=True,
    )
    versions = {}
    for line in res.stdout.splitlines():
        name, status, version = line.split("\t")
        if status == "installed":
            versions[name] = version
    return versions


def main(argv: list[str]) -> None:
    out_path, pins_path, packages_path = argv[1:4]
    errors: list[str] = []
    locked = read_locked(pins_path)

    # Every installed wheel distribution is the locked one, and every locked one is there.
    installed = {}
    for dist in importlib.metadata.distributions(path=[SITE]):
        installed[canonical(dist.metadata["Name"])] = dist.version
    if installed != locked:
        for name in sorted(set(installed) | set(locked)):
            if installed.get(name) != locked.get(name):
                errors.append(f"{name}: installed {installed.get(name)}, locked {locked.get(name)}")

    libraries = {}
    for dist, module in LIBRARIES:
        try:
            mod = importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - report every failure
            errors.append(f"import {module} ({dist}) failed: {exc!r}")
            continue
        origin = os.path.realpath(getattr(mod, "__file__", "") or "")
        if not origin.startswith(SITE + "/"):
            errors.append(f"{module} imports from {origin}, not from {SITE}")
        version = importlib.metadata.version(dist)
        if locked.get(canonical(dist)) != version:
            errors.append(f"{dist} {version} is not the locked {locked.get(canonical(dist))}")
        libraries[dist] = {"import": module, "version": version}

    pkgs = read_packages(packages_path)
    debian = dpkg_versions(pkgs + sorted(set(TOOLS.values())))
    errors += [f"Debian package {p} is not installed" for p in pkgs if p not in debian]
    tools = {}
    for command, package in TOOLS.items():
        path = shutil.which(command)
        if path is None:
            errors.append(f"tool {command} is not on PATH")
        elif package not in debian:
            errors.append(f"tool {command}: its package {package} is not installed")
        else:
            tools[command] = {"path": path, "package": package, "version": debian[package]}

    if errors:
        sys.exit("manifest.py: the image is not right:\n  " + "\n  ".join(errors))
    manifest = {
        "python": platform.python_version(),
        "libraries": libraries,
        "python_packages": dict(sorted(installed.items())),
        "tools": tools,
        "debian_packages": {p: debian[p] for p in pkgs},
    }
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main(sys.argv)
