"""``pipeline demo``: synthetic data → pretrain → extract → fit → evaluate → report.

- ``run``: :func:`run_demo`.
- ``report``: the demo's report (table, overlays, what the UNet learned, loss curves).
"""
