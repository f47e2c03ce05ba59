"""Settlement: what an admitted request used, settled once its response has ended.

One store call per request (``Limiter.settle``) carries all of it: the token buckets' correction
from the reserved tokens to the reported ones, the usage counters (key and team, hour, day and
month), and the budget correction from the reserved cost to the real one
(``gateway/accounting/accounts.py`` says what is counted for each ending). It runs after the
response's last byte, off the response's path (docs/design.md §5).
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.accounting.accounts import Accounts, KeyAccount
from gateway.accounting.budgets import SpendDecision
from gateway.context import RequestContext
from gateway.limits import Decision, Limiter
from gateway.openai.usage import Usage


@dataclass(slots=True)  # made per request: not frozen, which costs 5x as much to make
class Settlement:
    """An admitted request's limits and accounts, settled from the response's real usage.

    ``decision``: its token buckets' admission (None when it has no token bucket); ``account``:
    its key's account when usage is counted or a budget applies, with ``spend``, the budget
    reservation; ``limited``: the key has buckets of its own, so the caller's limits replace the
    upstream's ``x-ratelimit-*`` headers."""

    limiter: Limiter
    decision: Decision | None = None
    accounts: Accounts | None = None
    account: KeyAccount | None = None
    spend: SpendDecision | None = None
    limited: bool = False

    @property
    def reads_usage(self) -> bool:
        """Whether the response's usage is needed (the relay taps it then)."""
        return self.decision is not None or self.account is not None

    async def settle(self, context: RequestContext, usage: Usage | None, failed: bool) -> None:
        """Settle to ``usage`` (None: the response reported none). ``failed``: the upstream
        never answered or answered with an error status, so it generated nothing: without
        usage, the reservations are refunded rather than kept."""
        tokens = usage.total_tokens if usage is not None else (0 if failed else None)
        entry = None
        if self.account is not None and self.accounts is not None:
            entry, context.cost_micro_usd = self.accounts.entry(
                self.account,
                model=context.model,
                answered_model=context.upstream_model,
                usage=usage,
                failed=failed,
                spend=self.spend,
            )
        if entry is None and (tokens is None or self.decision is None):
            return
        await self.limiter.settle(self.decision, tokens, entry)
