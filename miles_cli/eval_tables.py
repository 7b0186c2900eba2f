"""Rich tables of `eval/<name>/*` metrics: one table per dataset, one column per checkpoint or
step (`miles rollout --eval`, the end of `miles train`), and the change when there are two."""

from __future__ import annotations

from rich.table import Table


def eval_tables(columns: list[tuple[str, dict[str, float]]]) -> list[Table]:
    """`columns` is [(header, metrics)]; metrics are keyed `eval/<dataset>/<metric>`."""
    tables: dict[str, dict[str, list]] = {}  # dataset -> metric -> one value per column
    for index, (_, metrics) in enumerate(columns):
        for key, value in metrics.items():
            prefix, _, rest = key.partition("/")
            dataset, _, metric = rest.partition("/")
            if prefix == "eval" and metric:
                row = tables.setdefault(dataset, {}).setdefault(metric, [None] * len(columns))
                row[index] = value
    return [_table(name, [h for h, _ in columns], rows) for name, rows in tables.items()]


def _table(dataset: str, headers: list[str], rows: dict[str, list]) -> Table:
    compare = len(headers) == 2
    table = Table("metric", *headers, *(["change"] if compare else []), title=f"eval: {dataset}")
    for metric, values in rows.items():
        change = [_fmt(values[1] - values[0], sign=True)] if compare and None not in values else []
        table.add_row(metric, *[_fmt(v) for v in values], *(change or ([""] if compare else [])))
    return table


def _fmt(value: float | None, sign: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.3f}" if sign else f"{value:.3f}"
