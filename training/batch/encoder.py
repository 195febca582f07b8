"""``Encoder``: one version, loaded once, mapping batches of raw rows to the columns of a codes file.

``aeserve encode`` calls it block by block; a Ray Data actor can be one (``map_batches(Encoder,
fn_constructor_kwargs=dict(registry=..., name=..., version=...))``): it takes a numpy array of rows, or a pandas
DataFrame or a dict of columns (a table version's named columns, or ``data`` holding rows; an ``id`` column is
carried through), and answers a dict of numpy columns.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from aeserve.models.outputs import CODE_FORMS, OUTPUTS, Call
from aeserve.models.version import ModelVersion

# What --with adds: reconstruct -> the anomaly answers (scores where the version's outputs have them), project -> the map.
EXTRAS = ("reconstruct", "project")
# Output of models/outputs.py -> its column in the file, named as the HTTP API names it.
COLUMNS = {"code": "code", "error": "errors", "score": "scores", "percentile": "percentiles", "coordinates": "coordinates"}


def extra_outputs(extras: tuple[str, ...]) -> tuple[str, ...]:
    """The outputs ``--with`` asks for besides the code, in answer order."""
    unknown = [e for e in extras if e not in EXTRAS]
    if unknown:
        raise ValueError(f"--with takes {', '.join(EXTRAS)}; got {', '.join(unknown)}")
    outputs: tuple[str, ...] = ()
    if "reconstruct" in extras:
        outputs += tuple(name for name in ("error", "score", "percentile") if name in OUTPUTS)
    if "project" in extras:
        outputs += ("coordinates",)
    return outputs


class Encoder:
    """Raw rows -> {"code": codes in ``codes`` form, and the columns ``extras`` ask for}, from ``name``:``version`` of
    the registry at ``registry`` (a path or URL; None: ``$AESERVE_REGISTRY`` or ./registry), or ``loaded`` when given.

    Codes are the version's float32 codes (n, code_dim), or int8 (n, code_dim) and packed bits (n, ceil(code_dim / 8))
    uint8 made with its stored quantization, as the server makes them.
    """

    def __init__(self, registry: str | None = None, name: str | None = None, version: str | int = "latest", codes: str = "float",
                 extras: tuple[str, ...] = (), loaded: ModelVersion | None = None) -> None:
        if loaded is None:
            if name is None:
                raise ValueError("Encoder needs a model name (name=...) or a loaded version (loaded=...)")
            from aeserve.models.registry import open_registry

            loaded = open_registry(registry).load(name, str(version))
        if codes not in CODE_FORMS:
            raise ValueError(f"--codes must be one of {', '.join(CODE_FORMS)}; got {codes!r}")
        if codes != "float" and loaded.code_quantization is None:
            raise ValueError(f"{loaded.name}:{loaded.version} has no code quantization (it was published before int8 and binary "
                             f"codes); retrain it to get {codes} codes, or use --codes float")
        self.version, self.codes, self.extras = loaded, codes, tuple(extras)
        self.call = Call("inputs", ("code", *extra_outputs(self.extras))).check()
        self._table = None
        if loaded.manifest.get("features"):
            from aeserve.training.batch.inputs import TableColumns

            self._table = TableColumns(loaded.manifest["features"])

    def columns(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Raw rows (n, *input_shape) or (n, input_dim) -> {column name: values (n, ...)}, in the file's column order."""
        outputs = self.version.run(self.call, rows)
        answer = {COLUMNS[name]: value for name, value in zip(self.call.outputs, outputs, strict=True)}
        if self.codes != "float":
            answer["code"] = self.version.code_quantization.compact(answer["code"], self.codes)
        return answer

    def __call__(self, batch: np.ndarray | Mapping[str, Any]) -> dict[str, np.ndarray]:
        """A batch of rows (an array, a pandas DataFrame or a dict of columns) -> its columns; an ``id`` column comes first."""
        if isinstance(batch, np.ndarray):
            return self.columns(batch)
        ids = batch["id"] if "id" in batch else None
        if self._table is not None and "data" not in batch:
            rows = self._table.rows({name: _values(batch[name]) for name in self._table.names})
        else:
            rows = np.stack([np.asarray(row, dtype=np.float32).reshape(-1) for row in _values(batch["data"])]) if len(batch["data"]) else \
                np.zeros((0, self.version.preprocessing.input_dim), np.float32)
        answer = self.columns(rows)
        return answer if ids is None else {"id": np.asarray(_values(ids)), **answer}


def _values(column: Any) -> Any:
    """A pandas Series as its values; anything else as it is."""
    return column.to_numpy() if hasattr(column, "to_numpy") and not isinstance(column, np.ndarray) else column
