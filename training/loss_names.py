"""The one list of loss names: which loss each training mode accepts and which need a reference.

Configs check against it (training.config for `prefloop train`, training.online_config for online
DPO) and training.losses dispatches on the same names. Kept free of torch so that reading and
checking a config stays cheap.

    python -c "from training.loss_names import LOSS_TYPES; print(LOSS_TYPES['dpo'])"
"""

from __future__ import annotations

from typing import Literal, get_args

PreferenceLossType = Literal["sigmoid", "ipo", "hinge", "cdpo", "robust", "simpo", "rdpo", "orpo"]
PREFERENCE_LOSSES: tuple[str, ...] = get_args(PreferenceLossType)
"""The DPO family (training.losses.preference_loss), the default first."""

# Preference losses that need no frozen reference policy (reference-free DPO variants).
REFERENCE_FREE_LOSSES: frozenset[str] = frozenset({"simpo", "orpo"})

REFERENCE_BASED_PREFERENCE_LOSSES: tuple[str, ...] = tuple(
    name for name in PREFERENCE_LOSSES if name not in REFERENCE_FREE_LOSSES)
"""The DPO losses that compare with a reference (what online DPO can use)."""

# Loss types accepted by each offline mode (first = default).
LOSS_TYPES: dict[str, tuple[str, ...]] = {
    "sft": ("sft",),
    "rm": ("bradley_terry", "plackett_luce"),
    "dpo": PREFERENCE_LOSSES,
    "kto": ("kto",),
}


def needs_reference(loss_type: str) -> bool:
    """True when the loss compares the policy with a frozen reference policy."""
    return loss_type not in REFERENCE_FREE_LOSSES | {*LOSS_TYPES["sft"], *LOSS_TYPES["rm"]}


__all__ = ["LOSS_TYPES", "PREFERENCE_LOSSES", "REFERENCE_BASED_PREFERENCE_LOSSES",
           "REFERENCE_FREE_LOSSES", "PreferenceLossType", "needs_reference"]
