"""The operations, declared once: the v1 routes, the OpenAPI document, the metric labels and the engines read this.

An operation is a ``Call`` (``models/outputs.py``: what the rows are, which outputs it answers) plus its summary and
the JSON keys of its answer: the main output is ``outputs``, the others follow under their own keys. Adding an
operation is one entry here plus, for a new kind of output, its computation in ``models/outputs.py``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from aeserve.models.outputs import Call


@dataclass(frozen=True)
class Operation:
    name: str
    summary: str
    call: Call
    answer_keys: tuple[str, ...] = ("outputs",)  # one JSON key per output of the call, in its order
    table_outputs: dict[str, str] = field(default_factory=dict)  # output -> JSON key, answered too for a table version
    # Compressed streams (versions with an entropy model): an operation that answers streams answers the codes as one
    # byte string per row; one that takes streams decodes byte strings into the call's codes.
    answers_streams: bool = False
    takes_streams: bool = False
    # Searches the version's index of stored codes (service/indexes.py) with the codes of its rows, or with codes sent
    # (service/api/neighbors.py): answers ids and distances, not the call's outputs.
    searches: bool = False

    def __post_init__(self) -> None:
        self.call.check()
        if self.answers_streams and self.takes_streams:
            raise ValueError(f"operation {self.name!r}: answers streams or takes them, not both")
        if len(self.answer_keys) != len(self.call.outputs):
            raise ValueError(f"operation {self.name!r}: one answer key per output, got {self.answer_keys} for {self.call.outputs}")

    def for_version(self, is_table: bool) -> tuple[Call, tuple[str, ...]]:
        """The call and its answer keys for a version (a table's answers more)."""
        if not is_table or not self.table_outputs:
            return self.call, self.answer_keys
        return Call(self.call.takes, (*self.call.outputs, *self.table_outputs)), (*self.answer_keys, *self.table_outputs.values())

    @property
    def uses_streams(self) -> bool:
        """Whether it answers or takes compressed streams: only versions with an entropy model serve it."""
        return self.answers_streams or self.takes_streams


OPERATIONS: dict[str, Operation] = {op.name: op for op in (
    Operation("encode", "Inputs -> codes (n, code_dim).", Call("inputs", ("code",))),
    Operation("decode", "Codes -> inputs (n, *input_shape).", Call("codes", ("reconstruction",))),
    Operation("reconstruct", "Inputs -> reconstructions, with summed squared errors, anomaly scores and the scores' held-out percentiles.",
              Call("inputs", ("reconstruction", "error", "score", "percentile")), ("outputs", "errors", "scores", "percentiles"),
              {"feature_error": "feature_errors"}),
    Operation("project", "Inputs -> 2-D map coordinates (n, 2).", Call("inputs", ("coordinates",))),
    Operation("compress", "Inputs -> one compressed byte string per row (base64 in JSON): the quantized code, entropy-coded, "
              "behind a 7-byte header naming the version. For versions with an entropy model (kind rd).",
              Call("inputs", ("code",)), answers_streams=True),
    Operation("decompress", "Compressed byte strings (base64 in JSON), as compress made them -> inputs (n, *input_shape). "
              "A stream made by another version, or damaged, is refused (422).", Call("codes", ("reconstruction",)), takes_streams=True),
    Operation("neighbors", "Inputs (encoded by the version), or codes in the index's form with code_version -> the ids and distances of "
              "the k nearest stored items (k: default 10), from the index the server was given for the version (--index NAME=PATH).",
              Call("inputs", ("code",)), ("ids",), searches=True),
)}
