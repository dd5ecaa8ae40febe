"""Parquet files with an embedding column (NeMo Curator, Lance exports, DataComp-style uid tables, clipline's own
`parquet/` folder): one row per vector, a list or fixed_size_list of floats beside the metadata columns, read a row
group at a time."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow.parquet as pq

from pipeline.embeddings.foreign import FileSource, check_widths, parallel, refuse
from pipeline.embeddings.rows import BadEmbeddings, ParquetRows, RowArray, column_dim


class ParquetSource(FileSource):
    """Parquet files with an embedding column (list or fixed_size_list of floats) beside their metadata columns."""

    name = "parquet"
    suffix = ".parquet"
    _dim: int | None = None

    def meta_path(self, shard: str) -> str:
        return self.file(shard)

    def vectors(self, shard: str, modality: str) -> RowArray:
        return ParquetRows(self.fs, self.file(shard), self.options.embedding_column, self.dim([shard]), self.bounded)

    def _check(self, shards: list[str]) -> None:
        col = self.options.embedding_column

        def one(shard: str) -> tuple[list[str], tuple[str, int | None]]:
            path = self.file(shard)
            md = self._footer(path)
            schema = md.schema.to_arrow_schema()
            self._rows[shard], self._schema[shard] = md.num_rows, list(schema.names)
            problems = self._check_columns(path, self._schema[shard])
            if col not in schema.names:
                problems.append(f"{path} has no embedding column {col!r} (set embeddings.embedding_column)")
                return problems, (path, None)
            return problems, (path, column_dim(schema.field(col), path))

        results = parallel(one, shards)
        refuse([p for r in results for p in r[0]], f"input={self.folder}")
        fixed = {p: d for _, (p, d) in results if d is not None}
        check_widths(fixed, self.folder)
        self._dim = next(iter(fixed.values()), None)

    def dim(self, shards: Sequence[str]) -> int:
        if self._dim is None:
            self._dim = self._first_width(shards)
        return self._dim

    def _first_width(self, shards: Sequence[str]) -> int:
        """A list column declares no width: the first vector's length (every row is checked against it when read)."""
        col = self.options.embedding_column
        for shard in shards:
            path = self.file(shard)

            def read(path: str = path) -> int | None:
                with self.fs.open(path, "rb") as f:
                    pf = pq.ParquetFile(f)
                    d = column_dim(pf.schema_arrow.field(col), path)
                    if d is not None:
                        return d
                    for batch in pf.iter_batches(batch_size=1024, columns=[col]):
                        arr = batch.column(0).drop_null()
                        if len(arr):
                            return int(len(arr[0]))
                return None

            width = self.bounded(path, read)
            if width:
                return width
        raise BadEmbeddings(f"input={self.folder}: column {col!r} holds no vector in any file")

    def describe(self) -> dict[str, Any]:
        o = self.options
        return {
            "input_format": self.name,
            "modality": o.modality,
            "embedding_column": o.embedding_column,
            "key_column": o.key_column,
            "columns": o.columns,
        }
