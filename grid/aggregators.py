"""Aggregators for ``DMap.aggregate``: ``count()``, ``sum_of()``, ``min_of()``, ``max_of()``,
``mean_of()``, ``distinct()``, each optionally ``of=`` a function of the value; or your own
``Aggregator(map, combine, finish=None, empty=None)``.

    import grid.aggregators as agg
    prices.aggregate(agg.mean_of(lambda item: item["price"]), lambda key, item: item["shop"] == "north")
"""

from .data.processing import Aggregator, Entry, count, distinct, max_of, mean_of, min_of, sum_of

__all__ = ["Aggregator", "Entry", "count", "distinct", "max_of", "mean_of", "min_of", "sum_of"]
