"""Facts about the host and the image that the shell scripts (scripts/setup.sh,
sandbox/build.sh) and the server (doctor.py, image.py) share, defined once here.

Standard library only and importable by path: the scripts read a value with
`python3 src/mcp_codeexec/constants.py NAME` before any virtualenv exists.
"""

from __future__ import annotations

import sys

# gVisor releases before 2024 reject statx(AT_NO_AUTOMOUNT): coreutils' ls and stat fail
# with EINVAL inside the sandbox.
RUNSC_MIN_RELEASE = 20240101
# The gVisor platforms setup.sh and doctor try, in order (kvm only where /dev/kvm opens).
RUNSC_PLATFORMS = ("kvm", "systrap", "ptrace")
# Image labels: the hash of the inputs the image was built from, and its manifest (JSON).
INPUTS_LABEL = "org.mcp-codeexec.inputs-hash"
MANIFEST_LABEL = "org.mcp-codeexec.manifest"

if __name__ == "__main__":
    value = globals()[sys.argv[1]]
    print(" ".join(value) if isinstance(value, tuple) else value)
