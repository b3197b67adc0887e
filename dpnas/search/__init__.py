"""Architecture search: study files, Optuna storages, the trials of a study, and the privacy cost of the search.

Flow: arch → data → dp → **search** → analysis. A study file becomes a space of configs; each Optuna trial trains
one of them with ``dpnas.dp.train``; the search's own privacy cost is accounted here.

May import: dpnas.arch, dpnas.data, dpnas.dp.
"""
