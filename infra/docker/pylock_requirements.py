"""The image's platform lock (a PEP 751 pylock.toml) as a hash-pinned pip requirements file on stdout:
`name==version --hash=sha256:...` per package, every file pip may pick (wheel or sdist) with its hash,
so `pip wheel --require-hashes` in the builder stage refuses any byte the lock does not name.

    python3.11 infra/docker/pylock_requirements.py infra/docker/pylock.linux-amd64-py311.toml > platform.txt
"""

import sys
import tomllib


def requirement_lines(lock: dict) -> list[str]:
    lines = []
    for package in lock["packages"]:
        files = package.get("wheels", []) + ([package["sdist"]] if "sdist" in package else [])
        hashes = " ".join(f"--hash=sha256:{f['hashes']['sha256']}" for f in files)
        lines.append(f"{package['name']}=={package['version']} {hashes}")
    return lines


if __name__ == "__main__":
    with open(sys.argv[1], "rb") as handle:
        print("\n".join(requirement_lines(tomllib.load(handle))))
