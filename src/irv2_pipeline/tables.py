"""DataFrames built from many rows, without every row existing as Python objects."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import islice

import pandas as pd

# Rows turned into a DataFrame at a time: a few MB of Python objects at most.
ROWS_PER_BLOCK = 4096


def frame_from_rows(rows: Iterable[tuple], columns: Sequence[str]) -> pd.DataFrame:
    """A DataFrame of ``rows`` (tuples in the order of ``columns``), a block at a time.

    A row's tuple and strings take several times the memory of its share of the
    DataFrame's columns, so only one block of them exists at once: memory grows by
    the table itself, however many rows there are.

    Args:
        rows: The rows, consumed once.
        columns: The column names.

    Returns:
        The table, with a fresh index.
    """
    row_iterator = iter(rows)
    blocks = []
    while block := list(islice(row_iterator, ROWS_PER_BLOCK)):
        blocks.append(pd.DataFrame(block, columns=columns))
    if not blocks:
        return pd.DataFrame(columns=columns)
    return pd.concat(blocks, ignore_index=True)
