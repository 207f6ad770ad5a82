"""The checked-in generated code is exactly what protoc makes from the .proto files."""
from __future__ import annotations

from pathlib import Path

import grpc_tools

from protos import generate
from protos.feedloop.v1 import common_pb2, serving_pb2, serving_pb2_grpc


def test_generated_code_matches_the_protos(tmp_path: Path):
    fresh = generate.generate(tmp_path)
    checked_in = generate.generated_files()
    assert fresh == checked_in, "generated files differ in name: run `python -m protos.generate`"
    stale = [str(p) for p in fresh if (tmp_path / p).read_bytes() != (generate.REPO_ROOT / p).read_bytes()]
    assert not stale, (
        f"{stale} are stale: run `python -m protos.generate` and commit the result "
        f"(this check regenerated them with grpcio-tools {grpc_tools.grpc_version.VERSION}; "
        "the files record the version that made them)")


def test_generated_imports_resolve_as_a_package():
    # protoc ran with `-I .` from the repository root: no post-processing of the imports needed.
    assert serving_pb2.DESCRIPTOR.name == "protos/feedloop/v1/serving.proto"
    assert serving_pb2.DESCRIPTOR.package == "feedloop.v1"
    assert serving_pb2.DESCRIPTOR.dependencies[0] is common_pb2.DESCRIPTOR
    assert hasattr(serving_pb2_grpc, "ServingStub")


def test_every_proto_is_inside_a_package():
    # setuptools ships *.proto as package data (pyproject: protos = ["**/*.proto"]), which only
    # covers directories that are packages.
    root = generate.REPO_ROOT
    for proto in generate.proto_files():
        for directory in (root / proto).parents:
            if directory == root:
                break
            assert (directory / "__init__.py").exists(), f"{directory} needs an __init__.py"
