"""A real backend whose provisioning fails for good at one step (a refused privilege, a bug):
what makes Lookout cancel and refund a purchase."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from provisioning import ProvisionerBackend, ProvisioningError, Step, StepContext
from provisioning.backend import OperationKind
from tests.provisioning.support import WrappedBackend

__all__ = ["FailingBackend"]


class FailingBackend(WrappedBackend):
    def __init__(self, inner: ProvisionerBackend, fail_at: str = "apply_schema") -> None:
        super().__init__(inner)
        self.fail_at = fail_at

    def steps(self, kind: OperationKind) -> Sequence[Step]:
        steps = self.inner.steps(kind)
        if kind != "provision":
            return steps
        return [replace(s, run=self._fail) if s.name == self.fail_at else s for s in steps]

    async def _fail(self, ctx: StepContext) -> None:
        raise ProvisioningError("The database could not be set up.")
