"""The names of the certificates, as every output (card, plot, zoo) spells them: one place, imported by all."""
from __future__ import annotations

# Order and wording of certificates everywhere; the keys are those of certification.json's "certificates".
CERTIFICATE_LABELS = {"monte_carlo": "Monte-Carlo", "deterministic": "deterministic",
                      "deterministic_raw": "deterministic raw claim",
                      "deterministic_lipschitz": "deterministic Lipschitz"}
DETERMINISTIC = ("deterministic", "deterministic_raw", "deterministic_lipschitz")
# What the PGD audit speaks for: it attacks inside the reported (calibrated) radius, and the Lipschitz radius is
# never larger; the raw radius before calibration is larger, so the audit says nothing about it.
AUDITED = ("deterministic", "deterministic_lipschitz")
