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
    # Compressed streams (versions with an entropy model): "pack" answers the codes as one byte string per row,
    # "unpack" takes byte strings and decodes them into the call's codes.
    streams: str = ""

    def __post_init__(self) -> None:
        self.call.check()
        if len(self.answer_keys) != len(self.call.outputs):
            raise ValueError(f"operation {self.name!r}: one answer key per output, got {self.answer_keys} for {self.call.outputs}")

    def for_version(self, is_table: bool) -> tuple[Call, tuple[str, ...]]:
        """The call and its answer keys for a version (a table's answers more)."""
        if not is_table or not self.table_outputs:
            return self.call, self.answer_keys
        return Call(self.call.takes, (*self.call.outputs, *self.table_outputs)), (*self.answer_keys, *self.table_outputs.values())


OPERATIONS: dict[str, Operation] = {op.name: op for op in (
    Operation("encode", "Inputs -> codes (n, code_dim).", Call("inputs", ("code",))),
    Operation("decode", "Codes -> inputs (n, *input_shape).", Call("codes", ("reconstruction",))),
    Operation("reconstruct", "Inputs -> reconstructions, with summed squared errors and their held-out percentiles.",
              Call("inputs", ("reconstruction", "error", "percentile")), ("outputs", "errors", "percentiles"),
              {"feature_error": "feature_errors"}),
    Operation("project", "Inputs -> 2-D map coordinates (n, 2).", Call("inputs", ("coordinates",))),
    Operation("compress", "Inputs -> one compressed byte string per row (base64 in JSON): the quantized code, entropy-coded, "
              "behind a 7-byte header naming the version. For versions with an entropy model (kind rd).",
              Call("inputs", ("code",)), streams="pack"),
    Operation("decompress", "Compressed byte strings (base64 in JSON), as compress made them -> inputs (n, *input_shape). "
              "A stream made by another version, or damaged, is refused (422).", Call("codes", ("reconstruction",)), streams="unpack"),
)}
