"""dataengine's console script, where the two halves meet: backend/ (serving) and training/ (RQ jobs, rounds).

`dataengine <command>` and `python -m dataengine <command>` run `dataengine.cli.main`.
"""
