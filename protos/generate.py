"""Regenerate the Python code checked in next to the .proto files.

    python -m protos.generate           # rewrite protos/feedloop/v1/*_pb2*.py(i)
    python -m protos.generate --check   # exit 1 if the checked-in code is stale

protoc runs from the repository root with `-I .`, and every .proto imports its dependencies by
their path from there ("protos/feedloop/v1/common.proto"). That makes the generated imports read
`from protos.feedloop.v1 import common_pb2`, which resolve as a package import with no
post-processing. The output depends on the grpcio-tools version (it stamps its version into the
files), so regenerate with the version pinned in pyproject.toml.
"""
from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = REPO_ROOT / "protos"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files() -> list[Path]:
    """The .proto sources, as paths relative to the repository root (that is how protoc names them)."""
    return sorted(p.relative_to(REPO_ROOT) for p in PROTO_DIR.rglob("*.proto"))


def generated_files(root: Path = REPO_ROOT) -> list[Path]:
    """The generated files under `root`, relative to it."""
    found = [p.relative_to(root) for suffix in GENERATED_SUFFIXES
             for p in (root / "protos").rglob(f"*{suffix}")]
    return sorted(found)


def generate(out_dir: Path = REPO_ROOT) -> list[Path]:
    """Run protoc on every .proto; write the Python, stub and gRPC modules under `out_dir`
    (mirroring protos/...). Returns the written paths relative to `out_dir`."""
    # Imported here: grpc_tools is a build-time tool; importing the generated code must not need it.
    from grpc_tools import protoc

    well_known = Path(protoc.__file__).parent / "_proto"  # google/protobuf/*.proto
    args = ["grpc_tools.protoc", "-I", str(REPO_ROOT), "-I", str(well_known),
            f"--python_out={out_dir}", f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}",
            *(str(REPO_ROOT / p) for p in proto_files())]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed (its message is above)")
    return generated_files(out_dir)


def stale_files() -> list[str]:
    """Generated files that differ from a fresh generation (or are missing / left over)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = set(generate(Path(tmp)))
        checked_in = set(generated_files())
        stale = sorted(str(p) for p in fresh ^ checked_in)
        stale += sorted(str(p) for p in fresh & checked_in
                        if not filecmp.cmp(Path(tmp) / p, REPO_ROOT / p, shallow=False))
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale generated files")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        for path in stale:
            print(f"stale: {path}", file=sys.stderr)
        return 1 if stale else 0
    for path in generate():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
