"""Print requirement lines from pyproject.toml for one pip install in the image build.

    python3 requirements.py pyproject.toml dependencies s3 gcs --drop torch    all but torch
    python3 requirements.py pyproject.toml dependencies --only torch           torch alone, from its own index
    python3 requirements.py pyproject.toml serve s3 gcs                        the slim serving image

A group is ``dependencies`` (the main list) or the name of an extra in ``[project.optional-dependencies]``. The image
installs the project itself with ``pip install --no-deps .``, so the lists here are the only dependencies it gets,
and a change to the code alone leaves the dependency layers cached.
"""
from __future__ import annotations

import argparse
import re
import sys
import tomllib


def requirement_name(line: str) -> str:
    """The distribution a requirement names, normalised (PEP 503): ``"uvloop>=0.19; ..."`` -> ``"uvloop"``."""
    return re.sub(r"[-_.]+", "-", re.split(r"[\s<>=!~;\[(@]", line.strip(), maxsplit=1)[0]).lower()


def requirements(project: dict, groups: list[str], only: set[str], drop: set[str]) -> list[str]:
    extras = project.get("optional-dependencies", {})
    lines: list[str] = []
    for group in groups:
        if group == "dependencies":
            lines += project.get("dependencies", [])
        elif group in extras:
            lines += extras[group]
        else:
            raise SystemExit(f"requirements.py: no group {group!r} in pyproject.toml; there are: dependencies, {', '.join(extras)}")
    chosen = [line for line in lines if (not only or requirement_name(line) in only) and requirement_name(line) not in drop]
    return list(dict.fromkeys(chosen))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pyproject")
    parser.add_argument("groups", nargs="+", help="dependencies, or the name of an extra")
    parser.add_argument("--only", nargs="*", default=[], help="keep these distributions alone")
    parser.add_argument("--drop", nargs="*", default=[], help="leave these distributions out")
    args = parser.parse_args(argv)
    with open(args.pyproject, "rb") as f:
        project = tomllib.load(f)["project"]
    only = {requirement_name(name) for name in args.only}
    lines = requirements(project, args.groups, only, {requirement_name(name) for name in args.drop})
    if only and not lines:
        raise SystemExit(f"requirements.py: none of {sorted(only)} in {args.groups}")
    sys.stdout.write("".join(line + "\n" for line in lines))


if __name__ == "__main__":
    main()
