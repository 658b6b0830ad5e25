"""The `mlops` command: the composition root over the domain library (mlops/), the
orchestration (status, backtest) and the online service (serving/), above all of them."""
