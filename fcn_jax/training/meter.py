"""The training loss, watched on the devices: the host does not wait for a step to finish until it has a
reason to look (a log line, a checkpoint, a stop, the end of an epoch), so it can enqueue the next step and
move the next batch meanwhile.

The meter keeps, on device, the last loss, whether every loss so far was finite and the first step whose
loss was not; :meth:`LossMeter.fetch` brings them to the host in one transfer.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fcn_jax.devices import host_tree


@jax.jit
def _add(record: dict, loss: jax.Array) -> dict:
    step = record["step"] + 1
    finite = jnp.isfinite(loss)
    return {"step": step, "loss": loss.astype(jnp.float32), "finite": record["finite"] & finite,
            "first_bad": jnp.where(record["finite"] & ~finite, step, record["first_bad"])}


@dataclasses.dataclass(frozen=True)
class Seen:
    """What the host learns at a sync point: the latest loss, and the first step whose loss was NaN or
    infinite (None: none was)."""

    step: int
    loss: float
    first_bad_step: int | None


class LossMeter:
    def __init__(self, step: int):
        """Counting from ``step`` (the step already done: 0, or the one a run resumes from)."""
        self.record = {"step": jnp.int32(step), "loss": jnp.float32(0), "finite": jnp.bool_(True),
                       "first_bad": jnp.int32(-1)}

    def add(self, loss: jax.Array) -> None:
        """Account one step's loss (a device scalar); never waits for the device."""
        self.record = _add(self.record, loss)

    def fetch(self) -> Seen:
        """Wait for the steps so far and read the record (one device-to-host transfer)."""
        host = host_tree(self.record)
        return Seen(int(host["step"]), float(host["loss"]), None if host["finite"] else int(host["first_bad"]))
