"""Usage accounting and spend budgets (README "Usage and budgets", docs/design.md §3).

- ``prices``: what a request costs, in whole micro-dollars; ``periods``: the UTC hour, day and
  month it is counted in;
- ``ledger``: the store's keys and fields, and what one finished request adds (``Entry``);
- ``budgets``: a request's reservation on its budgets and the answer (429 ``budget_exceeded``);
- ``accounts``: per config snapshot, which keys are accounted and budgeted;
- ``local_ledger``: the store in this process (no Redis, or Redis failing);
- ``report``: ``GET /admin/usage``.

The Redis side is in ``gateway/limits``: the ``SPEND`` and ``SETTLE`` scripts (``lua.py``) run
through the limiter, so that a request's usage and budget correction ride in the call that
settles its token buckets.
"""
