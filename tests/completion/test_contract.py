"""The gRPC contract as a product: rotary.v1 only grows, and the .proto ships with importable stubs.

tests/data/worker_v1_fields.json is the committed snapshot of worker.proto's descriptor: every
message field's number and type, every enum value's number, every rpc's messages and streaming,
every reserved field number and name. The compatibility rule in worker.proto's header is
checked against it: nothing in the snapshot may change or disappear (a removed field must be
reserved by number and name). Additions are allowed; record them in the snapshot with

    .venv/bin/python tests/completion/test_contract.py --refresh

which refuses to write while the compatibility check fails.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from google.protobuf import descriptor_pb2

from rotary.completion.rpc import worker_pb2 as pb
from rotary.completion.rpc.launch import python_command

ROOT = Path(__file__).resolve().parents[2]
SNAPSHOT = ROOT / "tests" / "data" / "worker_v1_fields.json"
REFRESH = ".venv/bin/python tests/completion/test_contract.py --refresh"

SCALARS = {
    value: name.removeprefix("TYPE_").lower()
    for name, value in descriptor_pb2.FieldDescriptorProto.Type.items()
    if name not in ("TYPE_MESSAGE", "TYPE_ENUM", "TYPE_GROUP")
}


def describe(file_descriptor=pb.DESCRIPTOR) -> dict:
    """The parts of a .proto's descriptor that its wire contract depends on, as plain JSON."""
    proto = descriptor_pb2.FileDescriptorProto()
    file_descriptor.CopyToProto(proto)
    package = proto.package
    fields, reserved, enum_values, rpcs = {}, {}, {}, {}

    def field_type(field) -> str:
        kind = field.type_name.lstrip(".") or SCALARS[field.type]
        return f"repeated {kind}" if field.label == field.LABEL_REPEATED else kind

    def walk_enum(enum, prefix: str) -> None:
        for value in enum.value:
            enum_values[f"{prefix}.{enum.name}.{value.name}"] = value.number

    def walk_message(message, prefix: str) -> None:
        name = f"{prefix}.{message.name}"
        for field in message.field:
            fields[f"{name}.{field.name}"] = [field.number, field_type(field)]
        numbers = [n for r in message.reserved_range for n in range(r.start, r.end)]  # end is exclusive
        if numbers or message.reserved_name:
            reserved[name] = {"numbers": numbers, "names": sorted(message.reserved_name)}
        for nested in message.nested_type:
            walk_message(nested, name)
        for enum in message.enum_type:
            walk_enum(enum, name)

    for message in proto.message_type:
        walk_message(message, package)
    for enum in proto.enum_type:
        walk_enum(enum, package)
    for service in proto.service:
        for method in service.method:
            rpcs[f"{package}.{service.name}.{method.name}"] = {
                "input": method.input_type.lstrip("."),
                "output": method.output_type.lstrip("."),
                "client_streaming": method.client_streaming,
                "server_streaming": method.server_streaming,
            }
    return {"fields": fields, "reserved": reserved, "enum_values": enum_values, "rpcs": rpcs}


def breaking_changes(old: dict, new: dict) -> list[str]:
    """What `new` breaks of `old` under the rule in worker.proto's header."""
    problems = []
    for key, (number, kind) in old["fields"].items():
        message, name = key.rsplit(".", 1)
        if key in new["fields"]:
            if new["fields"][key] != [number, kind]:
                problems.append(f"field {key} was {number} {kind}, is now {new['fields'][key][0]} {new['fields'][key][1]}")
            continue
        kept = new["reserved"].get(message, {"numbers": [], "names": []})
        if number not in kept["numbers"] or name not in kept["names"]:
            problems.append(f"field {key} = {number} disappeared without reserving its number and name")
    for message, old_reserved in old["reserved"].items():
        kept = new["reserved"].get(message, {"numbers": [], "names": []})
        for number in sorted(set(old_reserved["numbers"]) - set(kept["numbers"])):
            problems.append(f"{message}: reserved number {number} is no longer reserved")
        for name in sorted(set(old_reserved["names"]) - set(kept["names"])):
            problems.append(f"{message}: reserved name {name} is no longer reserved")
    for key, number in old["enum_values"].items():
        if new["enum_values"].get(key) != number:
            problems.append(f"enum value {key} was {number}, is now {new['enum_values'].get(key, 'gone')}")
    for key, rpc in old["rpcs"].items():
        if key not in new["rpcs"]:
            problems.append(f"rpc {key} disappeared")
        elif new["rpcs"][key] != rpc:
            problems.append(f"rpc {key} was {rpc}, is now {new['rpcs'][key]}")
    # A number given to two fields of one message would be caught by protoc; a new field that
    # takes a number reserved earlier would not.
    for key, (number, _) in new["fields"].items():
        message, name = key.rsplit(".", 1)
        was = old["reserved"].get(message, {"numbers": [], "names": []})
        if key not in old["fields"] and (number in was["numbers"] or name in was["names"]):
            problems.append(f"new field {key} = {number} reuses a reserved number or name")
    return problems


def additions(old: dict, new: dict) -> list[str]:
    return [f"{part} {key}" for part in ("fields", "enum_values", "rpcs", "reserved") for key in new[part] if key not in old[part]]


