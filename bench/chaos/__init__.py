"""The chaos soak: real Lookout instances on real servers, faults injected on a seeded schedule,
and invariants checked against observed state at the end.

    python -m bench.chaos --minutes 2 --instances 2 --seed 7

Modules by concept: `proxy` (fault proxy and load balancer), `cluster` (servers and processes),
`sse` (browser-like stream clients), `webhooks` (Stripe's deliveries, with duplicates and
reordering), `traffic` (customers), `schedule` (faults), `invariants`, `report`, `soak` (the
whole run).
"""

from __future__ import annotations