def test_rotary_v1_only_grows():
    problems = breaking_changes(json.loads(SNAPSHOT.read_text()), describe())
    assert not problems, (
        "worker.proto breaks the rotary.v1 contract (see its header: nothing is renamed, renumbered or "
        "retyped; removed fields are reserved):\n  " + "\n  ".join(problems)
    )


def test_snapshot_records_every_addition():
    new = additions(json.loads(SNAPSHOT.read_text()), describe())
    assert not new, f"worker.proto grew (allowed); record it in the snapshot with `{REFRESH}`:\n  " + "\n  ".join(new)


def test_the_check_catches_renumbering_retyping_and_removal():
    old = describe()
    renumbered = json.loads(json.dumps(old))
    renumbered["fields"]["rotary.v1.CompleteTextRequest.offset"][0] = 7
    retyped = json.loads(json.dumps(old))
    retyped["fields"]["rotary.v1.CompleteOptions.max_tokens"][1] = "int64"
    removed = json.loads(json.dumps(old))
    del removed["fields"]["rotary.v1.CompleteRequest.request_id"]
    del removed["rpcs"]["rotary.v1.Worker.Stats"]
    unstreamed = json.loads(json.dumps(old))
    unstreamed["rpcs"]["rotary.v1.Worker.CompleteText"]["server_streaming"] = False
    assert len(breaking_changes(old, renumbered)) == 1
    assert len(breaking_changes(old, retyped)) == 1
    assert len(breaking_changes(old, removed)) == 2
    assert len(breaking_changes(old, unstreamed)) == 1
    # Removing a field is allowed once its number and name are reserved.
    reserved = json.loads(json.dumps(removed))
    reserved["rpcs"]["rotary.v1.Worker.Stats"] = old["rpcs"]["rotary.v1.Worker.Stats"]
    reserved["reserved"]["rotary.v1.CompleteRequest"] = {"numbers": [5], "names": ["request_id"]}
    assert breaking_changes(old, reserved) == []
    assert breaking_changes(old, old) == [] and additions(old, old) == []


def test_proto_and_stubs_ship_in_the_package(built_wheel, tmp_path):
    """What ships, not the editable install (where the package's worker.proto *is* the source file,
    so the comparison this test made before could not fail): the built wheel, unpacked apart from the
    repository, holds the .proto and the stubs as in the source; the stubs import from there, and the
    .proto is found as package data there. Fails if pyproject.toml's package data leaves out *.proto."""
    import zipfile

    wheel, _ = built_wheel
    unpacked = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(unpacked)
    for name in ("worker.proto", "rpc/worker_pb2.py", "rpc/worker_pb2_grpc.py"):
        shipped = unpacked / "rotary" / "completion" / name
        assert shipped.is_file(), f"the wheel lacks rotary/completion/{name}"
        assert shipped.read_bytes() == (ROOT / "completion" / name).read_bytes(), name
    # A client needs only grpcio and protobuf: importing the shipped stubs loads no torch.
    code = (
        "import importlib.resources, json, sys; from rotary.completion.rpc import worker_pb2, worker_pb2_grpc; "
        "assert worker_pb2_grpc.WorkerStub; proto = importlib.resources.files('rotary.completion') / 'worker.proto'; "
        "print(json.dumps([worker_pb2.__file__, str(proto), proto.is_file(), 'torch' in sys.modules]))"
    )
    out = subprocess.run(python_command("-c", code), capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(unpacked)}).stdout
    stubs, proto, proto_found, torch_loaded = json.loads(out)
    assert Path(stubs).is_relative_to(unpacked) and Path(proto).is_relative_to(unpacked), (stubs, proto)
    assert proto_found and not torch_loaded


def test_language_ids_listed_in_the_proto_are_the_accepted_ones():
    from rotary.completion.text_request import KNOWN_LANGUAGE_IDS

    proto = (ROOT / "completion" / "worker.proto").read_text()
    listed = proto.split("// Language ids CompleteText accepts", 1)[1]
    listed = [line.removeprefix("//   ") for line in listed.splitlines() if re.match(r"//   \S", line)]
    assert sorted(" ".join(listed).split()) == sorted(KNOWN_LANGUAGE_IDS)


def test_every_lsp_language_id_is_accepted():
    from lsprotocol.types import LanguageKind

    from rotary.completion.text_request import KNOWN_LANGUAGE_IDS

    assert {kind.value for kind in LanguageKind} <= KNOWN_LANGUAGE_IDS


def refresh() -> int:
    new = describe()
    if SNAPSHOT.exists():
        problems = breaking_changes(json.loads(SNAPSHOT.read_text()), new)
        if problems:
            print("refusing to refresh: worker.proto breaks rotary.v1:\n  " + "\n  ".join(problems), file=sys.stderr)
            return 1
    SNAPSHOT.parent.mkdir(parents=True, exist_ok=True)
    # One entry per line, so a diff of the snapshot reads as a list of what was added.
    def block(part: str) -> str:
        lines = [f"    {json.dumps(k)}: {json.dumps(v)}" for k, v in sorted(new[part].items())]
        return f'  "{part}": ' + ("{\n" + ",\n".join(lines) + "\n  }" if lines else "{}")

    parts = [block(part) for part in ("fields", "enum_values", "rpcs", "reserved")]
    SNAPSHOT.write_text("{\n" + ",\n".join(parts) + "\n}\n")
    print(f"wrote {SNAPSHOT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:] != ["--refresh"]:
        sys.exit(f"usage: {REFRESH}")
    sys.exit(refresh())
